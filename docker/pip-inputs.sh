#!/bin/sh
# Sourced by the dependency stage of docker/api.Dockerfile and docker/worker-cpu.Dockerfile: exports the
# optional build inputs of docker/build/ (copied to /build/inputs) for pip. A missing or empty file is
# simply not used, so builds with a registry and a public CA need none of them (docker/build/README.md).
inputs=/build/inputs
if [ -s "$inputs/ca.pem" ]; then
  export PIP_CERT="$inputs/ca.pem"
  echo "[build] pip trusts the CA bundle of docker/build/ca.pem"
fi
if [ -s "$inputs/constraints.txt" ]; then
  export PIP_CONSTRAINT="$inputs/constraints.txt"
  echo "[build] pip constraints: docker/build/constraints.txt ($(grep -c '==' "$inputs/constraints.txt") pins)"
fi
if [ -f "$inputs/torch-index/torch/index.html" ]; then
  # a local torch index (TORCH_INDEX_URL=file:///build/inputs/torch-index) holds torch alone: its
  # dependencies come from PyPI (the official CPU index serves both)
  export PIP_EXTRA_INDEX_URL="${PIP_EXTRA_INDEX_URL:-https://pypi.org/simple}"
  echo "[build] local torch index in docker/build/torch-index: $(ls "$inputs/torch-index/torch" | grep -c '\.whl$') wheel(s)"
fi
