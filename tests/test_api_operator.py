"""What an operator sees: a live-version pointer naming no version is a degraded readiness state with a metric,
a short body is cut off by the default body-read timeout, an event with only unknown items says nothing was
stored, and `k` / `history` over the server's limit get one limit in one message."""

from __future__ import annotations

import socket
import time
from urllib.parse import urlparse

import pytest
import redis
from api_support import TinyWorld, build_tiny_world, entry_for, make_settings, running_app, serving_http
from conftest import RedisServer

from services.config import setting_default
from services.store import ThinkStore


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> TinyWorld:
    return build_tiny_world(tmp_path_factory.mktemp("operator"))


def gauge(text: str, name: str) -> float:
    line = next(x for x in text.splitlines() if x.startswith(name + " "))
    return float(line.split()[1])


def test_a_pointer_naming_no_version_is_degraded_not_silently_ready(
    world: TinyWorld, redis_server: RedisServer, redis_client: redis.Redis, ns: str
) -> None:
    store = ThinkStore(redis_client, ns)
    with running_app(make_settings(world, redis_server.url, ns)) as c:
        r = c.get("/readyz")  # nothing published yet: ready (answers online-only), and says so
        assert r.status_code == 200 and r.json()["degraded"] is True and "nothing published" in r.json()["detail"]
        redis_client.set(store.keys.current, "ghost")  # a valid name, but no such version
        r = c.get("/readyz")
        assert r.status_code == 200 and r.json()["ready"] is True and r.json()["degraded"] is True, r.json()
        assert "'ghost', which does not exist" in r.json()["detail"]
        assert gauge(c.get("/metrics").text, "onerec_think_ahead_degraded") == 1.0
        assert c.post("/v1/recommend", json={"user_id": 3, "k": 5}).json()["source"] == "online-only"

        store.begin_version("v1", {})
        store.write_entries("v1", {3: entry_for(world, 3)}, 3600)
        store.publish("v1", 1)
        r = c.get("/readyz")
        assert r.status_code == 200 and r.json()["degraded"] is False and r.json()["detail"] is None, r.json()
        assert gauge(c.get("/metrics").text, "onerec_think_ahead_degraded") == 0.0
        assert c.post("/v1/recommend", json={"user_id": 3, "k": 5}).json()["source"] == "think-ahead"


def test_the_default_body_read_timeout_cuts_off_a_short_body(world: TinyWorld, redis_server: RedisServer) -> None:
    """Content-Length 100, 10 bytes sent: the default setting answers 408 within 3 s."""
    default = float(setting_default("body_read_timeout_s"))
    assert default <= 3.0
    with serving_http(make_settings(world, redis_server.url, "t_body")) as base:
        u = urlparse(base)
        with socket.create_connection((u.hostname, u.port), timeout=10) as s:
            s.sendall(b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 100\r\n\r\n{\"user_id\"")  # fmt: skip
            t0 = time.monotonic()
            head = s.recv(4096)
            waited = time.monotonic() - t0
    assert head.startswith(b"HTTP/1.1 408"), head
    assert default - 0.2 < waited < 3.0, waited


def test_events_with_only_unknown_items_say_nothing_was_stored(world: TinyWorld, redis_server: RedisServer,
                                                              redis_client: redis.Redis, ns: str) -> None:  # fmt: skip
    with running_app(make_settings(world, redis_server.url, ns)) as c:
        r = c.post("/v1/events", json={"user_id": 5, "items": [31337, 31338]})
        assert r.status_code == 200, r.text
        assert r.json() == {"user_id": 5, "accepted": 0, "unknown_items": 2, "stored": False, "history_len": None,
                            "detail": "no item is in the catalogue: nothing stored"}  # fmt: skip
        assert ThinkStore(redis_client, ns).get_history(5) == []


def test_limits_over_the_server_maximum_name_one_limit(world: TinyWorld, redis_server: RedisServer, ns: str) -> None:
    with running_app(make_settings(world, redis_server.url, ns, max_k=100, max_request_history=200)) as c:
        for k in (101, 1001, 5000):  # under and over the schema's hard bound (1000): the same answer
            r = c.post("/v1/recommend", json={"user_id": 1, "k": k})
            assert r.status_code == 422, r.text
            (err,) = r.json()["detail"]
            assert err["loc"] == ["body", "k"] and err["msg"] == "k must be at most 100 (server limit)", err
            assert err["ctx"] == {"le": 100} and err["input"] == k
        item = int(world.sid.item_ids[0])
        for n in (201, 1001):
            r = c.post("/v1/recommend", json={"user_id": 1, "history": [item] * n})
            (err,) = r.json()["detail"]
            assert err["msg"] == "history may hold at most 200 items (server limit)" and err["input"] == n, err
        assert c.get("/openapi.json").json()["components"]["schemas"]["RecommendRequest"]["properties"]["k"][
            "maximum"] == 100  # fmt: skip
