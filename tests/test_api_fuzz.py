"""OpenAPI fuzzing in CI: a few hundred schemathesis cases against the app on a real socket and Redis.

Positive cases (anything the served schema allows) must be answered 2xx with schema-conforming bodies;
negative cases (anything it forbids) must get a documented 4xx; nothing may be a 5xx. Some users have
think-ahead entries, some corrupt or foreign values, so the think-ahead, online-only and corrupt paths
all run. `python -m benchmarks.faults` runs the same fuzzer with >= 1000 cases on the real artifacts.
"""

from __future__ import annotations

import pytest
import redis
from api_support import TinyWorld, build_tiny_world, entry_for, make_settings, serving_http
from conftest import RedisServer

from benchmarks.fuzz import fuzz
from services.store import ThinkStore

pytestmark = pytest.mark.timeout(180)
KEY = "fuzz-key"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> TinyWorld:
    return build_tiny_world(tmp_path_factory.mktemp("tiny"))


def test_fuzzed_requests_get_no_5xx_and_schema_conforming_answers(
    world: TinyWorld, redis_server: RedisServer, redis_client: redis.Redis, ns: str
) -> None:
    store = ThinkStore(redis_client, ns)
    store.begin_version("v1", {"model": "think-test"})
    store.write_entries("v1", {u: entry_for(world, u) for u in world.sequences}, 3600)
    store.publish("v1", len(world.sequences))
    store.write_histories(world.sequences, 50)
    redis_client.set(store.keys.think("v1", 0), b"\xff not an entry")  # user 0 is the fuzzer's favourite
    redis_client.delete(store.keys.think("v1", 2), store.keys.history(1))
    redis_client.rpush(store.keys.think("v1", 2), b"foreign list")
    redis_client.set(store.keys.history(1), b"foreign string")
    with serving_http(make_settings(world, redis_server.url, ns, api_key=KEY)) as base:
        report = fuzz(base, per_operation=40, api_key=KEY)
    print(report.summary())
    assert report.cases >= 300
    assert report.server_errors == 0 and report.transport_errors == 0, report.examples
    assert not report.check_failures, (dict(report.check_failures), report.examples)
    assert any(k.startswith("POST /v1/recommend positive 200") for k in report.statuses)
    assert any(k.startswith("POST /v1/recommend negative 422") for k in report.statuses)
