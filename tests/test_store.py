"""services.store against a real redis-server: encoding, versions, publish/rollback, gc, readers."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from redis.crc import key_slot

from services.store import (
    APPEND_IDS_KEPT,
    APPEND_IDS_TTL_S,
    MAX_VALUE_BYTES,
    SCHEMA_VERSION,
    AsyncThinkReader,
    CorruptValue,
    FetchResult,
    IncompleteVersionError,
    ThinkEntry,
    ThinkKeys,
    ThinkStore,
    decode_entry,
    encode_entry,
)

TTL = 3600


def make_entry(user: int = 0, n_prefixes: int = 32, reasoning_chars: int = 300) -> ThinkEntry:
    reasoning = ("The user keeps buying moisturisers and sunscreen; next likely skincare. " * 10)[:reasoning_chars]
    prefixes = [((user + i) % 256, (7 * i + 3) % 256, -0.123456789 * (i + 1)) for i in range(n_prefixes)]
    return ThinkEntry(reasoning, prefixes, 50, [1200 + user, 3400, 12001, 9, 10], "onerec-think-1.7b@abc123", 1.76e9)


def rounded(e: ThinkEntry) -> ThinkEntry:
    return ThinkEntry(
        e.reasoning, [(a, b, round(lp, 4)) for a, b, lp in e.prefixes], e.history_len, e.history_tail, e.model_id,
        round(e.created_at, 3),
    )  # fmt: skip


def fill_version(store: ThinkStore, version: str, users: range, **meta: Any) -> None:
    store.begin_version(version, {"model": "m", **meta})
    store.write_entries(version, {u: make_entry(u) for u in users}, TTL)
    store.finish_version(version, {})


@pytest.fixture
def store(redis_client: redis.Redis, ns: str) -> ThinkStore:
    return ThinkStore(redis_client, ns)


def run_async(redis_url: str, fn: Any, **kwargs: Any) -> Any:
    """Run `fn(client)` on a fresh asyncio client to `redis_url`."""

    async def main() -> Any:
        client = aioredis.Redis.from_url(redis_url, **kwargs)
        try:
            return await fn(client)
        finally:
            await client.aclose()

    return asyncio.run(main())


# --------------------------------------------------------------------------- encoding


def test_encode_decode_round_trip_and_compact() -> None:
    e = make_entry(5)
    raw = encode_entry(e)
    assert decode_entry(raw) == rounded(e)
    assert decode_entry(raw.decode()) == rounded(e)  # clients with decode_responses=True
    obj = json.loads(raw)
    assert obj["v"] == SCHEMA_VERSION
    assert b" " not in raw.replace(e.reasoning.encode(), b"")  # compact separators
    assert len(raw) < 1200, len(raw)
    assert all(len(str(lp).split(".")[-1]) <= 4 for _, _, lp in decode_entry(raw).prefixes)


def test_items_round_trip_and_entries_without_them_decode_unchanged() -> None:
    """The think model's items (optional key "i"): kept in order, log-probs to 4 decimals; an entry without items
    encodes without the key (the value older readers and writers know) and decodes with items []."""
    e = ThinkEntry("r", [(1, 2, -0.1)], 1, [1], "m", 1.0, [(42, -0.123456), (7, -2.5), (2**40, -9.0)])
    raw = encode_entry(e)
    assert json.loads(raw)["i"] == [[42, -0.1235], [7, -2.5], [2**40, -9.0]]
    assert decode_entry(raw).items == [(42, -0.1235), (7, -2.5), (2**40, -9.0)]
    plain = encode_entry(make_entry(3))
    assert "i" not in json.loads(plain) and decode_entry(plain).items == []


def test_encode_keeps_prefix_order_and_unicode() -> None:
    e = ThinkEntry("喜欢护肤 ✓", [(3, 4, -0.5), (1, 2, -0.1)], 0, [], "m", 0.0)
    d = decode_entry(encode_entry(e))
    assert d.reasoning == "喜欢护肤 ✓"
    assert d.prefixes == [(3, 4, -0.5), (1, 2, -0.1)]


@pytest.mark.parametrize(
    "field,kwargs",
    [
        ("prefixes", {"prefixes": [(1, 2, float("nan"))]}),
        ("prefixes", {"prefixes": [(1, 2, float("-inf"))]}),
        ("prefixes", {"prefixes": [(-1, 2, -0.1)]}),
        ("prefixes", {"prefixes": [(True, 2, -0.1)]}),
        ("items", {"items": [(1, float("nan"))]}),
        ("items", {"items": [(-3, -0.1)]}),
        ("items", {"items": [(1, -0.1, 2)]}),
        ("history_len", {"history_len": -1}),
        ("history_tail", {"history_tail": [1, "2"]}),
        ("entry", {"reasoning": "x" * (MAX_VALUE_BYTES + 1)}),
    ],
)
def test_encode_rejects_bad_fields(field: str, kwargs: dict[str, Any]) -> None:
    base = dict(reasoning="r", prefixes=[(1, 2, -0.1)], history_len=1, history_tail=[1], model_id="m", created_at=1.0)
    with pytest.raises(ValueError, match=field):
        encode_entry(ThinkEntry(**{**base, **kwargs}))


def _good_obj() -> dict[str, Any]:
    return json.loads(encode_entry(make_entry()))


BAD_VALUES: dict[str, bytes] = {
    "not_json": b"{half",
    "foreign_bytes": b"\xff\xfe\x00\x81pickle\x80",
    "json_list": b"[1,2,3]",
    "unknown_schema": json.dumps({**_good_obj(), "v": SCHEMA_VERSION + 1}).encode(),
    "no_schema": json.dumps({k: v for k, v in _good_obj().items() if k != "v"}).encode(),
    "missing_field": json.dumps({k: v for k, v in _good_obj().items() if k != "r"}).encode(),
    "bad_prefix": json.dumps({**_good_obj(), "p": [[1, 2]]}).encode(),
    "bool_code": json.dumps({**_good_obj(), "p": [[True, 2, -0.1]]}).encode(),
    "str_tail": json.dumps({**_good_obj(), "ht": ["1"]}).encode(),
    "items_not_list": json.dumps({**_good_obj(), "i": {"1": -0.1}}).encode(),
    "bad_item": json.dumps({**_good_obj(), "i": [[1, -0.1, 3]]}).encode(),
    "bool_item": json.dumps({**_good_obj(), "i": [[False, -0.1]]}).encode(),
    "overflow_item_logprob": json.dumps({**_good_obj(), "i": [[1, "inf"]]}).replace('"inf"', "-1e400").encode(),
    "nan": encode_entry(make_entry()).replace(b'"t":', b'"t":NaN,"x":'),
    "overflow_time": encode_entry(make_entry()).replace(b'"t":', b'"t":1e400,"x":'),
    "overflow_logprob": json.dumps({**_good_obj(), "p": [[1, 2, "inf"]]}).replace('"inf"', "-1e400").encode(),
    "oversized": json.dumps({**_good_obj(), "r": "x" * MAX_VALUE_BYTES}).encode(),
}


@pytest.mark.parametrize("name", sorted(BAD_VALUES))
def test_decode_rejects_with_corrupt_value_only(name: str) -> None:
    with pytest.raises(CorruptValue):
        decode_entry(BAD_VALUES[name])


@pytest.mark.parametrize("name", sorted(BAD_VALUES))
def test_sync_reader_treats_corrupt_as_missing(store: ThinkStore, redis_client: redis.Redis, name: str) -> None:
    redis_client.set(store.keys.think("v1", 1), BAD_VALUES[name])
    redis_client.set(store.keys.think("v1", 2), encode_entry(make_entry(2)))
    assert store.get_entry("v1", 1) is None
    assert store.corrupt == 1
    assert store.get_entry("v1", 2) == rounded(make_entry(2))
    assert store.get_entry("v1", 3) is None  # plain missing is not corrupt
    assert store.corrupt == 1


def test_async_reader_treats_corrupt_as_missing(
    store: ThinkStore, redis_client: redis.Redis, redis_server: Any
) -> None:
    fill_version(store, "v1", range(3))
    store.publish("v1", 3)
    for i, value in enumerate(BAD_VALUES.values()):
        redis_client.set(store.keys.think("v1", 100 + i), value)
    redis_client.rpush(store.keys.history(100), 5, 6)

    async def go(client: aioredis.Redis) -> tuple[list[FetchResult], FetchResult, int]:
        reader = AsyncThinkReader(client, store.keys.ns)
        bad = [await reader.fetch(100 + i) for i in range(len(BAD_VALUES))]
        good = await reader.fetch(1)
        assert await reader.get_entry(101) is None
        return bad, good, reader.corrupt

    bad, good, corrupt = run_async(redis_server.url, go)
    assert all(r.entry is None and r.corrupt and r.version == "v1" for r in bad)
    assert bad[0].history == [5, 6]  # history still served next to a corrupt entry
    assert good.entry == rounded(make_entry(1)) and not good.corrupt
    assert corrupt == len(BAD_VALUES) + 1


def test_keys_of_another_redis_type_are_corrupt_not_errors(store: ThinkStore, redis_client: redis.Redis,
                                                            redis_server: Any) -> None:
    """WRONGTYPE (a list where an entry belongs, a string where a history belongs) is a corrupt value, not a
    Redis failure: readers return missing, and an event append starts the history afresh."""
    fill_version(store, "v1", range(3))
    store.publish("v1", 3)
    redis_client.delete(store.keys.think("v1", 1))
    redis_client.rpush(store.keys.think("v1", 1), b"foreign")
    redis_client.set(store.keys.history(2), b"not a list")
    assert store.get_entry("v1", 1) is None and store.get_entries("v1", [0, 1])[0] is not None
    assert store.get_history(2) == [] and store.corrupt == 3  # user 1 read twice

    async def go(client: aioredis.Redis) -> tuple[FetchResult, FetchResult, Any, int, int]:
        reader = AsyncThinkReader(client, store.keys.ns)
        one, two = await reader.fetch(1), await reader.fetch(2)
        missing = await reader.get_entry(1)
        n = await reader.append_events(2, [7, 8], 50)
        return one, two, missing, n, reader.corrupt

    one, two, missing, n, corrupt = run_async(redis_server.url, go)
    assert one.entry is None and one.corrupt and one.version == "v1"
    assert two.entry is not None and two.history == [] and two.corrupt
    assert missing is None and n == 2 and corrupt == 4
    assert store.get_history(2) == [7, 8]


def test_oversized_values_are_read_bounded(store: ThinkStore, redis_client: redis.Redis, redis_server: Any) -> None:
    fill_version(store, "v1", range(2))
    store.publish("v1", 2)
    redis_client.set(store.keys.think("v1", 1), b"x" * (8 * MAX_VALUE_BYTES))

    async def go(client: aioredis.Redis) -> tuple[FetchResult, FetchResult]:
        reader = AsyncThinkReader(client, store.keys.ns)
        return await reader.fetch(0), await reader.fetch(1)

    good, big = run_async(redis_server.url, go)
    assert good.entry == rounded(make_entry(0)) and big.entry is None and big.corrupt
    assert store.get_entry("v1", 1) is None and store.corrupt == 1


def test_corrupt_history_elements_are_dropped_and_counted(store: ThinkStore, redis_client: redis.Redis) -> None:
    redis_client.rpush(store.keys.history(1), 10, b"junk", 12)
    assert store.get_history(1) == [10, 12]
    assert store.corrupt == 1


# --------------------------------------------------------------------------- keys


def test_keys_layout_and_cluster_slots() -> None:
    k = ThinkKeys("onerec")
    assert k.think("v7", 42) == "onerec:think:v7:{42}"
    assert k.history(42) == "onerec:history:{42}"
    assert (k.current, k.previous, k.versions) == (
        "onerec:think:current",
        "onerec:think:previous",
        "onerec:think:versions",
    )
    assert k.meta("v7") == "onerec:think:v7:meta" and k.done("v7", 3) == "onerec:think:v7:done:3"
    slots = set()
    for user in [0, 1, 42, 123456, 987654321]:
        slot = key_slot(k.history(user).encode())
        assert all(key_slot(k.think(v, user).encode()) == slot for v in ["v1", "v2", "2026-01-01T00.00"])
        slots.add(slot)
    assert len(slots) == 5  # the tag is the user, not the namespace: users spread over slots


@pytest.mark.parametrize("bad", ["", "a:b", "current", "previous", "versions", "v*", "{v}", "x" * 65])
def test_bad_versions_rejected(bad: str) -> None:
    with pytest.raises(ValueError, match="version"):
        ThinkKeys("ns").think(bad, 1)


@pytest.mark.parametrize("bad", ["", "a{b}", "a*", "sp ace"])
def test_bad_namespaces_rejected(bad: str) -> None:
    with pytest.raises(ValueError, match="ns"):
        ThinkKeys(bad)


# --------------------------------------------------------------------------- publish / rollback / gc


def test_publish_refuses_incomplete_then_flips(store: ThinkStore) -> None:
    store.begin_version("v1", {"model": "m1", "catalogue": "h1", "users": 5})
    store.write_entries("v1", {u: make_entry(u) for u in range(3)}, TTL)
    with pytest.raises(IncompleteVersionError, match="3 entries, expected 5"):
        store.publish("v1", 5)
    assert store.current_version() is None
    store.write_entries("v1", {u: make_entry(u) for u in range(2, 5)}, TTL)  # overlapping re-write
    assert store.count_entries("v1") == 5
    store.finish_version("v1", {"shards": 1})
    assert store.publish("v1", 5) is None
    assert store.current_version() == "v1" and store.previous_version() is None
    meta = store.meta("v1")
    assert meta["model"] == "m1" and meta["shards"] == 1 and meta["users"] == 5
    assert meta["started"] <= meta["finished"] <= meta["published"]

    fill_version(store, "v2", range(5))
    assert store.publish("v2", 5) == "v1"
    assert (store.current_version(), store.previous_version()) == ("v2", "v1")
    with pytest.raises(ValueError, match="never begun"):
        store.publish("v9", 0)


def test_live_version_cannot_be_rewritten(store: ThinkStore) -> None:
    fill_version(store, "v1", range(2))
    store.publish("v1", 2)
    with pytest.raises(ValueError, match="live"):
        store.write_entries("v1", {0: make_entry()}, TTL)
    with pytest.raises(ValueError, match="live"):
        store.begin_version("v1", {})


def test_entries_get_ttl(store: ThinkStore, redis_client: redis.Redis) -> None:
    fill_version(store, "v1", range(1))
    assert 0 < redis_client.ttl(store.keys.think("v1", 0)) <= TTL


def test_readers_never_see_a_partial_version(store: ThinkStore, redis_server: Any, ns: str) -> None:
    users = range(200)
    fill_version(store, "v1", users)
    store.publish("v1", len(users))
    writing = threading.Event()
    stop = threading.Event()
    seen: dict[str, int] = {}
    seen_while_writing: set[str] = set()
    missing: list[tuple[str, int]] = []

    def reader() -> None:
        client = redis.Redis.from_url(redis_server.url)
        rs = ThinkStore(client, ns)
        try:
            while not stop.is_set():
                version = rs.current_version()
                assert version is not None
                during = writing.is_set()
                values = client.mget([rs.keys.think(version, u) for u in users])
                missing.extend((version, u) for u, v in zip(users, values, strict=True) if v is None)
                seen[version] = seen.get(version, 0) + 1
                if during:
                    seen_while_writing.add(version)
        finally:
            client.close()

    t = threading.Thread(target=reader)
    t.start()
    try:
        writer = ThinkStore(redis.Redis.from_url(redis_server.url), ns)
        writer.begin_version("v2", {})
        writing.set()
        for start in range(0, len(users), 20):
            writer.write_entries("v2", {u: make_entry(u) for u in users[start : start + 20]}, TTL)
            if start + 20 < len(users):
                with pytest.raises(IncompleteVersionError):
                    writer.publish("v2", len(users))
            time.sleep(0.01)
        writing.clear()
        writer.publish("v2", len(users))
        writer.r.close()
        deadline = time.monotonic() + 5
        while seen.get("v2", 0) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        stop.set()
        t.join(timeout=10)
    assert not missing, missing[:5]
    assert seen_while_writing == {"v1"}  # the reader was active during the write and only saw v1
    assert seen.get("v2", 0) >= 3


def test_rollback(store: ThinkStore) -> None:
    with pytest.raises(RuntimeError, match="no previous"):
        store.rollback()
    fill_version(store, "v1", range(2))
    fill_version(store, "v2", range(2))
    store.publish("v1", 2)
    store.publish("v2", 2)
    assert store.rollback() == "v1"
    assert (store.current_version(), store.previous_version()) == ("v1", "v2")
    assert store.rollback() == "v2"
    assert (store.current_version(), store.previous_version()) == ("v2", "v1")


def test_gc_keeps_current_previous_and_newest(store: ThinkStore, redis_client: redis.Redis, ns: str) -> None:
    for i in range(1, 6):
        store.begin_version(f"v{i}", {"i": i}, created_at=1000.0 + i)
        store.write_entries(f"v{i}", {u: make_entry(u) for u in range(3)}, TTL)
        store.mark_chunk_done(f"v{i}", 0, 0)
    store.publish("v1", 3)
    store.publish("v2", 3)
    store.write_histories({0: [1, 2]}, 10)
    assert store.versions() == ["v1", "v2", "v3", "v4", "v5"]

    assert store.gc(keep=2) == ["v3"]
    assert store.versions() == ["v1", "v2", "v4", "v5"]
    assert list(redis_client.scan_iter(match=f"{ns}:think:v3:*")) == []
    assert store.count_entries("v4") == 3 and store.meta("v4")["i"] == 4

    assert store.gc(keep=0) == ["v4", "v5"]
    assert store.versions() == ["v1", "v2"]
    for v in ["v1", "v2"]:
        assert store.count_entries(v) == 3 and store.done_chunks(v, 0) == {0} and store.meta(v)["i"] in (1, 2)
    assert store.get_history(0) == [1, 2]  # histories are not version data
    assert store.current_version() == "v2"
    store.gc(keep=0)
    assert store.rollback() == "v1"  # previous survived gc, so rollback still works


def test_gc_many_keys_in_batches(store: ThinkStore, redis_client: redis.Redis) -> None:
    store.begin_version("old", {}, created_at=1.0)
    store.write_entries("old", {u: make_entry(u) for u in range(1234)}, TTL)
    fill_version(store, "new", range(1))
    store.publish("new", 1)
    assert store.gc(keep=0) == ["old"]
    assert store.count_entries("old") == 0
    assert redis_client.dbsize() == 4  # new entry + meta, current, versions


def test_rollback_refuses_collected_previous(store: ThinkStore) -> None:
    fill_version(store, "v1", range(1))
    store.publish("v1", 1)
    fill_version(store, "v2", range(1))
    store.publish("v2", 1)
    store.r.zrem(store.keys.versions, "v1")  # as if gc'd by an older tool
    with pytest.raises(RuntimeError, match="garbage-collected"):
        store.rollback()
    assert store.current_version() == "v2"


# --------------------------------------------------------------------------- resume


def test_resume_from_done_chunks(store: ThinkStore) -> None:
    users = list(range(100))
    chunks = [users[i : i + 10] for i in range(0, len(users), 10)]
    written: list[int] = []

    def refresh(fail_at: int | None) -> None:
        store.begin_version("v1", {"users": len(users)})
        done = store.done_chunks("v1", shard=0)
        for idx, chunk in enumerate(chunks):
            if idx in done:
                continue
            if idx == fail_at:
                store.write_entries("v1", {u: make_entry(u) for u in chunk[:5]}, TTL)  # killed mid-chunk
                raise KeyboardInterrupt
            store.write_entries("v1", {u: make_entry(u) for u in chunk}, TTL)
            store.mark_chunk_done("v1", 0, idx)
            written.append(idx)

    with pytest.raises(KeyboardInterrupt):
        refresh(fail_at=4)
    assert store.done_chunks("v1", 0) == {0, 1, 2, 3}
    assert store.done_chunks("v1", 1) == set()  # shards are independent
    with pytest.raises(IncompleteVersionError):
        store.publish("v1", len(users))
    started = store.meta("v1")["started"]
    refresh(fail_at=None)
    assert written == list(range(10))  # each chunk written to completion exactly once
    assert store.meta("v1")["started"] == started  # resume keeps the original start
    store.mark_chunk_done("v1", 0, 3)  # idempotent
    assert store.done_chunks("v1", 0) == set(range(10))
    store.publish("v1", len(users))
    st = store.status()
    assert st["version"] == "v1" and st["live"] and st["entries"] == 100 and st["done_chunks"] == {0: 10}


# --------------------------------------------------------------------------- histories and async reads


def test_histories_bounded_and_replaced(store: ThinkStore, redis_server: Any) -> None:
    store.write_histories({1: list(range(10)), 2: [7]}, max_len=5)
    assert store.get_history(1) == [5, 6, 7, 8, 9] and store.get_history(2) == [7]
    store.write_histories({1: [42], 2: []}, max_len=5)
    assert store.get_history(1) == [42] and store.get_history(2) == []

    async def go(client: aioredis.Redis) -> list[int]:
        reader = AsyncThinkReader(client, store.keys.ns)
        lengths = [await reader.append_events(1, [100 + i, 200 + i], max_len=5) for i in range(4)]
        assert await reader.append_events(1, [], max_len=5) == 5
        with pytest.raises(ValueError, match="items"):
            await reader.append_events(1, [-3], max_len=5)
        return lengths

    assert run_async(redis_server.url, go) == [3, 5, 5, 5]
    assert store.get_history(1) == [201, 102, 202, 103, 203]


def test_appends_with_an_id_are_idempotent(store: ThinkStore, redis_client: redis.Redis, redis_server: Any) -> None:
    """A retried append (same id, e.g. after a write that timed out but was applied) is not stored twice."""
    redis_client.set(store.keys.appended(2), b"foreign")  # a foreign value under the ids key is replaced

    async def go(client: aioredis.Redis) -> tuple[list[int], int]:
        reader = AsyncThinkReader(client, store.keys.ns)
        n = [await reader.append_events(1, [5, 6], 50, "a1"), await reader.append_events(1, [5, 6], 50, "a1"),
             await reader.append_events(1, [7], 50, "a2"), await reader.append_events(1, [7], 50),
             await reader.append_events(1, [7], 50), await reader.append_events(2, [9], 50, "b1")]  # fmt: skip
        for i in range(APPEND_IDS_KEPT + 1):  # ids beyond the kept ones are forgotten
            await reader.append_events(3, [i], 50, f"c{i}")
        await reader.append_events(3, [0], 50, "c0")
        return n, reader.replayed

    lengths, replayed = run_async(redis_server.url, go)
    assert lengths == [2, 2, 3, 4, 5, 1] and replayed == 1
    assert store.get_history(1) == [5, 6, 7, 7, 7] and store.get_history(2) == [9]
    assert store.get_history(3) == [*range(APPEND_IDS_KEPT + 1), 0]
    assert redis_client.llen(store.keys.appended(3)) == APPEND_IDS_KEPT
    assert 0 < redis_client.ttl(store.keys.appended(1)) <= APPEND_IDS_TTL_S
    assert key_slot(store.keys.appended(1).encode()) == key_slot(store.keys.history(1).encode())


class CountingConnection(aioredis.Connection):
    """Counts packets written to Redis: a pipeline is one, so this counts round trips."""

    sends = 0

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        CountingConnection.sends += 1
        await super().send_packed_command(command, check_health)


def test_async_fetch_is_one_round_trip(store: ThinkStore, redis_server: Any) -> None:
    fill_version(store, "v1", range(3))
    store.publish("v1", 3)
    store.write_histories({1: [11, 12, 13]}, 50)
    now = [0.0]

    async def go(_: aioredis.Redis) -> None:
        pool = aioredis.ConnectionPool(
            connection_class=CountingConnection, host=redis_server.host, port=redis_server.port, max_connections=1
        )
        client = aioredis.Redis(connection_pool=pool)
        try:
            reader = AsyncThinkReader(client, store.keys.ns, current_ttl_s=1.0, clock=lambda: now[0])
            await client.ping()  # connect outside the count
            CountingConnection.sends = 0
            first = await reader.fetch(1)
            assert CountingConnection.sends == 2  # cold cache: GET current + pipeline
            CountingConnection.sends = 0
            res = await reader.fetch(1)
            assert CountingConnection.sends == 1  # hot path: one round trip
            assert res == first
            assert res.version == "v1" and res.entry == rounded(make_entry(1)) and res.history == [11, 12, 13]
            assert (await reader.fetch(1, history_max=2)).history == [12, 13]
            missing = await reader.fetch(999)
            assert missing == FetchResult("v1", None, [], False)

            fill_version(store, "v2", range(3))
            store.publish("v2", 3)
            assert (await reader.fetch(1)).version == "v1"  # cached for current_ttl_s
            now[0] += 1.0
            assert (await reader.fetch(1)).version == "v2"
        finally:
            await client.aclose()
            await pool.aclose()

    run_async(redis_server.url, go)


def test_async_fetch_before_any_publish(store: ThinkStore, redis_server: Any) -> None:
    store.write_histories({1: [3]}, 50)

    async def go(client: aioredis.Redis) -> tuple[FetchResult, Any]:
        reader = AsyncThinkReader(client, store.keys.ns)
        return await reader.fetch(1), await reader.get_entry(1)

    assert run_async(redis_server.url, go) == (FetchResult(None, None, [3], False), None)


def test_connection_errors_propagate(store: ThinkStore, redis_server: Any) -> None:
    fill_version(store, "v1", range(1))
    store.publish("v1", 1)

    async def go(client: aioredis.Redis) -> None:
        reader = AsyncThinkReader(client, store.keys.ns, current_ttl_s=60)
        assert (await reader.fetch(0)).entry is not None
        redis_server.stop()
        try:
            with pytest.raises(redis.ConnectionError):
                await reader.fetch(0)
        finally:
            redis_server.start()
        assert (await reader.fetch(0)).entry is None  # restarted empty (no persistence), but answers again

    run_async(redis_server.url, go, socket_timeout=1, socket_connect_timeout=1)


# --------------------------------------------------------------------------- memory


def test_memory_usage_of_typical_entry(store: ThinkStore, redis_client: redis.Redis) -> None:
    fill_version(store, "v1", range(1))
    usage = redis_client.memory_usage(store.keys.think("v1", 0), samples=0)
    assert usage is not None and usage <= 2048, usage


@pytest.fixture(autouse=True)
def _no_leaked_threads() -> Iterator[None]:
    before = threading.active_count()
    yield
    assert threading.active_count() <= before
