"""The docker-compose stack, built and run for real on a Docker engine (marker `stack`, not in `make test`).

`scripts/stack.sh up` does what `make stack` does (installs docker.io and Compose v2 when missing, starts
dockerd, builds the local base images when no registry answers, builds the images, tiny training, Redis
+ API, one refresh, a think-ahead answer) under a project name of its own and free host ports; then the
running stack is checked from outside: both healthchecks healthy, `/readyz` 200, `POST /v1/recommend`
answers `think-ahead` with reasoning, a stopped Redis container degrades answers (200, `degraded`, not
think-ahead, never a 5xx) and its restart brings think-ahead back (the AOF volume kept the entries),
the API container runs as a non-root user and cannot import vLLM. The stack is removed at the end,
volumes included; images and build cache stay, so a second run is fast.

A step that cannot run (no engine, no network, a failed build) fails the test: nothing here skips.
Run: `.venv/bin/python -m pytest -m stack tests/test_stack.py` (what .ci/run does).
Not here: the GPU profile (no GPU containers on these machines; tests/test_compose.py checks it statically).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from services.harness import free_port

ROOT = Path(__file__).resolve().parent.parent
STACK = ROOT / "scripts" / "stack.sh"
COMPOSE = ROOT / ".venv" / "bin" / "docker-compose"
PROJECT = "onerec-think-stacktest"

pytestmark = [pytest.mark.stack, pytest.mark.timeout(3600)]


def _compose(env: dict[str, str], *args: str, check: bool = True, timeout: float = 300) -> str:
    proc = subprocess.run([str(COMPOSE), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, f"docker compose {' '.join(args)}: rc {proc.returncode}\n{proc.stderr[-3000:]}"
    return proc.stdout


def _request(url: str, body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, {}


def _health(env: dict[str, str], service: str) -> str:
    cid = _compose(env, "ps", "-q", service).strip()
    assert cid, f"no {service} container"
    out = subprocess.run(["docker", "inspect", "-f", "{{.State.Health.Status}}", cid], capture_output=True, text=True)
    return out.stdout.strip()


def _wait(what: str, timeout_s: float, probe: Any) -> Any:
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(1)
    raise AssertionError(f"{what}: not reached within {timeout_s:.0f}s (last: {last!r})")


@pytest.fixture(scope="module")
def stack() -> Iterator[dict[str, str]]:
    env = {**os.environ, "COMPOSE_PROJECT_NAME": PROJECT, "API_PORT": str(free_port()),
           "REDIS_PORT": str(free_port())}
    t0 = time.monotonic()
    proc = subprocess.run([str(STACK), "up"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=3000)
    log = ROOT / "runs" / "stack" / f"{PROJECT}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(proc.stdout + proc.stderr)
    print("\n".join(line for line in proc.stdout.splitlines() if line.startswith(("[stack]", "[train]", "  ", "POST"))))
    print(f"(full output: {log.relative_to(ROOT)})")
    try:
        assert proc.returncode == 0, f"scripts/stack.sh up failed (rc {proc.returncode}):\n{proc.stdout[-6000:]}\n" \
                                     f"{proc.stderr[-6000:]}"
        print(f"scripts/stack.sh up: {time.monotonic() - t0:.0f}s")
        yield env
    finally:
        if COMPOSE.exists():
            subprocess.run([str(STACK), "down"], cwd=ROOT, env=env, capture_output=True, timeout=300)


def test_stack_serves_think_ahead_and_survives_a_redis_restart(stack: dict[str, str]) -> None:
    env = stack
    base = f"http://127.0.0.1:{env['API_PORT']}"
    # the printed answer of stack.sh came from this stack; `answer` exits non-zero unless it was think-ahead
    assert _health(env, "redis") == "healthy"
    assert _health(env, "api") == "healthy"
    assert _request(base + "/readyz")[0] == 200

    # the refresh computed the first 16 users by id (`--limit 16`): every one is served think-ahead; one whose
    # reasoning did not close within the token budget is served without reasoning (counted as `unclosed`)
    users = sorted({int(line.split()[0]) for line in (ROOT / "data" / "beauty" / "sequences.txt").open()
                    if line.strip()})[:16]  # fmt: skip
    answers = {u: _request(base + "/v1/recommend", {"user_id": u, "k": 5}) for u in users}
    assert all(status == 200 for status, _ in answers.values()), answers
    assert all(out["source"] == "think-ahead" and len(out["items"]) == 5 and not out["degraded"]
               for _, out in answers.values()), answers  # fmt: skip
    reasoned = [u for u, (_, out) in answers.items() if out["reasoning"]]
    assert len(reasoned) >= len(users) // 2, f"reasoning for {len(reasoned)} of {len(users)} users"
    user = reasoned[0]

    # Redis down: answers degrade, never a 5xx
    _compose(env, "stop", "redis")
    try:
        for _ in range(5):
            status, out = _request(base + "/v1/recommend", {"user_id": user, "k": 5})
            assert status == 200, f"HTTP {status} while Redis is down"
            assert out["source"] != "think-ahead" and out["degraded"], out
            assert len(out["items"]) == 5
        assert _request(base + "/readyz")[0] == 503, "/readyz must report the missing Redis"
    finally:
        _compose(env, "start", "redis")
    _wait("redis healthy again", 120, lambda: _health(env, "redis") == "healthy")
    # the entries survived in the AOF volume: think-ahead again once the breaker closes
    out = _wait("think-ahead after the Redis restart", 120, lambda: (
        lambda r: r[1] if r[0] == 200 and r[1].get("source") == "think-ahead" else None)(
        _request(base + "/v1/recommend", {"user_id": user, "k": 5})))
    assert out["reasoning"] and not out["degraded"]
    assert _request(base + "/readyz")[0] == 200


def test_api_container_is_non_root_without_vllm(stack: dict[str, str]) -> None:
    uid = _compose(stack, "exec", "-T", "api", "id", "-u").strip()
    assert uid != "0" and uid.isdigit(), f"the API runs as uid {uid!r}"
    probe = "import importlib.util as u; print(u.find_spec('vllm'))"
    assert _compose(stack, "exec", "-T", "api", "python", "-c", probe).strip() == "None", "vLLM in the API image"


@pytest.mark.parametrize("profile", ["", "gpu", "*"])
def test_compose_config_is_clean(stack: dict[str, str], profile: str) -> None:
    """Compose v2 as installed by stack.sh accepts the file without a warning (the gpu profile: only this)."""
    args = [*(["--profile", profile] if profile else []), "config", "-q"]
    proc = subprocess.run([str(COMPOSE), *args], cwd=ROOT, env=stack, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and not proc.stderr.strip(), f"docker compose {' '.join(args)}: {proc.stderr}"
