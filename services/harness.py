"""The harness that tests, benchmarks and the demo start their processes with, written once.

- `free_port()`: a free localhost TCP port;
- `RedisServer` / `redis_server()`: a private redis-server on a free port and a data folder of its own, that
  can be stopped, signalled (SIGKILL, SIGSTOP) and restarted on the same port; persistence off unless ``aof``;
- `uvicorn_cmd()` + `process()`: the API (or any ASGI factory) as a uvicorn child process that is always
  stopped; `serve_in_thread()`: an ASGI app under a real uvicorn server in a thread of this process;
- `wait_http()`: wait until a URL answers 200 (or the server died);
- `percentile()`: the one percentile every latency number of the benchmarks is read with.

What it is not: part of the served system (no module of `model`, `offline_worker` or `online_api` imports
it) and not a fixture library (tests/conftest.py wraps it in pytest fixtures). It sits in `services`, the
bottom layer, so it imports no torch, model or vLLM code; `serve_in_thread` takes any ASGI app, so it never
imports the API either.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import redis

from services.config import ROOT

PY = sys.executable  # child processes run on this interpreter (the project's venv)
HOST = "127.0.0.1"


def free_port() -> int:
    """A TCP port on localhost that nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def percentile(xs: Sequence[float], q: float) -> float:
    """The `q`-th percentile (0..100) of `xs` by nearest rank, no interpolation: always a value that was
    measured. NaN for no values."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, int(q / 100.0 * len(s)))]


# --------------------------------------------------------------------------- redis-server


def find_redis_server() -> str:
    """The redis-server binary: PATH, else /usr/bin/redis-server; FileNotFoundError saying how to install it."""
    path = shutil.which("redis-server")
    if path is None and Path("/usr/bin/redis-server").is_file():
        path = "/usr/bin/redis-server"
    if path is None:
        raise FileNotFoundError(
            "redis-server not found on PATH or at /usr/bin/redis-server; install it (apt-get install redis-server)"
        )
    return path


class RedisServer:
    """A redis-server subprocess on a fixed localhost port and data folder, restartable on both.

    ``aof=True`` turns on the append-only file with an fsync on every write, so what the server acknowledged
    survives a SIGKILL (the fault benchmark); otherwise nothing is persisted.
    """

    def __init__(self, workdir: Path, port: int | None = None, aof: bool = False, binary: str | None = None,
                 start_timeout_s: float = 10.0) -> None:  # fmt: skip
        self.workdir = Path(workdir)
        self.port = port if port is not None else free_port()
        self.host = HOST
        self.aof = aof
        self.binary = binary or find_redis_server()
        self.start_timeout_s = start_timeout_s
        self.log = self.workdir / "redis.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> tuple[float, float]:
        """Start (or restart) on the same port and folder; returns once PING answers, with (spawned, first PING
        answered) as `time.monotonic()` values. A server that is already running is left alone."""
        if self.running:
            now = time.monotonic()
            return now, now
        persistence = ["--appendonly", "yes", "--appendfsync", "always"] if self.aof else ["--appendonly", "no"]
        cmd = [self.binary, "--port", str(self.port), "--bind", self.host, "--save", "", *persistence,
               "--dir", str(self.workdir), "--logfile", str(self.log)]  # fmt: skip
        spawned = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        client = redis.Redis(host=self.host, port=self.port, socket_timeout=0.5, socket_connect_timeout=0.5)
        deadline = spawned + self.start_timeout_s
        try:
            while True:
                if self.proc.poll() is not None:
                    tail = self.log.read_text()[-2000:] if self.log.exists() else ""
                    raise RuntimeError(f"redis-server exited with {self.proc.returncode} on port {self.port}:\n{tail}")
                try:
                    if client.ping():
                        return spawned, time.monotonic()
                except redis.RedisError:  # connection refused, or BusyLoadingError while the AOF is replayed
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"redis-server did not answer PING on port {self.port} in "
                                       f"{self.start_timeout_s}s")  # fmt: skip
                time.sleep(0.01)
        finally:
            client.close()

    def signal(self, sig: signal.Signals) -> None:
        """Send `sig` (SIGKILL waits for the process to go; SIGSTOP freezes it until SIGCONT or `stop`)."""
        assert self.proc is not None, "redis-server was never started"
        self.proc.send_signal(sig)
        if sig == signal.SIGKILL:
            self.proc.wait(10)

    def stop(self) -> None:
        """Stop the server (SIGCONT in case it is frozen, SIGTERM, SIGKILL after 5 s); safe to call twice."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc = None


@contextmanager
def redis_server(workdir: Path | None = None, aof: bool = False) -> Iterator[RedisServer]:
    """A started `RedisServer` (in a temporary folder unless `workdir`), stopped on exit."""
    with tempfile.TemporaryDirectory(prefix="onerec-redis-") as tmp:
        server = RedisServer(Path(workdir) if workdir is not None else Path(tmp), aof=aof)
        server.start()
        try:
            yield server
        finally:
            server.stop()


# --------------------------------------------------------------------------- HTTP servers


def wait_http(url: str, timeout_s: float, server: subprocess.Popen[bytes] | threading.Thread | None = None) -> None:
    """Return once `url` answers 200; RuntimeError after `timeout_s` or as soon as `server` (the child process or
    thread serving it) is gone."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if isinstance(server, subprocess.Popen) and server.poll() is not None:
            raise RuntimeError(f"server exited with {server.returncode} before {url} answered")
        if isinstance(server, threading.Thread) and not server.is_alive():
            raise RuntimeError(f"server thread ended before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} not ready after {timeout_s}s")


def uvicorn_cmd(app: str, port: int) -> list[str]:
    """Command line of one uvicorn worker serving the factory `app` ("module:function") on localhost, with
    uvloop/httptools where installed: the served setting."""
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    return [PY, "-m", "uvicorn", app, "--factory", "--host", HOST, "--port", str(port), "--workers", "1",
            "--loop", loop, "--http", http, "--log-level", "warning", "--no-access-log", "--timeout-keep-alive", "15"]


@contextmanager
def process(cmd: list[str], env: dict[str, str] | None = None, log: Path | None = None,
            echo: bool = False) -> Iterator[subprocess.Popen]:  # fmt: skip
    """`cmd` as a child process in the repository root (`env` added to this environment; output appended to
    `log`, else shown on this terminal if `echo`, else dropped), stopped on exit: SIGINT (uvicorn shuts down
    gracefully), SIGKILL after 10 s."""
    if log is not None:
        sink: Any = log.open("ab")
    else:
        sink = nullcontext(None if echo else subprocess.DEVNULL)
    with sink as out:
        proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)


@contextmanager
def serve_in_thread(app: Any, ready_path: str = "/readyz", timeout_s: float = 30.0) -> Iterator[str]:
    """The ASGI `app` under a real uvicorn server on a free localhost port, in a daemon thread of this process;
    yields its base URL once `ready_path` answers 200, and stops the server on exit."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host=HOST, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    base = f"http://{HOST}:{port}"
    try:
        wait_http(base + ready_path, timeout_s, thread)
        yield base
    finally:
        server.should_exit = True
        thread.join(10)
