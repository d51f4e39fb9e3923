# Offline worker image, GPU: the official vLLM image (CUDA, torch and vLLM already matched) plus this
# project's base dependencies, installed under constraints that keep the image's torch/vLLM as they are.
# Runs `docker/refresh.sh` (a refresh once, or every REFRESH_INTERVAL_S seconds). Needs the NVIDIA
# container toolkit on the host; compose reserves the GPU. Not the API image (api.Dockerfile).
#
# VLLM_IMAGE: pin the tag you have validated (the pyproject `gpu` extra asks for vllm>=0.10).
ARG VLLM_IMAGE=vllm/vllm-openai:v0.33.0
FROM ${VLLM_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    ONEREC_ARTIFACTS_DIR=/artifacts \
    ONEREC_DATA_DIR=/data/beauty

WORKDIR /app
RUN useradd --create-home --uid 10001 onerec && mkdir -p /artifacts /data && chown onerec:onerec /artifacts

# dependencies first, cached until pyproject.toml changes; the image's torch, vLLM and their CUDA
# companions become constraints so that no requirement of ours can replace them
COPY pyproject.toml README.md ./
RUN python3 -m pip freeze | grep -iE '^(torch|torchvision|torchaudio|vllm|triton|xformers|flashinfer[a-z_-]*)==' \
      > /tmp/constraints.txt \
 && python3 -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
      > /tmp/requirements.txt \
 && python3 -m pip install -c /tmp/constraints.txt -r /tmp/requirements.txt

COPY services ./services
COPY model ./model
COPY offline_worker ./offline_worker
COPY docker/refresh.sh docker/train.sh ./docker/
RUN python3 -m pip install --no-deps . \
 && python3 -c "import torch, transformers, vllm, offline_worker.engine_interface; print('torch', torch.__version__, 'vllm', vllm.__version__)"

USER onerec
# the base image's entrypoint is the OpenAI-compatible server; this image runs the refresh job instead
ENTRYPOINT []
CMD ["/app/docker/refresh.sh"]
