"""Shared pytest fixtures: a real redis-server for the session, a clean client and namespace per test.

The server (`services.harness.RedisServer`) runs from PATH (or /usr/bin/redis-server) on a free localhost
port with persistence off, in a temporary folder. `redis_server.stop()` / `.start()` let a test kill Redis
mid-test and bring it back on the same port; `redis_client` restarts it if an earlier test left it down.
`redis_cluster` is a real 6-node Redis Cluster (`services.harness.LocalRedisCluster`), started only by the
tests that use it.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator

import pytest
import redis

from services.harness import LocalRedisCluster, RedisServer, find_redis_cli, find_redis_server


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A real redis-server for the whole session (`.url`, `.port`, `.stop()`, `.start()`)."""
    try:
        binary = find_redis_server()
    except FileNotFoundError as e:
        pytest.fail(str(e))
    server = RedisServer(tmp_path_factory.mktemp("redis"), binary=binary)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRedisCluster]:
    """A real local Redis Cluster (3 primaries + 3 replicas, 1 s node timeout) for the session; `.url` is its
    ``redis+cluster://`` URL. Skipped only where redis-cli (which creates the cluster) is not installed."""
    try:
        find_redis_server()
        find_redis_cli()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    cluster = LocalRedisCluster(tmp_path_factory.mktemp("redis_cluster"))
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def redis_client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A sync client to a flushed server (restarted first if an earlier test left it down)."""
    if not redis_server.running:
        redis_server.start()
    client = redis.Redis.from_url(redis_server.url, socket_timeout=5)
    client.flushall()
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def ns(request: pytest.FixtureRequest) -> str:
    """A namespace unique to this test (safe for `services.store` key names)."""
    name = re.sub(r"[^A-Za-z0-9_]", "_", request.node.name)[:40]
    return f"t_{name}_{uuid.uuid4().hex[:6]}"
