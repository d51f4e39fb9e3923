"""Two API replicas (real uvicorn processes, each with its model process) behind a real HAProxy.

The balancer (`services.harness.LocalHAProxy`) spreads requests over both replicas (each replica's
/metrics counts what it answered); a replica stopped with SIGTERM under a steady trickle of requests costs
no client error (uvicorn finishes what it holds and closes its port; HAProxy retries refused connections on
the other replica); one killed with SIGKILL is marked DOWN by the health checks within about
``fall`` x ``inter`` (2 x 500 ms), at most the requests it was sent meanwhile fail, none after the DOWN
mark, and the survivor answers everything. Skipped, with the reason, only where haproxy is not installed
(scripts/setup.sh installs it).
"""

from __future__ import annotations

import json
import signal
import urllib.request
from pathlib import Path

import pytest
import redis
from api_support import build_tiny_world, entry_for

from benchmarks.replicas import Replica, fault_under_load, recommend_answers, replica_env
from services.harness import RedisServer, find_haproxy, haproxy
from services.store import ThinkStore

pytestmark = pytest.mark.slow

RATE = 20.0  # requests/s of the trickle while a replica goes away


@pytest.fixture(scope="module")
def haproxy_binary() -> str:
    try:
        return find_haproxy()
    except FileNotFoundError as e:
        pytest.skip(f"{e}; scripts/setup.sh could not install it here")


def recommend(base: str, user: int) -> dict:
    req = urllib.request.Request(f"{base}/v1/recommend", data=json.dumps({"user_id": user, "k": 5}).encode(),
                                 headers={"content-type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 200
        return dict(json.loads(resp.read()))


def test_replicas_behind_haproxy(haproxy_binary: str, redis_server: RedisServer, redis_client: redis.Redis, ns: str,
                                 tmp_path: Path) -> None:  # fmt: skip
    world = build_tiny_world(tmp_path / "world")
    store = ThinkStore(redis_client, ns)
    users = sorted(world.sequences)
    store.begin_version("v1", {"model": "think-test"})
    store.write_entries("v1", {u: entry_for(world, u) for u in users}, 3600)
    store.publish("v1", len(users))
    store.write_histories(world.sequences, 50)
    # a generous budget: this is about where requests go, not how fast a shared CI machine answers them
    env = replica_env(redis_server.url, ns, world.data_dir, world.checkpoint, default_budget_ms="2000")
    replicas = [Replica(env, tmp_path / f"api{i}.log") for i in range(2)]
    try:
        for r in replicas:
            r.start()
        for r in replicas:
            r.wait_ready(180)
        with haproxy([r.port for r in replicas], tmp_path / "haproxy", binary=haproxy_binary) as lb:
            for name in ("r0", "r1"):
                lb.wait_status(name, up=True, timeout_s=30)

            # both replicas answer requests sent to the balancer (round robin: one each in turn)
            before = [recommend_answers(r.base) for r in replicas]
            for u in users[:20]:
                assert recommend(lb.url, u)["source"] == "think-ahead"
            served = [recommend_answers(r.base) - b for r, b in zip(replicas, before, strict=True)]
            assert sum(served) == 20 and min(served) >= 5, served

            # SIGTERM under a trickle: uvicorn drains, HAProxy retries elsewhere: no client error
            graceful = fault_under_load(lb, replicas[1], "r1", signal.SIGTERM, users, RATE, tmp_path / "graceful",
                                        before_s=2.0, after_s=2.0)  # fmt: skip
            assert graceful["requests_before_signal"] > 0 and graceful["requests_after_down"] > 0, graceful
            assert graceful["client_errors"] == 0, graceful

            # the stopped replica comes back on its port and into rotation by its health checks
            replicas[1].start()
            replicas[1].wait_ready(180)
            lb.wait_status("r1", up=True, timeout_s=30)

            # SIGKILL the other one under a trickle: DOWN within fall x inter (+ slack for a busy machine); at
            # most what it was sent before the mark fails, nothing after; the survivor answers everything
            survivor_before = recommend_answers(replicas[1].base)
            kill = fault_under_load(lb, replicas[0], "r0", signal.SIGKILL, users, RATE, tmp_path / "kill",
                                    before_s=2.0, after_s=2.0)  # fmt: skip
            print(f"\nSIGTERM: {graceful}\nSIGKILL: {kill}")
            assert kill["requests_before_signal"] > 0 and kill["requests_after_down"] > 0, kill
            assert kill["down_s"] < 5.0, kill
            assert kill["errors_after_down"] == 0, kill
            assert kill["client_errors"] <= kill["requests_signal_to_down"] // 2 + 2, kill
            assert recommend_answers(replicas[1].base) - survivor_before >= kill["requests_after_down"]
            assert lb.servers() == {"r0": "DOWN", "r1": "UP"}
    finally:
        for r in replicas:
            r.stop()
