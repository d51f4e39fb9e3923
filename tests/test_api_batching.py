"""Micro-batcher (fake model, no torch work) and the pure helpers of `online_api.complete`; think-ahead eval."""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Sequence

import pytest
from api_support import TinyWorld, build_tiny_world

from evaluation.think_ahead import OneRecPrefixSource, ThinkAheadRecommender, staler
from model.onerec import DeadlineExceeded, OneRec
from model.policy import PolicyConfig, Popularity
from online_api.batching import BelowExpected, MicroBatcher, Overloaded
from online_api.complete import RedisBreaker, entry_lag, merge_history
from services.catalog import Example
from services.config import Settings
from services.store import ThinkEntry

pytestmark = pytest.mark.timeout(60)
def policy(**over: object) -> PolicyConfig:
    """The served policy (Settings defaults) with `over` on top."""
    return PolicyConfig.from_settings(Settings(), **over)


POLICY = policy(beam=4)  # what these batchers' jobs carry (the API builds its one policy the same way)


class FakeModel:
    """Echoes the history back as items; records batch sizes and the calling thread."""

    def __init__(self, delay_s: float = 0.0, gate: threading.Event | None = None) -> None:
        self.delay_s = delay_s
        self.gate = gate
        self.calls: list[tuple[str, int, int, int]] = []  # (kind, batch, k, beam)
        self.threads: set[str] = set()

    def _run(self, kind: str, histories: Sequence[Sequence[int]], k: int, beam: int,
             deadline: float | None) -> list[list[tuple[int, float]]]:
        self.threads.add(threading.current_thread().name)
        self.calls.append((kind, len(histories), k, beam))
        if self.gate is not None:
            self.gate.wait(5)
        time.sleep(self.delay_s)
        if deadline is not None and time.perf_counter() > deadline:
            raise DeadlineExceeded("fake")
        return [[(i, -float(n)) for n, i in enumerate(h)][:k] for h in histories]

    def decode_full(self, histories, k, beam, exclude=None, deadline=None):  # type: ignore[no-untyped-def]
        return self._run("full", histories, k, beam, deadline)

    def complete(self, histories, prefixes, k, policy, exclude=None, deadline=None):  # type: ignore[no-untyped-def]
        assert all(prefixes)
        return self._run("complete", histories, k, policy.beam_for(k), deadline)


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def test_concurrent_requests_are_batched_off_the_loop() -> None:
    model = FakeModel(delay_s=0.02)
    b = MicroBatcher.from_settings(model, Settings(beam=4, batch_max=8, batch_wait_ms=2.0))
    b.start()
    try:
        async def go() -> list:
            dl = time.perf_counter() + 5
            return await asyncio.gather(*(b.submit("full", [u, u + 1, u + 2], 2, dl, POLICY) for u in range(20)),
                                        b.submit("complete", [7], 1, dl, POLICY, prefixes=[(0, 0, 0.0)]))
        out = run(go())
    finally:
        b.stop()
    assert out[:20] == [[(u, 0.0), (u + 1, -1.0)] for u in range(20)] and out[20] == [(7, 0.0)]
    assert model.threads == {"onerec-model"}
    sizes = [n for kind, n, _, _ in model.calls if kind == "full"]
    assert sum(sizes) == 20 and max(sizes) <= 8 and len(sizes) < 20  # batched, bounded
    assert all(beam == 4 for *_, beam in model.calls)  # the jobs' policy reached the model


def test_deadline_overload_errors_and_stop() -> None:
    gate = threading.Event()
    model = FakeModel(gate=gate)
    b = MicroBatcher.from_settings(model, Settings(beam=4, batch_max=1, batch_wait_ms=0.0, batch_queue_max=2))
    b.start()
    try:
        async def go() -> None:
            now = time.perf_counter()
            with pytest.raises(DeadlineExceeded):
                await b.submit("full", [1], 1, now - 1, POLICY)  # nothing left
            blocked = asyncio.ensure_future(b.submit("full", [1], 1, now + 5, POLICY))  # holds the model thread
            for _ in range(500):  # until the model thread has taken it (slow on a busy machine)
                if model.calls:
                    break
                await asyncio.sleep(0.01)
            soon = time.perf_counter() + 0.2
            queued = [asyncio.ensure_future(b.submit("full", [2], 1, soon, POLICY)) for _ in range(2)]
            await asyncio.sleep(0.01)
            with pytest.raises(Overloaded):
                await b.submit("full", [3], 1, now + 5, POLICY)
            for q in queued:  # their wait has a deadline even while the model thread is busy
                with pytest.raises(DeadlineExceeded):
                    await q
            gate.set()
            assert await blocked == [(1, 0.0)]
        run(go())
    finally:
        b.stop()
    with pytest.raises(Overloaded):
        run(b.submit("full", [1], 1, time.perf_counter() + 1, POLICY))


def test_jobs_with_less_budget_than_the_expected_model_time_skip_the_model() -> None:
    model = FakeModel(delay_s=0.2)
    b = MicroBatcher.from_settings(model, Settings(beam=4, batch_max=8, batch_wait_ms=0.0))
    b.start()
    try:
        async def go() -> None:
            # first batch: nothing measured yet, so it runs (and teaches the batcher ~200 ms)
            assert await b.submit("full", [1], 1, time.perf_counter() + 5, POLICY) == [(1, 0.0)]
            assert b.expected_s["full"] >= 0.2
            blocker = asyncio.ensure_future(b.submit("full", [2], 1, time.perf_counter() + 5, POLICY))
            for _ in range(500):  # until the model thread has taken it
                if len(model.calls) == 2:
                    break
                await asyncio.sleep(0.005)
            roomy = asyncio.ensure_future(b.submit("full", [3], 1, time.perf_counter() + 5, POLICY))
            tight = asyncio.ensure_future(b.submit("full", [4], 1, time.perf_counter() + 0.35, POLICY))
            assert await blocker == [(2, 0.0)]
            assert await roomy == [(3, 0.0)]
            with pytest.raises(BelowExpected):  # ~0.15 s left < ~0.2 s expected: failed before the model
                await tight
            assert model.calls[-1][:2] == ("full", 1) and b.skipped == 1  # the batch ran without it
            # alone, a tight job still runs: otherwise an estimate above every budget would never move again
            calls = len(model.calls)
            with pytest.raises(DeadlineExceeded):
                await b.submit("full", [5], 1, time.perf_counter() + 0.1, POLICY)
            assert len(model.calls) == calls + 1 and b.skipped == 1
        run(go())
    finally:
        b.stop()
    # switched off: two queued jobs below the expected time both run (on, one of them would be skipped)
    gate = threading.Event()
    gated = FakeModel(gate=gate)
    off = MicroBatcher.from_settings(gated, Settings(beam=4, batch_max=8, batch_wait_ms=0.0,
                                                     batch_admit_expected=False))
    off.expected_s["full"] = 10.0
    off.start()
    try:
        async def go_off() -> list[list[tuple[int, float]]]:
            first = asyncio.ensure_future(off.submit("full", [6], 1, time.perf_counter() + 5, POLICY))
            for _ in range(500):  # until the model thread holds it
                if gated.calls:
                    break
                await asyncio.sleep(0.005)
            queued = [asyncio.ensure_future(off.submit("full", [i], 1, time.perf_counter() + 5, POLICY))
                      for i in (7, 8)]
            await asyncio.sleep(0.05)
            gate.set()
            return [await first, *[await q for q in queued]]
        assert run(go_off()) == [[(6, 0.0)], [(7, 0.0)], [(8, 0.0)]] and off.skipped == 0
    finally:
        off.stop()


def test_model_exception_reaches_the_caller() -> None:
    class Boom(FakeModel):
        def decode_full(self, *a, **kw):  # type: ignore[no-untyped-def]
            raise ValueError("bad batch")

    b = MicroBatcher.from_settings(Boom(), Settings(beam=2))
    b.start()
    try:
        with pytest.raises(ValueError, match="bad batch"):
            run(b.submit("full", [1], 1, time.perf_counter() + 2, POLICY))
    finally:
        b.stop()


def test_merge_history_and_lag() -> None:
    assert merge_history([1, 2, 3], [3, 4], 10) == [1, 2, 3, 4]  # overlap with the tail counted once
    assert merge_history([1, 2, 3], [2, 3, 4], 10) == [1, 2, 3, 4]
    assert merge_history([1, 2, 3], [5], 10) == [1, 2, 3, 5]
    assert merge_history([1, 2, 3], [1, 2, 3], 10) == [1, 2, 3]
    assert merge_history([], [4, 4], 10) == [4, 4]
    assert merge_history(list(range(10)), [10, 11], 5) == [7, 8, 9, 10, 11]
    e = ThinkEntry("", [], 3, [2, 3], "m", 0.0)
    assert entry_lag(e, [1, 2, 3]) == 0 and entry_lag(e, [1, 2, 3, 9, 8]) == 2 and entry_lag(e, [7]) is None


def test_redis_breaker_opens_after_failures_in_a_row() -> None:
    b = RedisBreaker(10.0, threshold=3)
    b.failed()
    b.failed()
    assert b.allow()  # two late answers: still asking Redis
    b.succeeded()
    b.failed()
    b.failed()
    assert b.allow()  # the success reset the count
    b.failed()
    assert not b.allow()  # three in a row: skip Redis for backoff_s
    b.succeeded()
    assert b.allow()
    one = RedisBreaker(10.0)
    one.failed()
    assert not one.allow()
    with pytest.raises(ValueError):
        RedisBreaker(1.0, threshold=0)


def test_popularity_skips_consumed() -> None:
    pop = Popularity([[1, 1, 2], [1, 3], [2]])
    assert [i for i, _ in pop.recommend(3)] == [1, 2, 3]
    assert [i for i, _ in pop.recommend(2, exclude={1})] == [2, 3]
    assert pop.recommend(2)[0][1] == pytest.approx(math.log(3 / 6))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> TinyWorld:
    return build_tiny_world(tmp_path_factory.mktemp("tiny"))


def test_think_ahead_eval_mode(world: TinyWorld) -> None:
    onerec = OneRec.load(world.checkpoint)
    examples = [Example(u, s[:-1], s[-1]) for u, s in list(world.sequences.items())[:8]]
    assert staler(examples[:1])[0].history == examples[0].history[:-1]
    source = OneRecPrefixSource(onerec, prefixes=4, beam=16)
    entries = source(examples)
    assert all(e is not None and 1 <= len(e.prefixes) <= 4 for e in entries)
    pop = Popularity(world.sequences.values())
    rec = ThinkAheadRecommender(onerec, lambda ex: [*entries[:-1], None], policy(beam=10, own_prefixes=0), pop)
    ranked = rec.recommend(examples, 10)
    assert rec.with_entry == 7 and rec.without_entry == 1
    assert rec.items > 0 and rec.cached_share == 1.0  # strict: every completed item is under a cached prefix
    for r in ranked:
        assert len(r) == 10 and len(set(r)) == 10 and all(world.sid.has_item(i) for i in r)
    # items from the completion come first and sit under the user's allowed prefixes
    first = entries[0]
    assert first is not None
    assert tuple(world.sid.codes_of(ranked[0][0])[:2]) in {(a, b) for a, b, _ in first.prefixes}


def test_own_prefixes_only_ablation_ignores_the_cached_prefixes(world: TinyWorld) -> None:
    onerec = OneRec.load(world.checkpoint)
    examples = [Example(u, s[:-1], s[-1]) for u, s in list(world.sequences.items())[:8]]
    entries = OneRecPrefixSource(onerec, prefixes=4, beam=16)(examples)
    # a source whose cached prefixes all differ from the real ones: with use_cached=False nothing changes
    moved = [ThinkEntry(e.reasoning, [((a + 1) % 4, b, lp) for a, b, lp in e.prefixes], e.history_len, e.history_tail,
                        e.model_id, e.created_at) if e is not None else None for e in entries]  # fmt: skip
    pop = Popularity(world.sequences.values())
    ablation = policy(beam=10, own_prefixes=4, use_cached=False)
    own = [ThinkAheadRecommender(onerec, src, ablation, pop).recommend(examples, 5)
           for src in (lambda ex: entries, lambda ex: moved)]  # fmt: skip
    assert own[0] == own[1]
    mixed = ThinkAheadRecommender(onerec, lambda ex: moved, policy(beam=10, own_prefixes=4), pop)
    with_cached = mixed.recommend(examples, 5)
    assert with_cached != own[0]  # the cached prefixes do change the answer when they are used
    assert 0.0 < mixed.cached_share < 1.0  # some items under the cached prefixes, some under the model's own
    with pytest.raises(ValueError, match="own_prefixes"):
        policy(own_prefixes=0, use_cached=False)
