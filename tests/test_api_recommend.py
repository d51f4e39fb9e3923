"""Online API against a real redis-server and a tiny OneRec: think-ahead, online-only, events, validation."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis
from api_support import TinyWorld, build_tiny_world, entry_for, make_settings, running_app
from conftest import RedisServer
from fastapi.testclient import TestClient

from services.store import ThinkStore

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> TinyWorld:
    return build_tiny_world(tmp_path_factory.mktemp("tiny"))


def publish(store: ThinkStore, world: TinyWorld, entries: dict, version: str = "v1") -> None:
    store.begin_version(version, {"model": "think-test"})
    store.write_entries(version, entries, 3600)
    store.publish(version, len(entries))


def test_think_ahead_path(world: TinyWorld, redis_server: RedisServer, redis_client: redis.Redis, ns: str) -> None:
    store = ThinkStore(redis_client, ns)
    user = 3
    entry = entry_for(world, user, reasoning="enjoys tiny gadgets")
    publish(store, world, {user: entry})
    store.write_histories({user: world.sequences[user]}, 50)
    with running_app(make_settings(world, redis_server.url, ns, own_prefixes=0)) as c:  # cached prefixes only
        r = c.post("/v1/recommend", json={"user_id": user, "k": 5})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["source"] == "think-ahead" and body["degraded"] is False
        assert body["reasoning"] == "enjoys tiny gadgets" and body["version"] == "v1"
        allowed = {(a, b) for a, b, _ in entry.prefixes}
        model_items = [it for it in body["items"] if it["source"] == "think-ahead"]
        assert model_items, body
        for it in model_items:
            assert tuple(it["codes"][:2]) in allowed and it["cached_prefix"] is True
            assert list(world.sid.codes_of(it["item_id"])) == it["codes"]
            assert it["title"] == f"Tiny item {it['item_id']}"
        assert len(body["items"]) == 5
        assert not {it["item_id"] for it in body["items"]} & set(world.sequences[user])  # consumed excluded
        scores = [it["score"] for it in model_items]
        assert scores == sorted(scores, reverse=True)
        # the think view shows the same entry, with no interaction since it was computed
        t = c.get(f"/v1/users/{user}/think").json()
        assert t["version"] == "v1" and t["entry"]["reasoning"] == "enjoys tiny gadgets"
        assert t["entry"]["lag"] == 0 and [h["item_id"] for h in t["history"]] == world.sequences[user]
        metrics = c.get("/metrics").text
        assert 'onerec_think_lookups_total{result="hit"} 1.0' in metrics
        assert 'onerec_recommend_latency_seconds_count{source="think-ahead"} 1.0' in metrics


def test_think_ahead_with_own_prefixes(world: TinyWorld, redis_server: RedisServer, redis_client: redis.Redis,
                                       ns: str) -> None:
    """The default safety net: the online model's own prefixes join the cached ones; still think-ahead, valid."""
    store = ThinkStore(redis_client, ns)
    user = 3
    entry = entry_for(world, user)
    cached = {(a, b) for a, b, _ in entry.prefixes}
    publish(store, world, {user: entry})
    store.write_histories({user: world.sequences[user]}, 50)
    with running_app(make_settings(world, redis_server.url, ns, own_prefixes=8)) as c:
        body = c.post("/v1/recommend", json={"user_id": user, "k": 5}).json()
        assert body["source"] == "think-ahead" and body["degraded"] is False
        ids = [it["item_id"] for it in body["items"]]
        assert len(ids) == len(set(ids)) == 5
        assert all(world.sid.has_item(i) and i not in world.sequences[user] for i in ids)
        # each think-ahead item says whether it follows the offline reasoning's prefixes
        for it in body["items"]:
            want = (tuple(it["codes"][:2]) in cached) if it["source"] == "think-ahead" else None
            assert it["cached_prefix"] is want


def test_online_only_path(world: TinyWorld, redis_server: RedisServer, redis_client: redis.Redis, ns: str) -> None:
    store = ThinkStore(redis_client, ns)
    publish(store, world, {1: entry_for(world, 1)})  # a live version, but not for user 2
    store.write_histories({2: world.sequences[2]}, 50)
    with running_app(make_settings(world, redis_server.url, ns)) as c:
        body = c.post("/v1/recommend", json={"user_id": 2, "k": 10}).json()
        assert body["source"] == "online-only" and body["degraded"] is False and body["reasoning"] is None
        ids = [it["item_id"] for it in body["items"]]
        assert len(ids) == len(set(ids)) == 10
        assert all(world.sid.has_item(i) for i in ids) and not set(ids) & set(world.sequences[2])
        # a user Redis knows nothing about is still answered by the model (cold start)
        body = c.post("/v1/recommend", json={"user_id": 999, "k": 3}).json()
        assert body["source"] == "online-only" and len(body["items"]) == 3


def test_history_in_request_unknown_items_and_budget(world: TinyWorld, redis_server: RedisServer,
                                                      redis_client: redis.Redis, ns: str) -> None:
    with running_app(make_settings(world, redis_server.url, ns)) as c:
        hist = world.sequences[5][:4]
        body = c.post("/v1/recommend", json={"user_id": 5, "k": 4, "history": [*hist, 77, 5_000_000]}).json()
        assert body["source"] == "online-only" and body["unknown_items"] == 2
        assert not {it["item_id"] for it in body["items"]} & set(hist)
        # a budget too small for the model: popular items, flagged degraded, still 200
        r = c.post("/v1/recommend", json={"user_id": 5, "k": 4, "history": hist, "budget_ms": 0.001})
        assert r.status_code == 200
        body = r.json()
        assert body["source"] == "fallback" and body["degraded"] is True and len(body["items"]) == 4
        assert not {it["item_id"] for it in body["items"]} & set(hist)
        assert 'onerec_fallback_total{reason="deadline"}' in c.get("/metrics").text


def test_events_change_the_next_answer(world: TinyWorld, redis_server: RedisServer, redis_client: redis.Redis,
                                       ns: str) -> None:
    user = 7
    ThinkStore(redis_client, ns).write_histories({user: world.sequences[user]}, 50)
    with running_app(make_settings(world, redis_server.url, ns)) as c:
        first = c.post("/v1/recommend", json={"user_id": user, "k": 5}).json()
        top = first["items"][0]["item_id"]
        r = c.post("/v1/events", json={"user_id": user, "items": [top, 31337]})
        assert r.status_code == 200, r.text
        assert r.json() == {"user_id": user, "accepted": 1, "unknown_items": 1, "stored": True,
                            "history_len": len(world.sequences[user]) + 1, "detail": None}
        second = c.post("/v1/recommend", json={"user_id": user, "k": 5}).json()
        assert top not in {it["item_id"] for it in second["items"]}  # consumed now
        assert [it["item_id"] for it in second["items"]] != [it["item_id"] for it in first["items"]]
        hist = [h["item_id"] for h in c.get(f"/v1/users/{user}/think").json()["history"]]
        assert hist == [*world.sequences[user], top]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"user_id": -1}, "user_id"),
        ({"user_id": "abc"}, "user_id"),
        ({"k": 3}, "user_id"),
        ({"user_id": 1, "k": 0}, "k"),
        ({"user_id": 1, "k": 101}, "k"),  # above the server's max_k (100)
        ({"user_id": 1, "k": 5000}, "k"),  # above the schema's hard bound
        ({"user_id": 1, "history": list(range(201))}, "history"),  # above max_request_history
        ({"user_id": 1, "history": [1, "x"]}, "history"),
        ({"user_id": 1, "history": [1, -2]}, "history"),
        ({"user_id": 1, "budget_ms": 0}, "budget_ms"),
        ({"user_id": 1, "surprise": True}, "surprise"),
    ],
)
def test_validation_names_the_field(api: TestClient, body: dict, field: str) -> None:
    r = api.post("/v1/recommend", json=body)
    assert r.status_code == 422, r.text
    locs = [d["loc"] for d in r.json()["detail"]]
    assert any(field in map(str, loc) for loc in locs), locs


@pytest.fixture(scope="module")
def api(world: TinyWorld, redis_server: RedisServer) -> Iterator[TestClient]:
    with running_app(make_settings(world, redis_server.url, "t_validation")) as c:
        yield c


def test_bad_bodies_and_paths(api: TestClient) -> None:
    c = api
    r = c.post("/v1/recommend", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422
    assert c.post("/v1/events", json={"user_id": 1, "items": []}).status_code == 422
    r = c.post("/v1/events", json={"user_id": 1, "items": list(range(101))})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "items"]
    assert c.get("/v1/users/-3/think").status_code == 422
    assert c.get("/v1/users/abc/think").status_code == 422
    assert c.get("/healthz").json() == {"status": "ok"}
    huge = b'{"user_id": 1, "history": [' + b"1," * 40_000 + b"1]}"
    r = c.post("/v1/recommend", content=huge, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "larger than" in r.json()["detail"]

    def chunks():  # no content-length: the limit still holds
        yield b'{"user_id": 1, "history": ['
        for _ in range(100):
            yield b"1," * 400
        yield b"1]}"

    js = {"content-type": "application/json"}
    assert c.post("/v1/recommend", content=chunks(), headers=js).status_code == 413
    small = c.post("/v1/recommend", content=iter([b'{"user_id": ', b"1}"]), headers=js)
    assert small.status_code == 200 and small.json()["items"]


def test_openapi_documents_bodies_and_errors(api: TestClient) -> None:
    spec = api.get("/openapi.json").json()
    op = spec["paths"]["/v1/recommend"]["post"]
    assert op["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("RecommendResponse")
    assert {"200", "401", "422"} <= set(op["responses"])
    assert {"503", "202"} <= set(spec["paths"]["/v1/events"]["post"]["responses"])
    assert "503" in spec["paths"]["/readyz"]["get"]["responses"]
    assert "APIKeyHeader" in spec["components"]["securitySchemes"]
    assert "/" not in spec["paths"]


def test_api_key(world: TinyWorld, redis_server: RedisServer, ns: str) -> None:
    with running_app(make_settings(world, redis_server.url, ns, api_key="s3cret")) as c:
        assert c.post("/v1/recommend", json={"user_id": 1}).status_code == 401
        assert c.post("/v1/recommend", json={"user_id": 1}, headers={"X-API-Key": "nope"}).status_code == 401
        r = c.post("/v1/recommend", json={"user_id": 1}, headers={"X-API-Key": "s3cret"})
        assert r.status_code == 200 and len(r.json()["items"]) == 10
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200


def test_demo_page_served(api: TestClient) -> None:
    r = api.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "/v1/recommend" in r.text and "/v1/users" in r.text
    assert len(api.get("/v1/users", params={"limit": 5}).json()["users"]) == 5

