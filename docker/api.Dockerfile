# Online API image: the project's base dependencies and the CPU build of torch. No vLLM: the online
# tier never imports it (the build fails if it is importable). Serves the app factory
# `online_api.app:create_app` with uvicorn on port 8000 as the non-root user `onerec`. Not the offline
# worker (worker-*.Dockerfile).
#
# Two stages: `deps` installs the dependencies into /opt/venv using the optional build inputs of
# docker/build/ (extra CA, pip constraints, a local torch index; docker/build/README.md), and the final
# stage copies only the venv, so those inputs never reach the image.
ARG PYTHON_IMAGE=python:3.11-slim

# the dependency list of pyproject.toml (no extras: `cpu`/`gpu` are the vLLM builds); the install below is
# cached on this list, not on the whole pyproject.toml (an edit of a [tool.*] table rebuilds nothing)
FROM ${PYTHON_IMAGE} AS reqs
COPY pyproject.toml /tmp/
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('/tmp/pyproject.toml', 'rb'))['project']['dependencies']))" \
      > /requirements.txt

FROM ${PYTHON_IMAGE} AS deps
# torch comes from the PyTorch CPU index so that pip never pulls a multi-GB CUDA build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
WORKDIR /build
# dependencies only, cached until the dependency list or a build input changes: torch (CPU), then the
# base dependencies, and the build backend, so that the final stage installs the project without network
COPY docker/build/ ./inputs/
COPY docker/pip-inputs.sh ./
COPY --from=reqs /requirements.txt ./
RUN python -m venv /opt/venv \
 && . ./pip-inputs.sh \
 && pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" \
 && pip install -r requirements.txt "setuptools>=68"

FROM ${PYTHON_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    ONEREC_ARTIFACTS_DIR=/artifacts \
    ONEREC_DATA_DIR=/data/beauty \
    NUMBA_CACHE_DIR=/home/onerec/.cache/numba

WORKDIR /app
# one non-root uid (10001) in every image of the stack, owning the mount point of the artifacts volume
RUN useradd --create-home --uid 10001 onerec && mkdir -p /artifacts /data && chown onerec:onerec /artifacts
COPY --from=deps /opt/venv /opt/venv

COPY pyproject.toml README.md ./
COPY services ./services
COPY model ./model
COPY online_api ./online_api
RUN pip install --no-deps --no-build-isolation . \
 && python -c "import importlib.util as u, online_api.app; assert u.find_spec('vllm') is None, 'vLLM in the API image'"

USER onerec
EXPOSE 8000
# one worker per container: the model and the Redis pool live in the app's lifespan; scale with replicas
CMD ["uvicorn", "--factory", "online_api.app:create_app", "--host", "0.0.0.0", "--port", "8000", "--no-access-log"]
