"""Staleness tracking and the incremental refresh against a real redis-server.

Events appended through the online store count per user; ``refresh --min-staleness`` recomputes only the
users over the threshold into the live version (counted), leaves everyone else byte for byte, and a
reader polling during it only ever sees a user's old entry or its new one.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from offline_helpers import TinyWorld, build_world
from test_offline_refresh import FakeEngine, refresh

from offline_worker.incremental import IncrementalOptions, run_incremental
from services.store import AsyncThinkReader, ThinkStore


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> TinyWorld:
    return build_world(tmp_path_factory.getbasetemp() / "offline_world")


@pytest.fixture
def store(redis_client: redis.Redis, ns: str) -> ThinkStore:
    return ThinkStore(redis_client, ns)


def append(url: str, ns: str, events: dict[int, list[list[int]]], append_id: str = "") -> None:
    """Append each user's event batches through the online reader (the `POST /v1/events` path)."""

    async def go() -> None:
        client = aioredis.Redis.from_url(url)
        reader = AsyncThinkReader(client, ns)
        for user, batches in events.items():
            for i, items in enumerate(batches):
                await reader.append_events(user, items, 50, f"{append_id}{user}-{i}" if append_id else "")
        await client.aclose()

    asyncio.run(go())


def test_appends_count_staleness_and_a_replayed_append_counts_once(
    store: ThinkStore, redis_server: Any, ns: str
) -> None:
    append(redis_server.url, ns, {7: [[1, 2]], 8: [[3]], 9: [[4], [5], [6]]}, append_id="a")
    append(redis_server.url, ns, {9: [[4]]}, append_id="a")  # the same id again: a retry, not new events
    assert store.stale_users() == [(9, 3), (7, 2), (8, 1)]
    assert store.stale_users(min_staleness=2) == [(9, 3), (7, 2)]
    assert store.stale_users(limit=1) == [(9, 3)]
    store.settle_staleness({9: 2, 7: 2})  # 7 caught up, 9 has one event the new entry has not seen
    assert store.staleness([7, 8, 9]) == {7: 0, 8: 1, 9: 1}
    store.clear_staleness([8, 9])
    assert store.stale_users() == []


def test_full_refresh_resets_staleness_of_the_users_it_rewrites(
    store: ThinkStore, world: TinyWorld, redis_server: Any, ns: str
) -> None:
    append(redis_server.url, ns, {1: [[5]], 2: [[6]]})
    refresh(store, FakeEngine(world), world)  # writes every user's history from the dataset
    assert store.stale_users() == []


def test_incremental_refresh_touches_only_stale_users_and_readers_never_see_a_mix(
    store: ThinkStore, world: TinyWorld, redis_server: Any, ns: str
) -> None:
    plan, _ = refresh(store, FakeEngine(world), world)
    live = plan.version
    users = sorted(world.sequences)
    before = {u: store.r.get(store.keys.think(live, u)) for u in users}
    # 6 users over the threshold (2+ interactions), 3 under it, the rest untouched
    over = {u: [[10 + u], [20 + u]] for u in users[:6]}
    under = {u: [[30 + u]] for u in users[6:9]}
    append(redis_server.url, ns, {**over, **under})

    stop = threading.Event()
    bad: list[str] = []
    seen: dict[int, set[bytes]] = {u: set() for u in over}
    reads = [0]

    def reader() -> None:  # what a serving replica reads for the stale users while the refresh rewrites them
        r = ThinkStore(redis.Redis.from_url(redis_server.url), ns)
        while not stop.is_set():
            if r.current_version() != live:
                bad.append("live version changed")
            for u in over:
                raw = r.r.get(r.keys.think(live, u))
                reads[0] += 1
                if raw is None or r.get_entry(live, u) is None:
                    bad.append(f"user {u}: no valid entry")
                else:
                    seen[u].add(raw)
        r.r.close()

    engine = FakeEngine(world, delay_s=0.05)
    t = threading.Thread(target=reader)
    t.start()
    try:
        opts = IncrementalOptions(min_staleness=2, chunk=2, progress=False)
        rep = run_incremental(store, engine, world.sid, opts)
    finally:
        stop.set()
        t.join()
    assert not bad, bad[:5]
    for u in over:  # each read was the old entry or the one new entry, whole (one SET per user)
        assert seen[u] <= {before[u], store.r.get(store.keys.think(live, u))}, u
    assert reads[0] > 10 and any(len(v) == 2 for v in seen.values())
    assert rep.version == live and rep.candidates == 6 and rep.computed == 6 and rep.staleness_seen == 12
    assert sorted(engine.seen) == sorted(over)  # the engine ran on the stale users only
    assert store.current_version() == live and store.versions() == [live]  # no new version
    for u in users:
        raw = store.r.get(store.keys.think(live, u))
        assert (raw != before[u]) == (u in over), u
    for u in over:  # the new entry was computed from the history with the events in it
        e = store.get_entry(live, u)
        assert e is not None and e.history_tail[-2:] == [10 + u, 20 + u]
    assert store.stale_users() == [(u, 1) for u in sorted(under)]
    again = run_incremental(store, FakeEngine(world), world.sid, opts)
    assert again.computed == 0 and again.skipped == "no user with staleness >= 2"


def test_events_during_an_incremental_refresh_keep_the_user_stale(
    store: ThinkStore, world: TinyWorld, redis_server: Any, ns: str
) -> None:
    refresh(store, FakeEngine(world), world)
    append(redis_server.url, ns, {1: [[11], [12]], 2: [[13], [14]]})

    def late_event(i: int, n: int) -> None:  # lands after user 1's history was read: the entry has not seen it
        if i == 0:
            append(redis_server.url, ns, {1: [[15]]})

    rep = run_incremental(store, FakeEngine(world), world.sid, IncrementalOptions(min_staleness=1, chunk=1,
                                                                                  progress=False), late_event)
    assert rep.computed == 2 and store.stale_users() == [(1, 1)]


def test_incremental_refresh_without_a_live_version_does_nothing(store: ThinkStore, world: TinyWorld) -> None:
    rep = run_incremental(store, FakeEngine(world), world.sid, IncrementalOptions(progress=False))
    assert rep.computed == 0 and rep.skipped is not None and "no live version" in rep.skipped
