"""Shared pytest fixtures: a real redis-server for the session, a clean client and namespace per test.

The server runs from PATH (or /usr/bin/redis-server) on a free localhost port with persistence off,
in a temporary folder. `redis_server.stop()` / `.start()` let a test kill Redis mid-test and bring it
back on the same port; `redis_client` restarts it if an earlier test left it down.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

START_TIMEOUT_S = 10.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _find_redis_server() -> str:
    path = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if Path("/usr/bin/redis-server").is_file() else None
    )
    if path is None:
        pytest.fail(
            "redis-server not found on PATH or at /usr/bin/redis-server; install it (apt-get install redis-server)"
        )
    return path


class RedisServer:
    """A redis-server subprocess on a fixed port that can be stopped and restarted."""

    def __init__(self, binary: str, workdir: Path, port: int | None = None) -> None:
        self.binary = binary
        self.workdir = workdir
        self.port = port if port is not None else _free_port()
        self.host = "127.0.0.1"
        self.log = workdir / "redis.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        """Start (or restart) on the same port; returns once PING answers."""
        if self.running:
            return
        cmd = [
            self.binary,
            "--port", str(self.port),
            "--bind", self.host,
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.workdir),
            "--logfile", str(self.log),
        ]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        client = redis.Redis(host=self.host, port=self.port, socket_timeout=0.5, socket_connect_timeout=0.5)
        deadline = time.monotonic() + START_TIMEOUT_S
        try:
            while True:
                if self.proc.poll() is not None:
                    tail = self.log.read_text()[-2000:] if self.log.exists() else ""
                    raise RuntimeError(f"redis-server exited with {self.proc.returncode} on port {self.port}:\n{tail}")
                try:
                    if client.ping():
                        return
                except redis.ConnectionError:
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"redis-server did not answer PING on port {self.port} in {START_TIMEOUT_S}s")
                time.sleep(0.02)
        finally:
            client.close()

    def stop(self) -> None:
        """Kill the server (SIGTERM, then SIGKILL after 5 s); safe to call twice."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc = None


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A real redis-server for the whole session (`.url`, `.port`, `.stop()`, `.start()`)."""
    server = RedisServer(_find_redis_server(), tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A sync client to a flushed server (restarted first if an earlier test left it down)."""
    if not redis_server.running:
        redis_server.start()
    client = redis.Redis.from_url(redis_server.url, socket_timeout=5)
    client.flushall()
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def ns(request: pytest.FixtureRequest) -> str:
    """A namespace unique to this test (safe for `services.store` key names)."""
    name = re.sub(r"[^A-Za-z0-9_]", "_", request.node.name)[:40]
    return f"t_{name}_{uuid.uuid4().hex[:6]}"
