"""The harness that tests, benchmarks and the demo start their processes with, written once.

- `free_port()`: a free localhost TCP port;
- `RedisServer` / `redis_server()`: a private redis-server on a free port and a data folder of its own, that
  can be stopped, signalled (SIGKILL, SIGSTOP) and restarted on the same port; persistence off unless ``aof``;
- `LocalRedisCluster` / `redis_cluster()`: a real Redis Cluster of such servers (3 primaries + 3 replicas by
  default, short node timeout so a killed primary's replica takes over in about a second), its
  ``redis+cluster://`` URL, and which node serves a key;
- `uvicorn_cmd()` + `process()`: the API (or any ASGI factory) as a uvicorn child process that is always
  stopped; `serve_in_thread()`: an ASGI app under a real uvicorn server in a thread of this process;
- `wait_http()`: wait until a URL answers 200 (or the server died);
- `LocalHAProxy` / `haproxy()`: a real HAProxy in front of local HTTP servers (the API replicas): round robin,
  health checks on ``/readyz``, retries and redispatch, and its admin socket to read each server's state
  (when a killed replica is marked DOWN) or put one in maintenance;
- `percentile()`: the one percentile every latency number of the benchmarks is read with.

What it is not: part of the served system (no module of `model`, `offline_worker` or `online_api` imports
it) and not a fixture library (tests/conftest.py wraps it in pytest fixtures). It sits in `services`, the
bottom layer, so it imports no torch, model or vLLM code; `serve_in_thread` takes any ASGI app, so it never
imports the API either.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import os
import re
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
from redis.crc import key_slot

from services.config import ROOT

PY = sys.executable  # child processes run on this interpreter (the project's venv)
HOST = "127.0.0.1"


def free_port() -> int:
    """A TCP port on localhost that nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def free_cluster_port() -> int:
    """A free port for a cluster-mode redis-server: at most 55535, with its cluster bus port (+10000) free too."""
    for _ in range(1000):
        port = free_port()
        if port > 55535:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((HOST, port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair (p, p + 10000) below 55536")


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


def terminate(proc: subprocess.Popen[bytes], grace_s: float = 5.0) -> None:
    """SIGTERM a child that still runs, SIGKILL it after `grace_s`; always reaped."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=grace_s)


class RedisServer:
    """A redis-server subprocess on a fixed localhost port and data folder, restartable on both.

    ``aof=True`` turns on the append-only file with an fsync on every write, so what the server acknowledged
    survives a SIGKILL (the fault benchmark); otherwise nothing is persisted.
    """

    def __init__(self, workdir: Path, port: int | None = None, aof: bool = False, binary: str | None = None,
                 start_timeout_s: float = 10.0, extra_args: Sequence[str] = ()) -> None:  # fmt: skip
        self.workdir = Path(workdir)
        self.port = port if port is not None else free_port()
        self.host = HOST
        self.aof = aof
        self.binary = binary or find_redis_server()
        self.start_timeout_s = start_timeout_s
        self.extra_args = list(extra_args)  # e.g. cluster mode
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
               "--dir", str(self.workdir), "--logfile", str(self.log), *self.extra_args]  # fmt: skip
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
        terminate(self.proc)
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


# --------------------------------------------------------------------------- Redis Cluster


def find_redis_cli() -> str:
    """The redis-cli binary (creates the cluster); FileNotFoundError saying how to install it."""
    path = shutil.which("redis-cli") or ("/usr/bin/redis-cli" if Path("/usr/bin/redis-cli").is_file() else None)
    if path is None:
        raise FileNotFoundError("redis-cli not found on PATH or at /usr/bin/redis-cli; install it (apt-get install "
                                "redis-tools)")  # fmt: skip
    return path


class LocalRedisCluster:
    """A real Redis Cluster on localhost: `primaries` x (1 + `replicas`) `RedisServer`s in cluster mode, each in
    its own folder, joined with ``redis-cli --cluster create``.

    ``node_timeout_ms`` is Redis's ``cluster-node-timeout``: a primary unreachable that long is marked failed and
    its replica promoted (about 1-2 s with the default 1000 ms). Replicas may always fail over
    (``cluster-replica-validity-factor 0``), so a replica that missed a few pings still takes over.
    """

    def __init__(self, workdir: Path, primaries: int = 3, replicas: int = 1, node_timeout_ms: int = 1000,
                 start_timeout_s: float = 30.0) -> None:  # fmt: skip
        if primaries < 3:
            raise ValueError(f"primaries: Redis Cluster needs at least 3, got {primaries}")
        self.workdir = Path(workdir)
        self.start_timeout_s = start_timeout_s
        args = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", str(node_timeout_ms), "--cluster-replica-validity-factor", "0"]
        self.nodes: list[RedisServer] = []
        for i in range(primaries * (1 + replicas)):
            folder = self.workdir / f"node{i}"
            folder.mkdir(parents=True, exist_ok=True)
            self.nodes.append(RedisServer(folder, port=free_cluster_port(), extra_args=args))
        self.replicas = replicas

    @property
    def url(self) -> str:
        """``redis+cluster://`` URL naming every node (a client needs one that answers to find the others)."""
        return "redis+cluster://" + ",".join(f"{n.host}:{n.port}" for n in self.nodes)

    def start(self) -> None:
        """Start every node, create the cluster and return once every live node says ``cluster_state:ok`` and
        every replica is in sync with its primary."""
        for n in self.nodes:
            n.start()
        cmd = [find_redis_cli(), "--cluster", "create", *(f"{n.host}:{n.port}" for n in self.nodes),
               "--cluster-replicas", str(self.replicas), "--cluster-yes"]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=self.start_timeout_s)
        if done.returncode != 0:
            self.stop()
            raise RuntimeError(f"redis-cli --cluster create failed ({done.returncode}):\n{done.stdout[-2000:]}"
                               f"{done.stderr[-2000:]}")  # fmt: skip
        self.wait_ok(self.start_timeout_s)

    def _client(self, node: RedisServer) -> redis.Redis:
        return redis.Redis(host=node.host, port=node.port, socket_timeout=1, socket_connect_timeout=1)

    def wait_ok(self, timeout_s: float) -> float:
        """Wait until every running node reports ``cluster_state:ok``, knows the same primaries, and every running
        replica's link to its primary is up; returns the seconds waited (RuntimeError after `timeout_s`)."""
        t0 = time.monotonic()
        while True:
            try:
                if self._all_ok():
                    return time.monotonic() - t0
            except redis.RedisError:
                pass
            if time.monotonic() - t0 > timeout_s:
                raise RuntimeError(f"redis cluster not ok after {timeout_s}s (nodes {[n.port for n in self.nodes]})")
            time.sleep(0.05)

    def _all_ok(self) -> bool:
        views = set()
        for n in self.nodes:
            if not n.running:
                continue
            c = self._client(n)
            try:
                if c.cluster("info")["cluster_state"] != "ok":
                    return False
                info = c.info("replication")
                if info["role"] == "slave" and info.get("master_link_status") != "up":
                    return False
                views.add(tuple(sorted(self._primary_ports(c))))
            finally:
                c.close()
        return len(views) == 1

    def _primary_ports(self, client: redis.Redis) -> list[int]:
        """Ports of the primaries serving slots, as `client`'s node sees them (failed ones excluded)."""
        nodes: dict[str, dict[str, Any]] = client.cluster("nodes")  # "host:port" -> parsed CLUSTER NODES line
        return [int(addr.split("@")[0].rsplit(":", 1)[1]) for addr, node in nodes.items()
                if "master" in node["flags"] and "fail" not in node["flags"] and node["slots"]]  # fmt: skip

    def primaries(self) -> list[RedisServer]:
        """The running nodes that are primaries serving slots now."""
        live = next(n for n in self.nodes if n.running)
        c = self._client(live)
        try:
            ports = set(self._primary_ports(c))
        finally:
            c.close()
        return [n for n in self.nodes if n.port in ports and n.running]

    def node_of(self, key: str | bytes) -> RedisServer:
        """The running primary that serves `key`'s slot now."""
        slot = key_slot(key.encode() if isinstance(key, str) else key)
        live = next(n for n in self.nodes if n.running)
        c = self._client(live)
        try:
            for start, end, primary, *_ in c.execute_command("CLUSTER SLOTS"):
                if int(start) <= slot <= int(end):
                    port = int(primary[1])
                    return next(n for n in self.nodes if n.port == port)
        finally:
            c.close()
        raise RuntimeError(f"no node serves slot {slot}")

    def stop(self) -> None:
        """Stop every node (safe to call twice): SIGTERM to all at once, then each is waited for (SIGKILL when it
        does not go), so that a slow machine leaves no node behind."""
        for n in self.nodes:
            if n.running and n.proc is not None:
                n.proc.send_signal(signal.SIGCONT)
                n.proc.terminate()
        for n in self.nodes:
            try:
                n.stop()
            except subprocess.TimeoutExpired:
                if n.proc is not None:
                    n.proc.kill()
                    n.proc = None


@contextmanager
def redis_cluster(workdir: Path | None = None, primaries: int = 3, replicas: int = 1,
                  node_timeout_ms: int = 1000) -> Iterator[LocalRedisCluster]:  # fmt: skip
    """A started `LocalRedisCluster` (in a temporary folder unless `workdir`), stopped on exit."""
    with tempfile.TemporaryDirectory(prefix="onerec-cluster-") as tmp:
        cluster = LocalRedisCluster(Path(workdir) if workdir is not None else Path(tmp), primaries, replicas,
                                    node_timeout_ms)  # fmt: skip
        try:
            cluster.start()
            yield cluster
        finally:
            cluster.stop()


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


# --------------------------------------------------------------------------- HAProxy


def find_haproxy() -> str:
    """The haproxy binary: PATH, else /usr/sbin/haproxy; FileNotFoundError saying how to install it."""
    path = shutil.which("haproxy") or ("/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").is_file() else None)
    if path is None:
        raise FileNotFoundError("haproxy not found on PATH or at /usr/sbin/haproxy; install it (apt-get install "
                                "haproxy; scripts/setup.sh does)")  # fmt: skip
    return path


def haproxy_version(binary: str) -> tuple[int, int]:
    """(major, minor) of `binary` from ``haproxy -v`` ("HAProxy version 2.6.12-1 ...", "HA-Proxy version 1.8...")."""
    out = subprocess.run([binary, "-v"], capture_output=True, text=True, timeout=10).stdout
    m = re.search(r"version (\d+)\.(\d+)", out)
    if m is None:
        raise RuntimeError(f"cannot read the version of {binary}: {out[:200]!r}")
    return int(m.group(1)), int(m.group(2))


def _duration(ms: float) -> str:
    """An HAProxy time: whole seconds as ``10s``, else milliseconds (``500ms``)."""
    return f"{int(ms) // 1000}s" if ms >= 1000 and int(ms) % 1000 == 0 else f"{int(ms)}ms"


class LocalHAProxy:
    """HAProxy (``haproxy -f CFG -db``, a child process) on a free localhost port in front of `backends`
    (localhost ports), servers named ``r0``, ``r1``, ... in the backend ``replicas``.

    The served setting of `deploy/haproxy.cfg`, with static servers instead of Docker's DNS: round robin,
    ``GET /readyz`` every `inter_ms` (a server is DOWN after `fall` failed checks, UP again after `rise`
    good ones), `retries` on connection failures, empty responses and response timeouts (HAProxy 2.0+; before
    that connection failures only), each retry on another server (``option redispatch 1``). ``POST /v1/events``
    is only retried when it was never sent: the API names each append itself, so a replayed one would
    append twice. `servers()` reads the admin socket (``show stat``); `set_state()` drains or stops a server.
    """

    BACKEND = "replicas"

    def __init__(self, workdir: Path, backends: Sequence[int], port: int | None = None, balance: str = "roundrobin",
                 inter_ms: int = 500, fall: int = 2, rise: int = 2, retries: int = 2, check_timeout_ms: int = 2000,
                 server_timeout_s: float = 10.0, binary: str | None = None,
                 start_timeout_s: float = 10.0) -> None:  # fmt: skip
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.backends = list(backends)
        self.port = port if port is not None else free_port()
        self.binary = binary or find_haproxy()
        self.version = haproxy_version(self.binary)
        self.balance, self.inter_ms, self.fall, self.rise = balance, inter_ms, fall, rise
        self.retries, self.check_timeout_ms, self.server_timeout_s = retries, check_timeout_ms, server_timeout_s
        self.start_timeout_s = start_timeout_s
        self.config_path, self.log = self.workdir / "haproxy.cfg", self.workdir / "haproxy.log"
        sock = self.workdir / "haproxy.sock"
        if len(str(sock)) > 100:  # AF_UNIX paths are limited to 108 bytes
            sock = Path(tempfile.mkdtemp(prefix="haproxy-")) / "admin.sock"
        self.socket_path = sock
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def server_names(self) -> list[str]:
        return [f"r{i}" for i in range(len(self.backends))]

    def config(self) -> str:
        """The configuration file's text."""
        retry_on = "    retry-on conn-failure empty-response response-timeout\n" if self.version >= (2, 0) else ""
        no_replay = ("    http-request disable-l7-retry if { path_beg /v1/events }\n"
                     if self.version >= (2, 0) else "")  # fmt: skip
        servers = "".join(f"    server {name} {HOST}:{port} check\n"
                          for name, port in zip(self.server_names(), self.backends, strict=True))  # fmt: skip
        return (
            "global\n"
            "    maxconn 4096\n"
            f"    stats socket {self.socket_path} mode 600 level admin\n"
            "defaults\n"
            "    mode http\n"
            "    timeout connect 1s\n"
            "    timeout client 30s\n"
            f"    timeout server {_duration(self.server_timeout_s * 1000)}\n"
            f"    timeout check {_duration(self.check_timeout_ms)}\n"
            f"    retries {self.retries}\n"
            "    option redispatch 1\n"
            f"{retry_on}"
            "frontend api\n"
            f"    bind {HOST}:{self.port}\n"
            f"    default_backend {self.BACKEND}\n"
            f"backend {self.BACKEND}\n"
            f"    balance {self.balance}\n"
            "    option httpchk GET /readyz\n"
            "    http-check expect status 200\n"
            f"{no_replay}"
            f"    default-server inter {_duration(self.inter_ms)} fall {self.fall} rise {self.rise}\n"
            f"{servers}"
        )

    def start(self) -> None:
        """Write the configuration, check it (``haproxy -c``), start HAProxy and return once its port accepts
        connections (the servers may still be DOWN: `wait_status`)."""
        if self.running:
            return
        self.config_path.write_text(self.config())
        check = subprocess.run([self.binary, "-c", "-q", "-f", str(self.config_path)], capture_output=True,
                               text=True, timeout=30)  # fmt: skip
        if check.returncode != 0:
            raise RuntimeError(f"haproxy refused {self.config_path}:\n{check.stdout[-2000:]}{check.stderr[-2000:]}")
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen([self.binary, "-f", str(self.config_path), "-db"], stdout=out,
                                         stderr=subprocess.STDOUT)  # fmt: skip
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"haproxy exited with {self.proc.returncode}:\n{self.log.read_text()[-2000:]}")
            try:
                socket.create_connection((HOST, self.port), timeout=0.5).close()
                return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"haproxy did not accept on port {self.port} in {self.start_timeout_s}s")
            time.sleep(0.02)

    def command(self, line: str) -> str:
        """One command on the admin socket (``show stat``, ``set server ...``); its answer."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5.0)
            s.connect(str(self.socket_path))
            s.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def stats(self) -> dict[str, dict[str, str]]:
        """``show stat`` of the backend's servers: name -> the CSV row (``status``: UP, DOWN, "UP 1/2" going
        down, "DOWN 1/2" coming up, MAINT, DRAIN; ``hrsp_2xx``, ``stot``, ``chkfail``, ... as text)."""
        text = self.command("show stat").lstrip("# ")
        rows = csv.DictReader(io.StringIO(text))
        return {r["svname"]: r for r in rows
                if r["pxname"] == self.BACKEND and r["svname"] not in ("FRONTEND", "BACKEND")}  # fmt: skip

    def servers(self) -> dict[str, str]:
        """Each server's state: name -> ``status`` of `stats`."""
        return {name: row["status"] for name, row in self.stats().items()}

    def wait_status(self, server: str, up: bool, timeout_s: float, poll_s: float = 0.01) -> float:
        """Wait until `server` is UP with its last `rise` checks good (status exactly ``UP``; a server starts,
        or leaves maintenance, as "UP 1/2": in rotation but never checked) or, `up` False, out of rotation
        by its checks (a DOWN status); returns the time.monotonic() it was seen (RuntimeError after
        `timeout_s`)."""
        deadline = time.monotonic() + timeout_s
        while True:
            status = self.servers()[server]
            if (status == "UP") if up else status.startswith("DOWN"):
                return time.monotonic()
            if time.monotonic() > deadline:
                raise RuntimeError(f"haproxy server {server} still {status!r} after {timeout_s}s "
                                   f"(wanted {'UP' if up else 'DOWN'})")  # fmt: skip
            time.sleep(poll_s)

    def set_state(self, server: str, state: str) -> None:
        """``ready``, ``drain`` (no new requests, health checks go on) or ``maint`` (out of rotation)."""
        if state not in ("ready", "drain", "maint"):
            raise ValueError(f"state: ready, drain or maint, not {state!r}")
        answer = self.command(f"set server {self.BACKEND}/{server} state {state}").strip()
        if answer:
            raise RuntimeError(f"haproxy: set server {server} state {state}: {answer}")

    def stop(self) -> None:
        """Stop HAProxy (SIGTERM, SIGKILL after 5 s); safe to call twice."""
        if self.proc is None:
            return
        terminate(self.proc)
        self.proc = None


@contextmanager
def haproxy(backends: Sequence[int], workdir: Path | None = None, **options: Any) -> Iterator[LocalHAProxy]:
    """A started `LocalHAProxy` in front of the localhost ports `backends` (in a temporary folder unless
    `workdir`; `options`: its keyword arguments), stopped on exit."""
    with tempfile.TemporaryDirectory(prefix="onerec-haproxy-") as tmp:
        proxy = LocalHAProxy(Path(workdir) if workdir is not None else Path(tmp), backends, **options)
        proxy.start()
        try:
            yield proxy
        finally:
            proxy.stop()
