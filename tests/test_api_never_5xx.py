"""Hostile input gets no 5xx, whatever arrives. One test per class of input that used to give a 500, against a real
redis-server: the 422 path rendering hostile input (surrogates, depth, bytes, multipart), corrupt think entries
that still decode, a bad live-version pointer, Redis refusing writes (OOM, READONLY), and parse errors that were
all called "not UTF-8 JSON". The seeded fuzzers over the same classes are in test_api_fuzz_hostile.py.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlparse

import pytest
import redis
from api_support import TinyWorld, build_tiny_world, entry_for, make_settings, running_app, serving_http
from conftest import RedisServer
from fastapi.testclient import TestClient

from online_api import errors
from services.store import ThinkStore

pytestmark = pytest.mark.timeout(120)
JSON = {"content-type": "application/json"}
MAX_422_BYTES = 8192  # a 422 body stays small whatever the input was


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> TinyWorld:
    return build_tiny_world(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def api(world: TinyWorld, redis_server: RedisServer) -> Iterator[TestClient]:
    with running_app(make_settings(world, redis_server.url, "t_never5xx")) as c:
        yield c


def seed(world: TinyWorld, client: redis.Redis, ns: str, users: range = range(1, 9)) -> ThinkStore:
    store = ThinkStore(client, ns)
    store.begin_version("v1", {"model": "think-test"})
    store.write_entries("v1", {u: entry_for(world, u) for u in users}, 3600)
    store.publish("v1", len(users))
    store.write_histories({u: world.sequences[u] for u in users}, 50)
    return store


def a_422(r: Any) -> list[dict[str, Any]]:
    """The response is a bounded, parseable 422; returns its errors."""
    assert r.status_code == 422, (r.status_code, r.text[:500])
    assert len(r.content) <= MAX_422_BYTES, len(r.content)
    detail = json.loads(r.content)["detail"]
    assert isinstance(detail, list) and detail
    return detail


# --------------------------------------------------------------------------- 1. the 422 path cannot fail


def _deep(n: int) -> str:
    return "[" * n + "]" * n


@pytest.mark.parametrize("field", ["user_id", "k", "history", "budget_ms", "unknown"])
@pytest.mark.parametrize("value", ['"\\ud800"', '"\\udfff x"', '["\\ud800"]', '{"\\ud800": 1}', _deep(520)])
def test_lone_surrogates_and_depth_in_any_field_are_a_422(api: TestClient, field: str, value: str) -> None:
    raw = ('{"user_id": 1, "' + field + '": ' + value + "}").encode()
    detail = a_422(api.post("/v1/recommend", content=raw, headers=JSON))
    assert any(field in d["loc"] or d["loc"] == ["body"] for d in detail), detail


@pytest.mark.parametrize(
    ("raw", "ctype"),
    [
        (b"\xff\xfe\xfd not text", "text/plain"),
        (b"\xed\xa0\x80", "application/octet-stream"),  # a UTF-8-encoded lone surrogate
        (b"--x\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\n\xff\r\n", "multipart/form-data; boundary=x"),
        (b"--broken", "multipart/form-data"),  # no boundary
        (b"a=\xff&b", "application/x-www-form-urlencoded"),
    ],
)
def test_bytes_under_any_content_type_are_a_422(api: TestClient, raw: bytes, ctype: str) -> None:
    for path in ("/v1/recommend", "/v1/events"):
        detail = a_422(api.post(path, content=raw, headers={"content-type": ctype}))
        assert any(d["loc"][:1] == ["body"] for d in detail), detail


def test_surrogate_in_events_and_path(api: TestClient) -> None:
    a_422(api.post("/v1/events", content=b'{"user_id": 1, "items": ["\\ud800"]}', headers=JSON))
    r = api.get("/v1/users/%ED%A0%80/think")  # percent-encoded lone surrogate in the path
    assert r.status_code == 422, r.text


# --------------------------------------------------------------------------- 5. parse errors say what is wrong


def test_too_deep_json_is_named_as_such(api: TestClient) -> None:
    for raw in (_deep(30_000).encode(), b'{"user_id": ' + _deep(200).encode() + b"}"):
        detail = a_422(api.post("/v1/recommend", content=raw, headers=JSON))
        assert "nest" in detail[0]["msg"] and "UTF-8" not in detail[0]["msg"], detail


def test_over_long_integer_is_named_as_such(api: TestClient) -> None:
    raw = b'{"user_id": ' + b"9" * 5000 + b"}"
    detail = a_422(api.post("/v1/recommend", content=raw, headers=JSON))
    assert "digits" in detail[0]["msg"] and "UTF-8" not in detail[0]["msg"], detail


def test_non_utf8_json_is_still_named_as_such(api: TestClient) -> None:
    detail = a_422(api.post("/v1/recommend", content=b'{"user_id": "\xff"}', headers=JSON))
    assert "UTF-8" in detail[0]["msg"], detail


def test_short_body_times_out_instead_of_holding_the_connection(world: TinyWorld, redis_server: RedisServer) -> None:
    """Content-Length larger than what is sent: answered 408 after the body-read timeout, not held forever."""
    with serving_http(make_settings(world, redis_server.url, "t_short", body_read_timeout_s=0.5)) as base:
        u = urlparse(base)
        with socket.create_connection((u.hostname, u.port), timeout=10) as s:
            s.sendall(b"POST /v1/recommend HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 100\r\n\r\n{\"user_id\"")  # fmt: skip
            t0 = time.monotonic()
            head = s.recv(4096)
            assert head.startswith(b"HTTP/1.1 408"), head
            assert time.monotonic() - t0 < 5


# --------------------------------------------------------------------------- 2. corrupt entries that decode


@pytest.mark.parametrize(
    "patch",
    [
        lambda raw: raw.replace(b'"r":"', b'"r":"\\ud800'),  # lone surrogate in the reasoning
        lambda raw: raw.replace(b'"m":"', b'"m":"\\udc00'),  # ... and in the model id
        lambda raw: raw.replace(b'"r":"', b'"r":"\\u0000\\u202e\\uffff'),  # odd but valid text: served
    ],
    ids=["reasoning_surrogate", "model_surrogate", "nul_rtl_nonchar"],
)
def test_entry_with_unsafe_text_is_missing_not_a_500(world: TinyWorld, redis_server: RedisServer,
                                                     redis_client: redis.Redis, ns: str, patch: Any) -> None:
    store = seed(world, redis_client, ns)
    key = store.keys.think("v1", 1)
    redis_client.set(key, patch(redis_client.get(key)))
    safe = b"\\ud8" not in redis_client.get(key) and b"\\udc" not in redis_client.get(key)
    with running_app(make_settings(world, redis_server.url, ns)) as c:
        r = c.post("/v1/recommend", json={"user_id": 1, "k": 5})
        assert r.status_code == 200, r.text
        assert r.json()["source"] == ("think-ahead" if safe else "online-only"), r.text
        t = c.get("/v1/users/1/think")
        assert t.status_code == 200, t.text
        assert (t.json()["entry"] is not None) == safe
        assert c.post("/v1/recommend", json={"user_id": 2, "k": 5}).json()["source"] == "think-ahead"
        if not safe:
            assert 'onerec_think_lookups_total{result="corrupt"} 1.0' in c.get("/metrics").text


# --------------------------------------------------------------------------- 3. the live-version pointer


@pytest.mark.parametrize("pointer", [b"", b"not a version!", b"current", b"\xff\xfe", b"v" * 65, b"a:b", b"list"])
def test_bad_version_pointer_is_a_clear_404_not_a_500(world: TinyWorld, redis_server: RedisServer,
                                                      redis_client: redis.Redis, ns: str, pointer: bytes) -> None:
    store = seed(world, redis_client, ns)
    if pointer == b"list":  # another Redis type under the pointer key
        redis_client.delete(store.keys.current)
        redis_client.rpush(store.keys.current, b"v1")
    else:
        redis_client.set(store.keys.current, pointer)
    with running_app(make_settings(world, redis_server.url, ns, redis_breaker_failures=1)) as c:
        for user in (1, 2, 3):
            t = c.get(f"/v1/users/{user}/think")
            assert t.status_code == 404 and "version" in t.json()["detail"], t.text
            r = c.post("/v1/recommend", json={"user_id": user, "k": 5})
            assert r.status_code == 200 and r.json()["source"] == "online-only", r.text
            assert r.json()["degraded"] is False  # Redis was read; the breaker stays shut for everyone
        text = c.get("/metrics").text
        assert "onerec_version_pointer_valid 0.0" in text, text
        assert 'reason="redis_breaker"' not in text and 'reason="redis_error"' not in text
        redis_client.delete(store.keys.current)
        redis_client.set(store.keys.current, b"v1")  # fixed: think-ahead again (current_ttl_s = 0)
        assert c.post("/v1/recommend", json={"user_id": 1, "k": 5}).json()["source"] == "think-ahead"
        assert c.get("/v1/users/1/think").status_code == 200
        assert "onerec_version_pointer_valid 1.0" in c.get("/metrics").text


# --------------------------------------------------------------------------- 4. write refusals


@pytest.mark.parametrize("refusal", ["oom", "readonly"])
def test_write_refusals_do_not_open_the_read_breaker(world: TinyWorld, redis_server: RedisServer,
                                                     redis_client: redis.Redis, ns: str, refusal: str) -> None:
    seed(world, redis_client, ns, range(1, 21))
    settings = make_settings(world, redis_server.url, ns, redis_breaker_failures=1, redis_backoff_ms=5000.0)
    item = world.sequences[1][0]
    with running_app(settings) as c:
        if refusal == "oom":
            redis_client.config_set("maxmemory-policy", "noeviction")
            redis_client.config_set("maxmemory", 1)
        else:
            redis_client.execute_command("REPLICAOF", "127.0.0.1", "1")  # a replica of nothing: READONLY
        try:
            sources = []
            for user in range(1, 21):
                e = c.post("/v1/events", json={"user_id": user, "items": [item]})
                assert e.status_code == 202 and e.json()["stored"] is False, e.text
                r = c.post("/v1/recommend", json={"user_id": user, "k": 5})
                assert r.status_code == 200, r.text
                sources.append((r.json()["source"], r.json()["degraded"]))
            assert sources == [("think-ahead", False)] * 20, sources
            text = c.get("/metrics").text
            assert f'onerec_redis_write_refusals_total{{reason="{refusal}"}} 20.0' in text, text
            assert "onerec_redis_breaker_open 0.0" in text
        finally:
            if refusal == "oom":
                redis_client.config_set("maxmemory", 0)
            else:
                redis_client.execute_command("REPLICAOF", "NO", "ONE")
        deadline = time.monotonic() + 10  # queued events are written once Redis takes writes again
        while c.get("/metrics").text.count("onerec_pending_events 0.0") == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "onerec_pending_events 0.0" in c.get("/metrics").text


# --------------------------------------------------------------------------- the last resort


def test_unrenderable_answer_is_a_degraded_fallback_and_one_log_line(
    world: TinyWorld, redis_server: RedisServer, redis_client: redis.Redis, ns: str, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An answer that fails after the route returned (here: titles no JSON encoder can write) is popular items,
    degraded, on recommend; a short JSON 500 elsewhere; one logged traceback, not one per request."""
    seed(world, redis_client, ns)
    monkeypatch.setattr(errors, "RATE_LOG", errors.RateLimitedLog(errors.log))  # fresh: nothing logged yet
    with running_app(make_settings(world, redis_server.url, ns)) as c:
        state = c.app.state.svc  # type: ignore[attr-defined]
        title = state.catalog.title
        state.catalog.title = lambda i: "\ud800" + title(i)
        try:
            with caplog.at_level("ERROR", logger="online_api.errors"):
                for _ in range(5):
                    r = c.post("/v1/recommend", json={"user_id": 1, "k": 4})
                    assert r.status_code == 200, r.text
                    body = r.json()
                    assert body["source"] == "fallback" and body["degraded"] is True and len(body["items"]) == 4
                    assert body["items"][0]["title"].startswith("\\ud800")
                    t = c.get("/v1/users/1/think")
                    assert t.status_code == 500 and t.json() == {"detail": "internal error (logged)"}
        finally:
            state.catalog.title = title
        tracebacks = [rec for rec in caplog.records if rec.exc_info]
        assert len(tracebacks) == 2, [rec.getMessage() for rec in caplog.records]  # one per route
        assert 'onerec_fallback_total{reason="internal_error"} 5.0' in c.get("/metrics").text
