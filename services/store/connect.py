"""Redis clients from the one ``redis_url`` setting: a single Redis or a Redis Cluster, sync or asyncio.

- ``redis://host:port/db`` (or ``rediss://``, ``unix://``): one Redis, `redis.Redis` / `redis.asyncio.Redis`;
- ``redis+cluster://[user:password@]host:port[,host:port...]``: a Redis Cluster through redis-py's own
  `redis.cluster.RedisCluster` / `redis.asyncio.cluster.RedisCluster`. The nodes listed are only where the
  client starts: it asks any of them for the slot map and follows failovers itself, so list a few.

A plain URL that names one node of a cluster would work for some keys and answer ``MOVED`` for the rest:
`check_not_cluster` (run by `connect` and by the API at start-up) refuses it with an error that says to use
``redis+cluster://``. Not here: key names and what runs on a cluster (`keys.py`, the package docstring).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote, urlsplit

import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode as AsyncClusterNode
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.cluster import ClusterNode, RedisCluster

CLUSTER_SCHEME = "redis+cluster"


class ClusterModeError(ValueError):
    """The URL and the server disagree on cluster mode."""


def cluster_nodes(url: str) -> tuple[list[tuple[str, int]], dict[str, Any]] | None:
    """((host, port) startup nodes, credentials) of a ``redis+cluster://`` URL; None for any other URL."""
    if not url.startswith(CLUSTER_SCHEME + "://"):
        return None
    rest = url[len(CLUSTER_SCHEME) + 3 :]
    creds: dict[str, Any] = {}
    if "@" in rest:
        auth, rest = rest.rsplit("@", 1)
        user, sep, password = auth.partition(":")
        if sep:
            creds = {"password": unquote(password), **({"username": unquote(user)} if user else {})}
        else:
            creds = {"password": unquote(user)}
    rest = rest.split("/", 1)[0].split("?", 1)[0]  # a cluster has only db 0
    nodes = []
    for part in rest.split(","):
        parsed = urlsplit(f"//{part}")
        try:
            port = parsed.port or 6379
        except ValueError:
            port = -1
        if not parsed.hostname or port <= 0:
            raise ValueError(f"redis_url: {url!r}: expected redis+cluster://host:port[,host:port...], "
                             f"bad node {part!r}")  # fmt: skip
        nodes.append((parsed.hostname, port))
    return nodes, creds


def is_cluster_url(url: str) -> bool:
    return cluster_nodes(url) is not None


def check_not_cluster(info: dict[str, Any], url: str) -> None:
    """Raise `ClusterModeError` when the server behind the plain `url` is a cluster node (`info`: its
    ``INFO cluster``)."""
    if str(info.get("cluster_enabled", 0)) == "1":
        raise ClusterModeError(
            f"redis_url {url!r} names one node of a Redis Cluster: keys of other slots would answer MOVED; "
            f"use redis+cluster://host:port[,host:port...]"
        )


def connect(url: str, timeout_s: float = 30.0, connect_timeout_s: float = 5.0, check: bool = True) -> Any:
    """A sync client for `url` (`redis.Redis` or `redis.cluster.RedisCluster`; typed Any: their command
    methods share one interface). With `check`, a plain URL naming a cluster node raises `ClusterModeError`
    (skipped when Redis is unreachable now: the first command will say so)."""
    parsed = cluster_nodes(url)
    if parsed is not None:
        nodes, creds = parsed
        return RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in nodes], socket_timeout=timeout_s,
                            socket_connect_timeout=connect_timeout_s, **creds)  # fmt: skip
    client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=connect_timeout_s)
    if check:
        try:
            info = client.info("cluster")
        except redis.ConnectionError:
            return client
        except Exception:
            client.close()
            raise
        try:
            check_not_cluster(info, url)
        except ClusterModeError:
            client.close()
            raise
    return client


def connect_async(url: str, timeout_s: float, max_connections: int, retries: int = 0) -> Any:
    """An asyncio client for `url` with tight timeouts (`redis.asyncio.Redis` over a blocking pool, or
    `redis.asyncio.cluster.RedisCluster` with `max_connections` per node). `retries`: a single Redis retries
    nothing by default (the caller falls back at once); a cluster client retries its own way on a topology
    change (MOVED, a failover), bounded by the caller's deadline."""
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    parsed = cluster_nodes(url)
    if parsed is not None:
        nodes, creds = parsed
        return AsyncRedisCluster(startup_nodes=[AsyncClusterNode(h, p) for h, p in nodes],
                                 max_connections=max_connections, socket_timeout=timeout_s,
                                 socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), max(retries, 1)),
                                 **creds)  # fmt: skip
    # blocking pool: a burst waits (bounded by each request's deadline) for a connection instead of failing
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=timeout_s, socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), retries), health_check_interval=0,
    )  # fmt: skip
    return aioredis.Redis(connection_pool=pool)


async def check_async(client: Any, url: str) -> None:
    """`check_not_cluster` for an asyncio client (no-op for a cluster client)."""
    if isinstance(client, AsyncRedisCluster):
        return
    check_not_cluster(await client.info("cluster"), url)
