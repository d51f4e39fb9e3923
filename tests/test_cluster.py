"""The store, the offline worker and the online API against a real local Redis Cluster (3 primaries + 3 replicas).

Refresh (the real CLI with the HF engine on the tiny model), status, publish, gc, rollback, incremental refresh,
recommend think-ahead and events through the API, misconfiguration errors, and a primary SIGKILLed under the
API. Every test uses its own namespace on the session's cluster; the failover test runs last and restarts the
killed node (it rejoins as a replica).
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from typing import Any

import pytest
import redis
from api_support import TinyWorld as ApiWorld
from api_support import build_tiny_world, entry_for, make_settings, running_app
from offline_helpers import TinyWorld, build_world
from redis.cluster import RedisCluster

from offline_worker.__main__ import main as cli_main
from services.harness import LocalRedisCluster
from services.store import AsyncThinkReader, ThinkStore
from services.store.connect import ClusterModeError, cluster_nodes, connect, connect_async

N_USERS = 40  # offline_helpers' world


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> TinyWorld:
    return build_world(tmp_path_factory.getbasetemp() / "offline_world")


@pytest.fixture(scope="module")
def api_world(tmp_path_factory: pytest.TempPathFactory) -> ApiWorld:
    return build_tiny_world(tmp_path_factory.mktemp("cluster_api"))


@pytest.fixture
def store(redis_cluster: LocalRedisCluster, ns: str) -> Any:
    client = connect(redis_cluster.url)
    assert isinstance(client, RedisCluster)
    yield ThinkStore(client, ns)
    client.close()


def keys_per_primary(cluster: LocalRedisCluster, pattern: str) -> list[int]:
    """How many keys matching `pattern` each primary holds (SCAN on each node directly)."""
    out = []
    for node in cluster.primaries():
        c = redis.Redis(host=node.host, port=node.port)
        out.append(sum(1 for _ in c.scan_iter(match=pattern, count=1000)))
        c.close()
    return out


def refresh_args(cluster: LocalRedisCluster, ns: str, world: TinyWorld, *extra: str) -> list[str]:
    return ["--redis-url", cluster.url, "--namespace", ns, "refresh", "--engine", "hf", "--model", str(world.model_dir),
            "--sid", str(world.sid_dir), "--chunk", "8", "--samples", "1", "--prefixes", "4", "--beam-a", "2",
            "--max-reasoning-tokens", "4", "--no-progress", *extra]  # fmt: skip


def run_cli(capsys: pytest.CaptureFixture[str], args: list[str]) -> dict[str, Any]:
    capsys.readouterr()
    rc = cli_main(args)
    out = capsys.readouterr()
    assert rc == 0, out.err[-2000:]
    return dict(json.loads(out.out))


# --------------------------------------------------------------------------- configuration


def test_cluster_urls_and_misconfiguration(redis_cluster: LocalRedisCluster, ns: str,
                                           capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    assert cluster_nodes("redis://h:1/0") is None
    assert cluster_nodes("redis+cluster://:pw@a:7000,b:7001") == ([("a", 7000), ("b", 7001)], {"password": "pw"})
    with pytest.raises(ValueError, match="bad node"):
        cluster_nodes("redis+cluster://a:7000,:x")
    node = redis_cluster.nodes[0]
    plain = f"redis://{node.host}:{node.port}/0"
    with pytest.raises(ClusterModeError, match=r"use redis\+cluster://"):
        connect(plain)
    # the CLI refuses it with the same words, before touching any key
    assert cli_main(["--redis-url", plain, "--namespace", ns, "status"]) == 2
    assert "use redis+cluster://" in capsys.readouterr().err


def test_plain_url_naming_a_cluster_node_is_not_ready(redis_cluster: LocalRedisCluster, api_world: ApiWorld,
                                                      ns: str) -> None:  # fmt: skip
    node = redis_cluster.nodes[0]
    settings = make_settings(api_world, f"redis://{node.host}:{node.port}/0", ns)
    with running_app(settings, ready=False) as c:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            r = c.get("/readyz")
            if "redis+cluster" in (r.json().get("detail") or "") and c.get("/readyz").json()["model"]:
                break
            time.sleep(0.05)
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["redis"] is False, r.json()
        assert "use redis+cluster://" in r.json()["detail"]
        assert c.post("/v1/recommend", json={"user_id": 1, "k": 3}).status_code == 200  # answers, by fallback


# --------------------------------------------------------------------------- offline worker


def test_refresh_incremental_publish_gc_rollback_on_a_cluster(
    redis_cluster: LocalRedisCluster, store: ThinkStore, world: TinyWorld, ns: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """One full refresh (HF engine), an incremental refresh of stale users into it, a second version that
    recomputes two users and COPYs the rest, then gc and rollback: all through the CLI on a cluster URL."""
    users = sorted(world.sequences)
    first = run_cli(capsys, refresh_args(redis_cluster, ns, world, "--data", str(world.data_dir)))
    assert first["published"] and first["computed"] == N_USERS
    v1 = first["version"]
    per_node = keys_per_primary(redis_cluster, f"{ns}:think:{v1}:{{*}}")
    assert sum(per_node) == N_USERS and all(n > 0 for n in per_node), per_node  # spread over every primary
    status = run_cli(capsys, ["--redis-url", redis_cluster.url, "--namespace", ns, "status"])
    assert status["current"] == v1 and status["entries"] == N_USERS and status["live"]
    for u, e in store.get_entries(v1, users).items():
        assert e is not None and e.history_tail == world.sequences[u][-len(e.history_tail) :]
        assert store.get_history(u) == world.sequences[u]

    # incremental: events through the online reader (script + staleness zset: two slots), then --min-staleness
    stale = users[:9]  # over several shards
    before = store.get_entries(v1, users)

    async def append() -> None:
        client = connect_async(redis_cluster.url, 2.0, 8)
        reader = AsyncThinkReader(client, ns)
        for u in stale:
            await reader.append_events(u, [1, 2], 50, f"a{u}")
            await reader.append_events(u, [1, 2], 50, f"a{u}")  # a retry: applied and counted once
        await client.aclose()

    asyncio.run(append())
    assert store.stale_users() == [(u, 2) for u in stale]
    rep = run_cli(capsys, refresh_args(redis_cluster, ns, world, "--min-staleness", "2"))
    assert rep["version"] == v1 and rep["computed"] == len(stale)
    after = store.get_entries(v1, users)
    for u in users:
        a, b = after[u], before[u]
        assert a is not None and b is not None
        assert (a.history_tail[-2:] == [1, 2]) == (u in stale), u
        assert (a != b) == (u in stale), u
    assert store.stale_users() == [] and store.current_version() == v1

    # a new version: two users recomputed, the rest copied (COPY within each user's slot)
    second = run_cli(capsys, refresh_args(redis_cluster, ns, world, "--data", str(world.data_dir), "--users", "list",
                                          "--user-list", "1,2"))  # fmt: skip
    v2 = second["version"]
    assert second["published"] and v2 != v1 and second["computed"] == 2
    assert store.current_version() == v2 and store.previous_version() == v1 and store.count_entries(v2) == N_USERS

    store.begin_version("old", {})  # a third version that gc may remove
    store.write_entries("old", {1: after[1]}, 60)  # type: ignore[dict-item]
    gone = run_cli(capsys, ["--redis-url", redis_cluster.url, "--namespace", ns, "gc", "--keep", "0"])
    assert gone["removed"] == ["old"] and sum(keys_per_primary(redis_cluster, f"{ns}:think:old:*")) == 0
    back = run_cli(capsys, ["--redis-url", redis_cluster.url, "--namespace", ns, "rollback"])
    assert back == {"current": v1, "previous": v2}


# --------------------------------------------------------------------------- online API


def publish_api_entries(store: ThinkStore, world: ApiWorld, version: str = "v1") -> dict[int, Any]:
    entries = {u: entry_for(world, u, reasoning=f"user {u} on a cluster") for u in sorted(world.sequences)}
    store.begin_version(version, {"model": "think-test"})
    store.write_entries(version, entries, 3600)
    store.publish(version, len(entries))
    store.write_histories(world.sequences, 50)
    return entries


def test_recommend_think_ahead_and_events_through_the_api(redis_cluster: LocalRedisCluster, store: ThinkStore,
                                                          api_world: ApiWorld, ns: str) -> None:  # fmt: skip
    publish_api_entries(store, api_world)
    users = sorted(api_world.sequences)
    with running_app(make_settings(api_world, redis_cluster.url, ns)) as c:
        for u in users:  # 40 users: every primary serves some of them
            r = c.post("/v1/recommend", json={"user_id": u, "k": 5})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["source"] == "think-ahead" and body["version"] == "v1", (u, body)
            assert body["reasoning"] == f"user {u} on a cluster"
        item = int(api_world.sid.item_ids[0])
        for u in users[:6]:
            r = c.post("/v1/events", json={"user_id": u, "items": [item]})
            assert r.status_code == 200 and r.json()["stored"] is True, r.text
            assert store.get_history(u) == [*api_world.sequences[u], item]
        assert store.staleness(users[:6]) == dict.fromkeys(users[:6], 1)


def test_primary_killed_under_the_api(redis_cluster: LocalRedisCluster, store: ThinkStore, api_world: ApiWorld,
                                      ns: str) -> None:  # fmt: skip
    """SIGKILL the primary of some users: no 5xx, their answers fall back meanwhile and return to think-ahead
    once the replica is promoted; events answered as stored are in the history afterwards."""
    publish_api_entries(store, api_world)
    users = sorted(api_world.sequences)
    victim = redis_cluster.node_of(store.keys.history(users[0]))
    shard_users = [u for u in users if redis_cluster.node_of(store.keys.history(u)).port == victim.port]
    item = int(api_world.sid.item_ids[1])
    stored: list[int] = []
    try:
        with running_app(make_settings(api_world, redis_cluster.url, ns, redis_timeout_ms=200)) as c:
            victim.signal(signal.SIGKILL)
            t0 = time.monotonic()
            sources: set[str] = set()
            recovered = None
            while time.monotonic() - t0 < 30:
                for u in shard_users[:3]:
                    r = c.post("/v1/recommend", json={"user_id": u, "k": 5})
                    assert r.status_code == 200, r.text
                    sources.add(r.json()["source"])
                    e = c.post("/v1/events", json={"user_id": u, "items": [item]})
                    assert e.status_code in (200, 202), e.text
                    if e.json()["stored"]:
                        stored.append(u)
                if recovered is None and all(
                    c.post("/v1/recommend", json={"user_id": u, "k": 5}).json()["source"] == "think-ahead"
                    for u in shard_users
                ) and time.monotonic() - t0 > 0.5:  # fmt: skip
                    recovered = time.monotonic() - t0
                    break
                time.sleep(0.05)
            assert recovered is not None, f"think-ahead did not return for the killed shard in 30 s ({sources})"
            time.sleep(1.0)  # events queued during the outage are flushed by the API
        for u in set(stored):
            assert store.get_history(u).count(item) >= stored.count(u), u
    finally:
        victim.proc = None
        victim.start()  # rejoins as a replica of the promoted node
        redis_cluster.wait_ok(30)


def test_cluster_is_whole_again(redis_cluster: LocalRedisCluster) -> None:
    assert len(redis_cluster.primaries()) == 3 and all(n.running for n in redis_cluster.nodes)


