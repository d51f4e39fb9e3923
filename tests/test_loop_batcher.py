"""The event-loop hand-off to the model processes (`online_api.loop_batcher`): the same answers as the child
gives directly, one message each way per call and no model thread, batching by back-pressure, and a child
that dies or hangs under a call is replaced while the standby answers."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from api_support import CountingConn, TinyWorld, build_tiny_world, entry_for, started_model_process
from conftest import RedisServer

from model.onerec import DeadlineExceeded, OneRec
from model.policy import PolicyConfig, Prefix
from online_api.batching import ModelUnavailable
from online_api.loop_batcher import LoopBatcher
from online_api.model_process import ProcessModel

POLICY = PolicyConfig(beam=10, prefix_weight=0.5, own_prefixes=4, own_prefix_floor=0.0, exclude_consumed=True)
pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> TinyWorld:
    return build_tiny_world(tmp_path_factory.mktemp("tiny"))


@asynccontextmanager
async def batching(pm: ProcessModel, batch_max: int = 16) -> AsyncIterator[LoopBatcher]:
    b = LoopBatcher([pm], batch_max=batch_max, queue_max=64, admit_by_expected=False)
    b.start()
    try:
        yield b
    finally:
        await b.aclose()


def _user(world: TinyWorld, u: int) -> tuple[list[int], list[Prefix]]:
    return world.sequences[u], entry_for(world, u, n_prefixes=4).prefixes


def test_one_call_is_one_message_each_way_and_no_model_thread(world: TinyWorld, redis_server: RedisServer,
                                                               ns: str) -> None:
    local = OneRec.load(world.checkpoint)
    hist, prefixes = _user(world, 2)
    want = local.complete([hist], [prefixes], 5, POLICY, [set(hist)], None)[0]
    with started_model_process(world, redis_server.url, ns, POLICY) as pm:
        conn = CountingConn(pm._conn)
        pm._conn = conn  # type: ignore[assignment]

        async def run() -> list[tuple[int, float]]:
            async with batching(pm) as b:
                got = await b.submit("complete", hist, 5, time.perf_counter() + 5, POLICY, prefixes, set(hist))
                assert not [t for t in threading.enumerate() if t.name.startswith("onerec-model")]
                assert conn.calls == {"send": 1, "recv": 1}
                return got

        got = asyncio.run(run())
    assert [i for i, _ in got] == [i for i, _ in want]


def test_jobs_that_wait_for_a_busy_child_go_in_one_call(world: TinyWorld, redis_server: RedisServer,
                                                        ns: str) -> None:
    users = [1, 2, 3, 4, 5]
    with started_model_process(world, redis_server.url, ns, POLICY) as pm:
        conn = CountingConn(pm._conn)
        pm._conn = conn  # type: ignore[assignment]
        sizes: list[int] = []
        waits: list[float] = []

        async def run() -> list[list[tuple[int, float]]]:
            async with batching(pm) as b:
                b.on_batch = lambda kind, size, s: sizes.append(size)
                b.on_wait = waits.append
                deadline = time.perf_counter() + 5
                jobs = [b.submit("full", world.sequences[u], 5, deadline, POLICY) for u in users]
                got = list(await asyncio.gather(*jobs))
                # the first job finds the child idle and goes alone; the other four waited and go together
                assert sizes == [1, 4] and conn.calls == {"send": 2, "recv": 2}
                assert len(waits) == 5 and all(w >= 0 for w in waits)  # each job's queue wait reported once
                return got

        got = asyncio.run(run())
    assert all(len(r) == 5 for r in got)


def test_a_child_killed_under_a_call_is_replaced_and_the_standby_answers(world: TinyWorld,
                                                                        redis_server: RedisServer, ns: str) -> None:
    standby = OneRec.load(world.checkpoint)
    hist, prefixes = _user(world, 3)
    want = standby.complete([hist], [prefixes], 5, POLICY, [set(hist)], None)[0]
    with started_model_process(world, redis_server.url, ns, POLICY, standby=standby) as pm:
        first = pm.pid
        assert first is not None

        async def run() -> None:
            async with batching(pm) as b:
                os.kill(first, signal.SIGKILL)
                for _ in range(50):  # the loop sees end of file on the socket: no call, no /readyz needed
                    if pm.pid != first:
                        break
                    await asyncio.sleep(0.02)
                assert pm.pid != first
                got = await b.submit("complete", hist, 5, time.perf_counter() + 5, POLICY, prefixes, set(hist))
                assert got == want and pm.standby_calls >= 1
                for _ in range(600):  # the new child is watched as soon as a call reaches it
                    if pm.healthy:
                        break
                    await asyncio.sleep(0.1)
                calls = pm.standby_calls
                got = await b.submit("complete", hist, 5, time.perf_counter() + 5, POLICY, prefixes, set(hist))
                assert [i for i, _ in got] == [i for i, _ in want] and pm.standby_calls == calls

        asyncio.run(run())
        assert pm.pid != first and pm.restarts == 1


def test_a_hung_child_is_replaced_after_the_deadline_plus_hang_s(world: TinyWorld, redis_server: RedisServer,
                                                                 ns: str) -> None:
    hist, _ = _user(world, 1)
    with started_model_process(world, redis_server.url, ns, POLICY, hang_s=0.3) as pm:
        first = pm.pid
        assert first is not None

        async def run() -> None:
            async with batching(pm) as b:
                os.kill(first, signal.SIGSTOP)
                t0 = time.perf_counter()
                with pytest.raises(DeadlineExceeded):  # the caller's own deadline first
                    await b.submit("full", hist, 5, t0 + 0.2, POLICY)
                # no standby here: the held call fails once deadline + hang_s have passed, the child is replaced
                for _ in range(50):
                    if pm.pid != first:
                        break
                    await asyncio.sleep(0.05)
                assert pm.pid != first and time.perf_counter() - t0 < 3.0
                if pm.connection() is None:  # until the new child is up, calls fail fast (no standby here)
                    with pytest.raises(ModelUnavailable):
                        await b.submit("full", hist, 5, time.perf_counter() + 5, POLICY)
                for _ in range(600):
                    if pm.healthy:
                        break
                    await asyncio.sleep(0.1)
                got = await b.submit("full", hist, 5, time.perf_counter() + 5, POLICY)
                assert len(got) == 5

        asyncio.run(run())
