"""The online model in a child process: same answers as in-process, errors and deadlines cross the pipe,
a killed child is replaced while the API answers by fallback, and the app serves through it."""

from __future__ import annotations

import gc
import math
import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import redis
from api_support import (
    TinyWorld,
    build_tiny_world,
    entry_for,
    make_settings,
    publish_entry,
    running_app,
    started_model_process,
    wait_ready,
)
from conftest import RedisServer

from model.onerec import DeadlineExceeded, OneRec
from model.policy import PolicyConfig
from online_api.batching import ModelUnavailable
from online_api.model_process import ProcessModel
from services.store import ThinkStore

POLICY = PolicyConfig(beam=10, prefix_weight=0.5, own_prefixes=4, own_prefix_floor=0.0, exclude_consumed=True)
pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> TinyWorld:
    return build_tiny_world(tmp_path_factory.mktemp("tiny"))


def _inputs(world: TinyWorld) -> tuple[list[list[int]], list[list[tuple[int, int, float]]], list[set[int]]]:
    users = [1, 2, 3]
    hists = [world.sequences[u] for u in users]
    prefixes = [entry_for(world, u, n_prefixes=4).prefixes for u in users]
    return hists, prefixes, [set(h) for h in hists]


@contextmanager
def started(world: TinyWorld, redis_url: str, ns: str, **kw: Any) -> Iterator[ProcessModel]:
    """A started `ProcessModel` on the tiny checkpoint with this file's policy (fast restarts), closed afterwards."""
    with started_model_process(world, redis_url, ns, POLICY, **kw) as pm:
        yield pm


def _signal_child(pm: ProcessModel, sig: int) -> int:
    pid = pm.pid
    assert pid is not None and pid != os.getpid()
    os.kill(pid, sig)
    return pid


def _wait(cond: object, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_child_answers_like_the_in_process_model(world: TinyWorld, redis_server: RedisServer, ns: str) -> None:
    local = OneRec.load(world.checkpoint)
    hists, prefixes, excl = _inputs(world)
    with started(world, redis_server.url, ns) as pm:
        assert pm.healthy and pm.pid not in (None, os.getpid())
        got = pm.complete(hists, prefixes, 5, POLICY, excl, None)
        want = local.complete(hists, prefixes, 5, POLICY, excl, None)
        assert [[i for i, _ in r] for r in got] == [[i for i, _ in r] for r in want]
        assert all(math.isclose(a, b, abs_tol=1e-5) for g, w in zip(got, want, strict=True)
                   for (_, a), (_, b) in zip(g, w, strict=True))
        full = pm.decode_full(hists, 5, 10, excl)
        assert [[i for i, _ in r] for r in full] == [[i for i, _ in r] for r in local.decode_full(hists, 5, 10, excl)]
        # the child checks the caller's deadline (a perf_counter value, system-wide) and its errors come back
        with pytest.raises(DeadlineExceeded):
            pm.decode_full(hists, 5, 10, excl, deadline=time.perf_counter() - 1.0)
        with pytest.raises(ValueError, match="beam"):
            pm.decode_full(hists, 5, 2)
        assert pm.decode_full(hists, 5, 10) != []  # still serving after errors
    assert not pm.healthy


def test_standby_answers_while_the_child_restarts(world: TinyWorld, redis_server: RedisServer, ns: str) -> None:
    hists, prefixes, excl = _inputs(world)
    standby = OneRec.load(world.checkpoint)
    want = standby.complete(hists, prefixes, 5, POLICY, excl, None)
    with started(world, redis_server.url, ns, standby=standby) as pm:
        _signal_child(pm, signal.SIGKILL)
        assert pm.complete(hists, prefixes, 5, POLICY, excl, None) == want  # the call that finds it dead
        assert pm.standby_calls >= 1
        _wait(lambda: pm.healthy, 60)
        calls = pm.standby_calls
        assert pm.complete(hists, prefixes, 5, POLICY, excl, None) == want and pm.standby_calls == calls


def test_killed_child_is_replaced(world: TinyWorld, redis_server: RedisServer, ns: str) -> None:
    hists, _, _ = _inputs(world)
    with started(world, redis_server.url, ns) as pm:
        first = _signal_child(pm, signal.SIGKILL)
        with pytest.raises(ModelUnavailable):
            pm.decode_full(hists, 5, 10)  # the call that finds it dead (no standby here)
        _wait(lambda: pm.healthy, 60)
        assert pm.pid != first and pm.restarts == 1
        assert len(pm.decode_full(hists, 5, 10)) == 3


def test_child_dead_while_idle_is_replaced(world: TinyWorld, redis_server: RedisServer, ns: str) -> None:
    """No call needed: asking `healthy` (what /readyz does) notices the dead child and starts a new one."""
    with started(world, redis_server.url, ns) as pm:
        first = _signal_child(pm, signal.SIGKILL)
        _wait(lambda: pm.healthy and pm.pid != first, 60)  # `healthy` first: it is what notices
        assert pm.restarts == 1


def test_hung_child_is_replaced(world: TinyWorld, redis_server: RedisServer, ns: str) -> None:
    """A stopped (hung) child does not block the batcher: past the deadline + hang_s it is killed and replaced."""
    hists, _, _ = _inputs(world)
    with started(world, redis_server.url, ns, hang_s=0.3) as pm:
        first = _signal_child(pm, signal.SIGSTOP)
        t0 = time.perf_counter()
        with pytest.raises(ModelUnavailable, match="hangs"):
            pm.decode_full(hists, 5, 10, deadline=t0 + 0.2)
        assert time.perf_counter() - t0 < 2.0  # deadline 0.2 s + hang_s 0.3 s, not forever
        _wait(lambda: pm.healthy, 60)
        assert pm.pid != first and len(pm.decode_full(hists, 5, 10)) == 3


def test_missing_checkpoint_fails_start(world: TinyWorld, redis_server: RedisServer, ns: str, tmp_path) -> None:
    settings = make_settings(world, redis_server.url, ns, model_process=True)
    pm = ProcessModel(tmp_path / "nothing", settings, POLICY)
    with pytest.raises(RuntimeError, match="no OneRec checkpoint"):
        pm.start()
    assert not pm.healthy


def test_app_serves_through_the_child_and_survives_its_death(world: TinyWorld, redis_server: RedisServer,
                                                            redis_client: redis.Redis, ns: str) -> None:
    user = 4
    publish_entry(redis_client, ns, world, user)
    with running_app(make_settings(world, redis_server.url, ns, model_process=True)) as c:
        assert c.post("/v1/recommend", json={"user_id": user}).json()["source"] == "think-ahead"
        assert gc.get_freeze_count() > 0  # the start-up heap is out of the collector's sight
        proc = c.app.state.svc.loaded.process  # type: ignore[attr-defined]
        assert proc is not None and proc.pid != os.getpid()
        os.kill(proc.pid, signal.SIGKILL)
        # the standby copy in the API process answers until the new child is up: still personalised
        body = c.post("/v1/recommend", json={"user_id": user, "k": 5}).json()
        assert body["source"] == "think-ahead" and body["degraded"] is False and len(body["items"]) == 5
        standby = [ln for ln in c.get("/metrics").text.splitlines() if ln.startswith("onerec_model_standby_calls ")]
        assert len(standby) == 1 and float(standby[0].split()[1]) >= 1
        wait_ready(c, 60)  # /readyz is 503 until the new child has loaded and warmed up
        assert c.post("/v1/recommend", json={"user_id": user}).json()["source"] == "think-ahead"
        assert "onerec_model_process_restarts 1.0" in c.get("/metrics").text
    assert not proc.healthy  # the app's shutdown stopped the child


def test_two_model_processes_share_the_queue(world: TinyWorld, redis_server: RedisServer,
                                             redis_client: redis.Redis, ns: str) -> None:
    """ONEREC_MODEL_PROCESSES=2: two children, one batcher thread each on the same queue; both answer."""
    store = ThinkStore(redis_client, ns)
    store.begin_version("v1", {"model": "think-test"})
    store.write_entries("v1", {u: entry_for(world, u) for u in range(1, 9)}, 3600)
    store.publish("v1", 8)
    store.write_histories({u: world.sequences[u] for u in range(1, 9)}, 50)
    with running_app(make_settings(world, redis_server.url, ns, model_process=True, model_processes=2)) as c:
        loaded = c.app.state.svc.loaded  # type: ignore[attr-defined]
        pids = {p.pid for p in loaded.processes}
        assert len(pids) == 2 and os.getpid() not in pids
        batcher = c.app.state.svc.batcher  # type: ignore[attr-defined]
        assert len(batcher.models) == 2 and batcher.running
        bodies = [c.post("/v1/recommend", json={"user_id": u}).json() for u in range(1, 9)]
        assert all(b["source"] == "think-ahead" for b in bodies)
        os.kill(loaded.processes[1].pid, signal.SIGKILL)  # the other child and the standby carry on
        bodies = [c.post("/v1/recommend", json={"user_id": u}).json() for u in range(1, 9)]
        assert all(b["source"] == "think-ahead" and not b["degraded"] for b in bodies)
        wait_ready(c, 60)
    assert not any(p.healthy for p in loaded.processes)
