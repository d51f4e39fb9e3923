"""Online API under faults: Redis stopped mid-test and back, not ready yet, corrupt values, a failing model."""

from __future__ import annotations

import threading
import time

import pytest
import redis
from api_support import TinyWorld, build_tiny_world, entry_for, make_settings, running_app, wait_ready
from conftest import RedisServer

from model.policy import PolicyConfig
from online_api.state import LoadedModel, load_onerec
from services.config import Settings
from services.store import ThinkStore

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> TinyWorld:
    return build_tiny_world(tmp_path_factory.mktemp("tiny"))


def setup_user(client: redis.Redis, ns: str, world: TinyWorld, user: int, history: bool = True) -> None:
    store = ThinkStore(client, ns)
    store.begin_version("v1", {"model": "think-test"})
    store.write_entries("v1", {user: entry_for(world, user)}, 3600)
    store.publish("v1", 1)
    if history:
        store.write_histories({user: world.sequences[user]}, 50)


def test_redis_stopped_mid_test_then_recovers(world: TinyWorld, redis_server: RedisServer,
                                              redis_client: redis.Redis, ns: str) -> None:
    user = 4
    setup_user(redis_client, ns, world, user)
    with running_app(make_settings(world, redis_server.url, ns)) as c:
        assert c.post("/v1/recommend", json={"user_id": user}).json()["source"] == "think-ahead"
        redis_server.stop()
        try:
            for _ in range(5):  # nothing known about the user without Redis: popular items
                t0 = time.perf_counter()
                r = c.post("/v1/recommend", json={"user_id": user, "k": 5})
                assert r.status_code == 200 and time.perf_counter() - t0 < 1.0
                body = r.json()
                assert body["source"] == "fallback" and body["degraded"] is True and len(body["items"]) == 5
            body = c.post("/v1/recommend", json={"user_id": user, "history": world.sequences[user][-3:]}).json()
            assert body["degraded"] is True and body["source"] == "online-only"  # history sent: the model answers
            assert c.get("/readyz").status_code == 503
            t = c.get(f"/v1/users/{user}/think")
            assert t.status_code == 200 and t.json()["degraded"] is True
            # events are queued (202), not lost, and already shape the next answer
            r = c.post("/v1/events", json={"user_id": user, "items": [1005, 1006]})
            assert r.status_code == 202 and r.json()["stored"] is False
            body = c.post("/v1/recommend", json={"user_id": user, "k": 5}).json()
            assert body["degraded"] is True and not {1005, 1006} & {it["item_id"] for it in body["items"]}
            assert "onerec_redis_errors_total" in c.get("/metrics").text
        finally:
            redis_server.start()
        # recovery: within 2 s of the restart, answers are not degraded, queued events are written
        restarted = time.monotonic()
        # no persistence: the restarted server is empty. Not the history: the API may flush the queued
        # events at any moment from now on, and rewriting the history afterwards would erase them
        setup_user(redis_client, ns, world, user, history=False)
        while True:
            body = c.post("/v1/recommend", json={"user_id": user, "k": 5}).json()
            if not body["degraded"]:
                break
            assert time.monotonic() - restarted < 2.0, body
            time.sleep(0.02)
        assert body["source"] == "think-ahead"
        deadline = time.monotonic() + 2.0
        while redis_client.lrange(f"{ns}:history:{{{user}}}", 0, -1) != [b"1005", b"1006"]:
            assert time.monotonic() < deadline, redis_client.lrange(f"{ns}:history:{{{user}}}", 0, -1)
            time.sleep(0.02)
        wait_ready(c, 2.0)


def test_pending_events_retry_does_not_duplicate_an_applied_write(world: TinyWorld, redis_server: RedisServer,
                                                                   redis_client: redis.Redis, ns: str) -> None:
    """An events write that timed out may have been applied by Redis; its queued retry carries the same
    append id, so the flush does not append the items a second time (and later appends follow in order)."""
    import asyncio

    import redis.asyncio as aioredis

    from online_api.events import PendingEvents
    from services.store import AsyncThinkReader

    async def go() -> int:
        client = aioredis.Redis.from_url(redis_server.url)
        reader = AsyncThinkReader(client, ns)
        await reader.append_events(8, [1001, 1002], 50, "first")  # applied, but the API saw a timeout
        pending = PendingEvents(100)
        assert pending.add(8, [1001, 1002], "first") and pending.add(8, [1003], "second")
        assert pending.get(8) == [1001, 1002, 1003]
        written = await pending.flush(reader, 50, 1.0)
        await client.aclose()
        assert len(pending) == 0 and not pending.has(8)
        return written

    assert asyncio.run(go()) == 3
    assert redis_client.lrange(f"{ns}:history:{{8}}", 0, -1) == [b"1001", b"1002", b"1003"]


def test_dead_redis_from_start_costs_milliseconds(world: TinyWorld, ns: str) -> None:
    settings = make_settings(world, "redis://127.0.0.1:1/0", ns, redis_backoff_ms=0.0)
    with running_app(settings, ready=False) as c:
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["redis"] is False
        assert c.get("/healthz").status_code == 200
        for _ in range(3):
            t0 = time.perf_counter()
            body = c.post("/v1/recommend", json={"user_id": 1, "k": 3}).json()
            assert time.perf_counter() - t0 < 1.0  # refused at once; the margin is for busy CI machines
            assert body["source"] == "fallback" and body["degraded"] is True and len(body["items"]) == 3


def test_readyz_503_until_model_loaded(world: TinyWorld, redis_server: RedisServer, redis_client: redis.Redis,
                                       ns: str) -> None:
    release = threading.Event()

    def slow_loader(settings: Settings, policy: PolicyConfig) -> LoadedModel:
        assert release.wait(30)
        return load_onerec(settings, policy)

    with running_app(make_settings(world, redis_server.url, ns), loader=slow_loader, ready=False) as c:
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["model"] is False and r.json()["redis"] is True
        body = c.post("/v1/recommend", json={"user_id": 1, "k": 3}).json()  # answered meanwhile, by fallback
        assert body["source"] == "fallback" and body["degraded"] is True and body["model_id"] == "none"
        release.set()
        wait_ready(c, 10)
        assert c.post("/v1/recommend", json={"user_id": 1, "k": 3}).json()["source"] == "online-only"


def test_failed_model_load_keeps_answering(world: TinyWorld, redis_server: RedisServer, ns: str,
                                           tmp_path_factory: pytest.TempPathFactory) -> None:
    missing = tmp_path_factory.mktemp("empty")
    with running_app(make_settings(world, redis_server.url, ns, onerec_dir=missing), ready=False) as c:
        deadline = time.monotonic() + 10
        while "load failed" not in (c.get("/readyz").json()["detail"] or ""):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert c.get("/readyz").status_code == 503
        assert c.post("/v1/recommend", json={"user_id": 2}).json()["source"] == "fallback"


def test_corrupt_entry_is_missing_not_a_crash(world: TinyWorld, redis_server: RedisServer,
                                              redis_client: redis.Redis, ns: str) -> None:
    user = 6
    setup_user(redis_client, ns, world, user)
    redis_client.set(f"{ns}:think:v1:{{{user}}}", b"\xff\x00 definitely not json")
    with running_app(make_settings(world, redis_server.url, ns)) as c:
        body = c.post("/v1/recommend", json={"user_id": user}).json()
        assert body["source"] == "online-only" and body["degraded"] is False
        assert c.get(f"/v1/users/{user}/think").json()["entry"] is None
        text = c.get("/metrics").text
        assert 'onerec_think_lookups_total{result="corrupt"} 1.0' in text
        assert "onerec_corrupt_values_total 2.0" in text


class _BrokenModel:
    def decode_full(self, *a: object, **kw: object) -> list:
        raise RuntimeError("boom")

    def complete(self, *a: object, **kw: object) -> list:
        raise RuntimeError("boom")


def test_model_errors_fall_back(world: TinyWorld, redis_server: RedisServer, redis_client: redis.Redis,
                                ns: str) -> None:
    setup_user(redis_client, ns, world, 4)

    def broken(settings: Settings, policy: PolicyConfig) -> LoadedModel:
        real = load_onerec(settings, policy)
        return LoadedModel(_BrokenModel(), real.sid, real.trie, "broken")  # type: ignore[arg-type]

    with running_app(make_settings(world, redis_server.url, ns), loader=broken) as c:
        for user in (4, 5):  # with an entry (complete) and without (decode_full)
            r = c.post("/v1/recommend", json={"user_id": user, "k": 4})
            assert r.status_code == 200
            assert r.json()["source"] == "fallback" and r.json()["degraded"] is True
        assert 'onerec_fallback_total{reason="model_error"} 2.0' in c.get("/metrics").text
