# syntax=docker/dockerfile:1
# Online API image: the project's base dependencies and the CPU build of torch. No vLLM: the online
# tier never imports it (the build fails if it is importable). Serves the app factory
# `online_api.app:create_app` with uvicorn on port 8000. Not the offline worker (worker-*.Dockerfile).
ARG PYTHON_IMAGE=python:3.11-slim
FROM ${PYTHON_IMAGE}

# torch comes from the PyTorch CPU index so that pip never pulls a multi-GB CUDA build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    ONEREC_ARTIFACTS_DIR=/artifacts \
    ONEREC_DATA_DIR=/data/beauty

WORKDIR /app
# one non-root uid (10001) in every image of the stack, owning the mount point of the artifacts volume
RUN useradd --create-home --uid 10001 onerec && mkdir -p /artifacts /data && chown onerec:onerec /artifacts

# dependencies first, cached until pyproject.toml changes: torch (CPU), then the base dependencies
# read from pyproject.toml (no extras: `cpu`/`gpu` are the vLLM builds)
COPY pyproject.toml README.md ./
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" \
 && python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
      > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt

COPY services ./services
COPY model ./model
COPY online_api ./online_api
RUN pip install --no-deps . \
 && python -c "import importlib.util as u, online_api.app; assert u.find_spec('vllm') is None, 'vLLM in the API image'"

USER onerec
EXPOSE 8000
# one worker per container: the model and the Redis pool live in the app's lifespan; scale with replicas
CMD ["uvicorn", "--factory", "online_api.app:create_app", "--host", "0.0.0.0", "--port", "8000", "--no-access-log"]
