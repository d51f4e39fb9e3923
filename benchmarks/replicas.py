"""API replicas behind a real load balancer: ``python -m benchmarks.replicas``.

Two API processes (uvicorn, one worker and its model process each: the served setting) read one Redis
(a private redis-server seeded with a synthetic world, `benchmarks.scale_out.build_world` / `seed_store`)
behind HAProxy (`services.harness.LocalHAProxy`: round robin, ``GET /readyz`` every 500 ms, DOWN after 2
failed checks, 2 retries each on another replica). In one run, measured:

- ``replicas_1_max_rps`` / ``replicas_2_max_rps``: the largest offered rate (open loop,
  `benchmarks.online_load.sweep`: p99 within ``ONEREC_DEFAULT_BUDGET_MS``, no errors, >= 95% achieved, <= 1%
  degraded answers) through the balancer with the second replica in maintenance, then with both in
  rotation; ``replicas_ratio`` = 2-replica / 1-replica; each step's p50/p99, errors and load average;
- ``replica_graceful_stop_client_errors``: requests that failed at the client (no answer or not 200) while
  one replica got SIGTERM under a steady open-loop load (uvicorn finishes what it holds and exits; the
  balancer retries refused connections on the other replica);
- ``replica_kill_client_errors`` and ``replica_kill_reroute_s``: the same with SIGKILL, and seconds from
  the kill until HAProxy marks the replica DOWN (from then on every request goes to the survivor);
  ``replica_kill_errors_after_down`` counts failures of requests sent after that mark.

Every process shares this machine's cores (``cores``): the load generator, HAProxy, Redis and 2 x (API +
model process). Where they exceed the cores a second replica cannot add throughput; the ratio says what
it adds here, not on separate hosts. Not a test; prints the JSON, writes no results file.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Sequence
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

from services.harness import ROOT, LocalHAProxy, free_port, haproxy, redis_server, uvicorn_cmd, wait_http

NS = "replicas"


class Replica:
    """One API process (uvicorn + its model process) on a fixed localhost port; restartable on that port."""

    def __init__(self, env: dict[str, str], log: Path, port: int | None = None) -> None:
        self.env, self.log = env, log
        self.port = port if port is not None else free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Spawn the process (returns at once: `wait_ready`)."""
        with self.log.open("ab") as out:
            cmd = uvicorn_cmd("online_api.app:create_app", self.port)
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **self.env}, stdout=out,
                                         stderr=subprocess.STDOUT)  # fmt: skip

    def wait_ready(self, timeout_s: float) -> None:
        """Return once /readyz answers 200; RuntimeError (with the log's tail) if not in `timeout_s`."""
        try:
            wait_http(f"{self.base}/readyz", timeout_s, self.proc)
        except RuntimeError as e:
            raise RuntimeError(f"{e}\n{self.log.read_text(errors='replace')[-3000:]}") from None

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None, "replica never started"
        self.proc.send_signal(sig)

    def wait_exit(self, timeout_s: float) -> int:
        assert self.proc is not None, "replica never started"
        return self.proc.wait(timeout_s)

    def stop(self) -> None:
        """SIGINT (uvicorn drains), SIGKILL after 10 s; safe to call twice."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None


def replica_env(redis_url: str, ns: str, data_dir: Path, onerec_dir: Path, **settings: str) -> dict[str, str]:
    """Environment of an API replica on the synthetic world; `settings`: more ONEREC_* values by their names."""
    env = {"ONEREC_REDIS_URL": redis_url, "ONEREC_NAMESPACE": ns, "ONEREC_DATA_DIR": str(data_dir),
           "ONEREC_ONEREC_DIR": str(onerec_dir), "ONEREC_BEAM": "10", "PYTHONPATH": str(ROOT),
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    return env | {f"ONEREC_{k.upper()}": v for k, v in settings.items()}


def recommend_answers(base: str) -> int:
    """Recommend answers a replica has given since it started (its /metrics ``onerec_recommend_total``)."""
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return int(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("onerec_recommend_total{")))  # fmt: skip


def fault_under_load(lb: LocalHAProxy, victim: Replica, server: str, sig: signal.Signals, users: Sequence[int],
                     rate: float, workdir: Path, before_s: float = 3.0, after_s: float = 3.0,
                     down_timeout_s: float = 30.0) -> dict[str, Any]:  # fmt: skip
    """Open-loop recommends at `rate` through `lb`; after `before_s`, `sig` to `victim` (HAProxy's `server`);
    then until HAProxy marks it DOWN and the process is gone, and `after_s` more. Counts the requests that
    failed at the client (status 0: no answer; else the HTTP status) and when, relative to the signal."""
    from benchmarks.fault_load import LoadProcess

    workdir.mkdir(parents=True, exist_ok=True)
    load = LoadProcess(workdir, lb.url, users, rate, [], [], 1.0, None, None)
    load.start()
    try:
        time.sleep(before_s)
        t_sig = time.monotonic()
        victim.signal(sig)
        t_down = lb.wait_status(server, up=False, timeout_s=down_timeout_s)
        rc = victim.wait_exit(down_timeout_s)
        t_exit = time.monotonic()
        time.sleep(after_s)
    finally:
        outcomes = load.stop()
    recs = [o for o in outcomes if o.kind == "recommend"]
    failed = [o for o in recs if o.status != 200]
    return {
        "signal": sig.name, "rate": rate, "requests": len(recs),
        "requests_before_signal": sum(o.sched < t_sig for o in recs),
        "requests_signal_to_down": sum(t_sig <= o.sched < t_down for o in recs),
        "requests_after_down": sum(o.sched >= t_down for o in recs),
        "client_errors": len(failed),
        "error_kinds": dict(Counter(o.error or f"http_{o.status}" for o in failed)),
        "errors_after_down": sum(o.sched >= t_down for o in failed),
        "down_s": round(t_down - t_sig, 3),  # signal -> HAProxy says DOWN
        "exit_s": round(t_exit - t_sig, 3),  # signal -> the process is gone (SIGTERM: uvicorn drained)
        "exit_code": rc,  # -15 after a graceful SIGTERM too: uvicorn re-raises the signal once it has drained
        "last_error_s": round(max(o.done for o in failed) - t_sig, 3) if failed else None,
    }  # fmt: skip


def _steps(steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    keys = ("offered_rps", "achieved_rps", "p50_ms", "p99_ms", "errors", "error_kinds", "degraded", "load_avg_1m")
    return [{k: s.get(k) for k in keys} for s in steps]


def measure_replicas(workdir: Path, users: int = 300, items: int = 400, rates: Sequence[float] = (25, 50, 100, 150,
                     200, 250, 300, 400, 500), step_s: float = 8.0, fault_rate: float = 40.0,
                     p99_limit_ms: float | None = None, ready_timeout_s: float = 300.0) -> dict[str, Any]:  # fmt: skip
    """One synthetic world, one Redis, two API replicas behind HAProxy: the max-rate sweep with one replica in
    rotation then two, then SIGTERM and SIGKILL of a replica under `fault_rate` requests/s (module docstring)."""
    from benchmarks.online_load import run_client, sweep
    from benchmarks.scale_out import build_world, seed_store
    from services.config import get_settings
    from services.store import ThinkStore, connect

    limit = p99_limit_ms if p99_limit_ms is not None else get_settings().default_budget_ms
    out: dict[str, Any] = {"cores": os.cpu_count(), "load_avg_1m_start": round(os.getloadavg()[0], 2),
                           "p99_limit_ms": limit, "step_s": step_s}  # fmt: skip
    t_start = time.monotonic()
    workdir.mkdir(parents=True, exist_ok=True)
    world = build_world(workdir / "world", items, users)
    (workdir / "redis").mkdir(exist_ok=True)
    with redis_server(workdir / "redis") as server:
        store = ThinkStore(connect(server.url), NS)
        seed_store(store, world, 50)
        store.r.close()
        users_list = sorted(world["seqs"])
        env = replica_env(server.url, NS, world["data"], world["onerec"])
        replicas = [Replica(env, workdir / f"api{i}.log") for i in range(2)]
        try:
            for r in replicas:
                r.start()
            for r in replicas:
                r.wait_ready(ready_timeout_s)
            with haproxy([r.port for r in replicas], workdir / "haproxy") as lb:
                out["haproxy_version"] = ".".join(map(str, lb.version))
                for name in lb.server_names():
                    lb.wait_status(name, up=True, timeout_s=30)
                url = f"{lb.url}/v1/recommend"
                run_client(url, 50, 3, users_list, 10)  # warm-up, both replicas (not reported)
                with redirect_stdout(sys.stderr):  # the sweep's progress lines; stdout is the JSON
                    lb.set_state("r1", "maint")
                    best1, steps1 = sweep(url, rates, step_s, users_list, 10, limit, "1 replica")
                    lb.set_state("r1", "ready")
                    lb.wait_status("r1", up=True, timeout_s=30)
                    best2, steps2 = sweep(url, rates, step_s, users_list, 10, limit, "2 replicas")
                out |= {"replicas_1_max_rps": best1, "replicas_2_max_rps": best2,
                        "replicas_ratio": round(best2 / best1, 3) if best1 else None,
                        "replicas_1_steps": _steps(steps1), "replicas_2_steps": _steps(steps2)}  # fmt: skip
                graceful = fault_under_load(lb, replicas[1], "r1", signal.SIGTERM, users_list, fault_rate,
                                            workdir / "graceful")  # fmt: skip
                replicas[1].start()  # back on its port; HAProxy's checks put it in rotation again
                replicas[1].wait_ready(ready_timeout_s)
                lb.wait_status("r1", up=True, timeout_s=30)
                kill = fault_under_load(lb, replicas[1], "r1", signal.SIGKILL, users_list, fault_rate,
                                        workdir / "kill")  # fmt: skip
                out |= {
                    "replica_graceful_stop_client_errors": graceful["client_errors"],
                    "replica_kill_client_errors": kill["client_errors"],
                    "replica_kill_reroute_s": kill["down_s"],
                    "replica_kill_errors_after_down": kill["errors_after_down"],
                    "replica_graceful_stop": graceful, "replica_kill": kill,
                }  # fmt: skip
        finally:
            for r in replicas:
                r.stop()
    out["wall_s"] = round(time.monotonic() - t_start, 1)
    out["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.replicas", description=__doc__.split("\n")[0])
    p.add_argument("--users", type=int, default=300, help="users of the synthetic world (requested in turn)")
    p.add_argument("--items", type=int, default=400, help="catalogue size of the synthetic world")
    p.add_argument("--rates", type=lambda s: [float(x) for x in s.split(",")],
                   default=[25, 50, 100, 150, 200, 250, 300, 400, 500],
                   help="offered rates of each sweep (comma-separated, increasing; a sweep stops at the first miss)")
    p.add_argument("--step-s", type=float, default=8.0, help="seconds per sweep step")
    p.add_argument("--fault-rate", type=float, default=40.0, help="requests/s while a replica is stopped or killed")
    p.add_argument("--p99-limit-ms", type=float, default=None,
                   help="a sweep rate passes with p99 at most this (default: the API's ONEREC_DEFAULT_BUDGET_MS)")
    p.add_argument("--workdir", type=Path, default=None, help="keep logs and the world here (default: a temp dir)")
    args = p.parse_args(argv)
    kwargs: dict[str, Any] = {"users": args.users, "items": args.items, "rates": args.rates, "step_s": args.step_s,
                              "fault_rate": args.fault_rate, "p99_limit_ms": args.p99_limit_ms}  # fmt: skip
    if args.workdir is not None:
        out = measure_replicas(args.workdir, **kwargs)
    else:
        with tempfile.TemporaryDirectory(prefix="replicas_") as tmp:
            out = measure_replicas(Path(tmp), **kwargs)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
