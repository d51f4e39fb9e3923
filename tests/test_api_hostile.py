"""Hostile input to the online API: every malformed request is a 4xx naming what is wrong, never a 5xx.

Complements the field-by-field cases of test_api_recommend.py (ids, k and history bounds, unknown fields,
non-JSON, oversized bodies): bodies that are not objects or not text, numbers JSON cannot hold, booleans and
strings where numbers belong, nesting deep enough to break a parser, huge histories of unknown items.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis
from api_support import TinyWorld, build_tiny_world, entry_for, make_settings, running_app
from conftest import RedisServer
from fastapi.testclient import TestClient

from online_api.schemas import MAX_ID
from services.store import ThinkStore

pytestmark = pytest.mark.timeout(120)
JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> TinyWorld:
    return build_tiny_world(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def api(world: TinyWorld, redis_server: RedisServer) -> Iterator[TestClient]:
    with running_app(make_settings(world, redis_server.url, "t_hostile")) as c:
        yield c


def locs(r: Any) -> list[list[Any]]:
    return [d["loc"] for d in r.json()["detail"]]


def names(r: Any, loc: list[Any]) -> bool:
    """Some error of the 422 body is at `loc` or inside it (a JSON error adds the offset: ["body", 0])."""
    return any(list(got[: len(loc)]) == loc for got in locs(r))


@pytest.mark.parametrize(
    ("raw", "loc"),
    [
        (b"[1]", ["body"]),
        (b'"user"', ["body"]),
        (b"null", ["body"]),
        (b"", ["body"]),
        (b"\xff\xfe\x00 not text", ["body"]),
        (b"[" * 30_000 + b"]" * 30_000, ["body"]),  # deeper than Python's JSON parser recursion
        (b'{"user_id": 1e400}', ["body", "user_id"]),  # parses as inf: not an int, and not renderable
        (b'{"user_id": NaN}', ["body", "user_id"]),
        (b'{"user_id": 1, "budget_ms": NaN}', ["body", "budget_ms"]),
        (b'{"user_id": 1, "budget_ms": Infinity}', ["body", "budget_ms"]),
        (b'{"user_id": 1, "history": [1, -Infinity]}', ["body", "history", 1]),
    ],
)
def test_bodies_that_are_not_a_request_object(api: TestClient, raw: bytes, loc: list[Any]) -> None:
    r = api.post("/v1/recommend", content=raw, headers=JSON)
    assert r.status_code == 422, r.text
    assert names(r, loc), r.text


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ({"user_id": True}, ["body", "user_id"]),  # pydantic's lax mode would read true as 1
        ({"user_id": "7"}, ["body", "user_id"]),  # ... and "7" as 7
        ({"user_id": MAX_ID + 1}, ["body", "user_id"]),
        ({"user_id": 10**40}, ["body", "user_id"]),
        ({"user_id": 1, "k": True}, ["body", "k"]),
        ({"user_id": 1, "k": 2.5}, ["body", "k"]),
        ({"user_id": 1, "k": [3]}, ["body", "k"]),
        ({"user_id": 1, "budget_ms": "50"}, ["body", "budget_ms"]),
        ({"user_id": 1, "budget_ms": -5}, ["body", "budget_ms"]),
        ({"user_id": 1, "history": {"1": 2}}, ["body", "history"]),
        ({"user_id": 1, "history": [[1]]}, ["body", "history", 0]),
        ({"user_id": 1, "history": [False]}, ["body", "history", 0]),
        ({"user_id": {"id": 1}}, ["body", "user_id"]),
    ],
)
def test_wrong_types_name_the_field(api: TestClient, body: dict, loc: list[Any]) -> None:
    r = api.post("/v1/recommend", json=body)
    assert r.status_code == 422, r.text
    assert loc in locs(r), r.text


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ({"user_id": 1, "items": {"1": 2}}, ["body", "items"]),
        ({"user_id": 1, "items": [True]}, ["body", "items", 0]),
        ({"user_id": 1, "items": ["1001"]}, ["body", "items", 0]),
        ({"user_id": 1, "items": [MAX_ID + 1]}, ["body", "items", 0]),
        ({"user_id": False, "items": [1]}, ["body", "user_id"]),
        ([], ["body"]),
    ],
)
def test_events_wrong_types_name_the_field(api: TestClient, body: Any, loc: list[Any]) -> None:
    r = api.post("/v1/events", json=body)
    assert r.status_code == 422, r.text
    assert loc in locs(r), r.text


@pytest.mark.parametrize(
    ("method", "url", "status", "loc"),
    [
        ("get", "/v1/users/1e3/think", 422, ["path", "user_id"]),
        ("get", f"/v1/users/{MAX_ID + 1}/think", 422, ["path", "user_id"]),
        ("get", "/v1/users/99999999999999999999999999/think", 422, ["path", "user_id"]),
        ("get", "/v1/users?limit=abc", 422, ["query", "limit"]),
        ("get", "/v1/users?limit=100000", 422, ["query", "limit"]),
        ("get", "/v1/recommend", 405, None),
        ("delete", "/v1/events", 405, None),
    ],
)
def test_bad_paths_queries_and_methods(api: TestClient, method: str, url: str, status: int, loc: Any) -> None:
    r = getattr(api, method)(url)
    assert r.status_code == status, r.text
    if loc is not None:
        assert loc in locs(r), r.text


def test_json_body_without_json_content_type_is_a_422(api: TestClient) -> None:
    r = api.post("/v1/recommend", content=b'{"user_id": 1}', headers={"content-type": "text/plain"})
    assert r.status_code == 422 and ["body"] in locs(r)


def test_integral_floats_are_integers_as_json_schema_says(api: TestClient) -> None:
    r = api.post("/v1/recommend", json={"user_id": 1.0, "k": 3.0})
    assert r.status_code == 200 and len(r.json()["items"]) == 3


def test_huge_history_of_unknown_items_is_answered(world: TinyWorld, api: TestClient, redis_server: RedisServer,
                                                   redis_client: redis.Redis) -> None:
    """200 unknown ids (the server's limit) are dropped and counted, and do not push the stored history out
    of the model's window (history_max = 50): consumed items are still excluded."""
    ThinkStore(redis_client, "t_hostile").write_histories({3: world.sequences[3]}, 50)
    unknown = list(range(10**9, 10**9 + 200))
    r = api.post("/v1/recommend", json={"user_id": 3, "k": 5, "history": unknown})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["unknown_items"] == 200 and len(body["items"]) == 5 and body["source"] != "fallback"
    assert not {it["item_id"] for it in body["items"]} & set(world.sequences[3])
    r = api.post("/v1/events", json={"user_id": 3, "items": unknown[:100]})
    assert r.status_code == 200 and r.json()["accepted"] == 0 and r.json()["unknown_items"] == 100


def test_foreign_values_under_a_users_keys(world: TinyWorld, redis_server: RedisServer, redis_client: redis.Redis,
                                           ns: str) -> None:
    """Another Redis type, an oversized value, non-finite numbers: that user is answered online-only, and the
    other users keep their think-ahead answers (one bad key must not trip the Redis breaker for everyone)."""
    store = ThinkStore(redis_client, ns)
    store.begin_version("v1", {"model": "think-test"})
    store.write_entries("v1", {u: entry_for(world, u) for u in range(1, 9)}, 3600)
    store.publish("v1", 8)
    store.write_histories({u: world.sequences[u] for u in range(1, 9)}, 50)
    redis_client.delete(store.keys.think("v1", 1), store.keys.history(2))
    redis_client.rpush(store.keys.think("v1", 1), b"a list where an entry belongs")
    redis_client.set(store.keys.history(2), b"a string where a list belongs")
    redis_client.set(store.keys.think("v1", 3), b"{" + b" " * (4 << 20) + b"}")  # 4 MiB
    good = store.r.get(store.keys.think("v1", 4)).replace(b'"t":', b'"t":1e400,"x":')
    redis_client.set(store.keys.think("v1", 4), good)
    with running_app(make_settings(world, redis_server.url, ns)) as c:
        for _ in range(2):
            for user in (1, 2, 3, 4):
                r = c.post("/v1/recommend", json={"user_id": user, "k": 5})
                assert r.status_code == 200, r.text
                assert r.json()["degraded"] is False and r.json()["source"] in ("online-only", "think-ahead"), r.text
                healthy = c.post("/v1/recommend", json={"user_id": 5, "k": 5}).json()
                assert healthy["source"] == "think-ahead" and healthy["degraded"] is False, healthy
        assert c.post("/v1/recommend", json={"user_id": 2}).json()["source"] == "think-ahead"  # entry fine
        for user in (1, 2, 3, 4):
            t = c.get(f"/v1/users/{user}/think")
            assert t.status_code == 200 and t.json()["degraded"] is False
        r = c.post("/v1/events", json={"user_id": 2, "items": [world.sequences[2][0]]})
        assert r.status_code == 200 and r.json()["stored"] is True and r.json()["history_len"] == 1
        assert 'onerec_fallback_total{reason="redis_error"}' not in c.get("/metrics").text
