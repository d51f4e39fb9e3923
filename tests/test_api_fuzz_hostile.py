"""The hostile-input fuzzers (`benchmarks.hostile`), CI-sized and seeded: hostile HTTP bytes and hostile Redis
values against the app on a real socket and a real redis-server. No case may be a 5xx, hang past the budget
+ 1 s, or answer a body that says JSON and is not. `python -m benchmarks.faults` runs the same fuzzers with
>= 5,000 and >= 1,000 cases.
"""

from __future__ import annotations

import pytest
import redis
from api_support import TinyWorld, build_tiny_world, entry_for, make_settings, serving_http
from conftest import RedisServer

from benchmarks.hostile import http_cases, redis_value_cases, refusal_check, run_http_fuzz, run_redis_fuzz
from services.store import ThinkStore

pytestmark = pytest.mark.timeout(240)
KEY = "hostile-key"
BUDGET_S = 2.0  # make_settings' default_budget_ms


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> TinyWorld:
    return build_tiny_world(tmp_path_factory.mktemp("tiny"))


def seed(world: TinyWorld, client: redis.Redis, ns: str) -> ThinkStore:
    store = ThinkStore(client, ns)
    store.begin_version("v1", {"model": "think-test"})
    store.write_entries("v1", {u: entry_for(world, u) for u in world.sequences}, 3600)
    store.publish("v1", len(world.sequences))
    store.write_histories(world.sequences, 50)
    return store


def test_hostile_http_and_redis_values_get_no_5xx(world: TinyWorld, redis_server: RedisServer,
                                                  redis_client: redis.Redis, ns: str) -> None:
    store = seed(world, redis_client, ns)
    users, items = sorted(world.sequences), world.sid.item_ids.tolist()
    with serving_http(make_settings(world, redis_server.url, ns, api_key=KEY)) as base:
        http = run_http_fuzz(base, http_cases(600, users, items, seed=0), api_key=KEY, budget_s=BUDGET_S)
        print(http.summary())
        assert http.cases == 600
        assert http.server_errors == 0 and http.transport_errors == 0 and http.hangs == 0, http.examples
        assert http.bad_bodies == 0, http.examples
        for kind in ("mutate", "unicode", "depth", "number", "content_type", "path"):
            assert any(k.startswith(f"{kind} 422") for k in http.statuses), http.statuses  # each class ran

        cases = redis_value_cases(200, users[1:], "v1", store.keys, seed=0)
        targeted, background = run_redis_fuzz(base, redis_client, cases, users[0], items[0], KEY, BUDGET_S)
        print(targeted.summary(), background.summary())
        assert targeted.cases == 800 and background.cases > 0
        for counts in (targeted, background):
            assert counts.server_errors == 0 and counts.transport_errors == 0 and counts.hangs == 0, counts.examples
            assert counts.bad_bodies == 0, counts.examples
        # put back after each case: the healthy user is still answered from its entry
        r = redis_client.get(store.keys.current)
        assert r == b"v1"


def test_write_refusals_leave_the_read_breaker_shut(world: TinyWorld, redis_server: RedisServer,
                                                    redis_client: redis.Redis, ns: str) -> None:
    seed(world, redis_client, ns)
    users = sorted(world.sequences)[:10]
    settings = make_settings(world, redis_server.url, ns, redis_breaker_failures=1, redis_backoff_ms=5000.0)
    with serving_http(settings) as base:
        out = refusal_check(base, redis_client, users, world.sequences[1][0], per_mode=20, budget_s=BUDGET_S)
    print(out)
    for mode in ("oom", "readonly"):
        assert out[mode]["events"] == {"202 stored=False": 20}, out
        assert out[mode]["recommends"] == {"200 think-ahead degraded=False": 20}, out
        assert out[mode]["breaker_open_samples"] == 0 and out[mode]["refusals_counted"] == len(users), out
        assert out[mode]["pending_after_s"] == 0, out
    assert out["breaker_fallbacks"] == 0
