"""Multi-node Ray: the refresh on a cluster of Ray nodes, one worker node killed mid-refresh.

``python -m benchmarks.ray_nodes --users N``. A Ray cluster of separate node processes on this machine
(`ray.cluster_utils.Cluster`): a head with no CPUs, so that the engine actors land on worker nodes, and
``--workers`` worker nodes of one CPU and a small object store each (each node its own raylet, object store
and worker processes). The refresh runs through `offline_worker.ray_refresh.run_ray` with the cluster's
address (the driver connects as to a remote cluster) and ``--actors`` HF engine replicas, greedy. Once a
chunk is marked done, a worker node that hosts a live chunk actor is removed without grace (its raylet,
object store and workers killed). The same users are refreshed once in one process (one torch thread, like
an actor with one CPU) into a namespace of their own: the reference. `measure_ray_nodes` returns:

- ``ray_nodes``: worker nodes at the start; ``ray_users``; ``ray_chunks_total``; ``ray_chunks_before_kill``:
  chunks marked done when the node was killed (below the total: the kill landed mid-refresh);
- ``ray_killed_node_had_actor``: the killed node hosted a live chunk actor at the kill (``ray_kill_error``:
  why no kill happened, else None); ``ray_killed_node_dead``: the cluster lists that node as dead afterwards,
  ``ray_nodes_alive_after`` the worker nodes still alive;
- ``ray_chunk_actors``, ``ray_actor_restarts``, ``ray_restarted_on_live_node``: the chunk actors in the
  cluster's actor table, how often Ray restarted them, and whether a restarted one ended on a live node;
- ``ray_entries_identical``: every user's entry equals the one-process refresh's; ``ray_published_once``:
  ``current`` is the new version, with no previous;
- ``ray_node_kill_completed``: a node was killed and the refresh completed (every chunk done, every user
  computed), published once, entries identical;
- ``ray_wall_s``: the `run_ray` call (connect, actor start-up, chunks, recovery from the kill, publish);
  ``ray_single_wall_s``: the one-process refresh (engine load included); ``ray_kill_to_done_s``: kill ->
  `run_ray` returned; ``ray_cluster_start_s``: head and worker nodes up.

The cluster detects a dead node by health checks every ``--health-check-ms`` (3 missed: dead); Ray's default
is 3 s and 5 missed. Everything runs on one machine: nodes are processes, not hosts (loopback network). The
world is synthetic (`benchmarks.scale_out.build_world`: random catalogue, tiny random-init think model): this
measures the refresh's fault handling, not recommendation quality.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from offline_worker.engine_interface import EngineConfig
from offline_worker.ray_refresh import EngineSpec, RayOptions, run_ray
from offline_worker.refresh import RefreshOptions, RefreshPlan, RefreshReport
from services.store import ThinkStore

CFG = EngineConfig(samples=2, prefixes_per_sample=4, beam_a=2, max_reasoning_tokens=8, greedy=True)
ACTOR_CLASSES = ("ChunkWorker", "MapWorker")  # Ray Data runs the ChunkWorker class inside its _MapWorker actors


@contextmanager
def ray_cluster(workers: int = 3, object_store_mb: int = 80, health_check_ms: int = 500) -> Iterator[Any]:
    """A started `ray.cluster_utils.Cluster`: a head with 0 CPUs and `workers` nodes of 1 CPU, removed on exit."""
    from ray.cluster_utils import Cluster

    mem = object_store_mb * 2**20
    health = {"health_check_period_ms": health_check_ms, "health_check_failure_threshold": 3,
              "health_check_initial_delay_ms": 0}  # fmt: skip
    head = {"num_cpus": 0, "object_store_memory": mem, "include_dashboard": False, "_system_config": health}
    cluster = Cluster(initialize_head=True, head_node_args=head)
    try:
        for _ in range(workers):
            cluster.add_node(num_cpus=1, object_store_memory=mem)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        cluster.shutdown()


def alive_nodes(cluster: Any) -> set[str]:
    """Node ids the cluster's GCS lists as alive (the head included)."""
    return {n["NodeID"] for n in cluster.global_state.node_table() if n["Alive"]}


def chunk_actors(cluster: Any, state: str | None = None) -> list[dict[str, Any]]:
    """The chunk actors in the cluster's GCS actor table (no dashboard needed), in `state` if given (``ALIVE``,
    ``DEAD``, ...): ``Address.NodeID`` is where (the latest incarnation) runs, ``NumRestarts`` how often Ray
    restarted it."""
    table = cluster.global_state.actor_table(None, actor_state_name=state)
    return [a for a in table.values() if any(c in a["ActorClassName"] for c in ACTOR_CLASSES)]


def actor_nodes(cluster: Any) -> set[str]:
    """Node ids hosting a live chunk actor."""
    return {a["Address"]["NodeID"] for a in chunk_actors(cluster, "ALIVE")}


@dataclass
class NodeKill:
    """What the killer thread did: which node, whether it hosted an actor, how far the refresh was."""

    node_id: str | None = None
    had_actor: bool = False
    chunks_before_kill: int = 0
    at: float = 0.0  # time.perf_counter() of the kill
    error: str | None = None


class NodeKiller(threading.Thread):
    """Waits until `min_done` chunks of `version` are done, then removes (no grace) a worker node hosting a live
    chunk actor."""

    def __init__(self, cluster: Any, store: ThinkStore, version: str, min_done: int = 1,
                 timeout_s: float = 600.0) -> None:  # fmt: skip
        super().__init__(name="ray-node-killer", daemon=True)
        self.cluster, self.store, self.version = cluster, store, version
        self.min_done, self.timeout_s = min_done, timeout_s
        self.kill = NodeKill()
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            deadline = time.monotonic() + self.timeout_s
            while not self.stop.is_set() and time.monotonic() < deadline:
                if len(self.store.done_chunks(self.version, 0)) >= self.min_done:
                    hosts = actor_nodes(self.cluster)
                    victims = sorted((n for n in self.cluster.worker_nodes if n.node_id in hosts),
                                     key=lambda n: n.node_id)  # fmt: skip
                    if victims:
                        node = victims[0]
                        self.kill.chunks_before_kill = len(self.store.done_chunks(self.version, 0))
                        self.kill.at = time.perf_counter()
                        self.cluster.remove_node(node, allow_graceful=False)
                        self.kill.node_id, self.kill.had_actor = node.node_id, True
                        return
                time.sleep(0.05)
            self.kill.error = "no kill: the refresh ended or timed out first"
        except Exception as e:  # reported, not raised in a thread
            self.kill.error = f"{type(e).__name__}: {e}"


def refresh_with_node_kill(cluster: Any, store: ThinkStore, redis_url: str, spec: EngineSpec,
                           histories: dict[int, list[int]], plan: RefreshPlan, opts: RefreshOptions,
                           actors: int = 2) -> tuple[RefreshReport, NodeKill, float]:  # fmt: skip
    """`run_ray` on `cluster` (by its address) while a `NodeKiller` removes a worker node with an actor once a chunk
    is done; (the report, the kill, the `run_ray` wall seconds)."""
    killer = NodeKiller(cluster, ThinkStore(store.r, store.keys.ns), plan.version)
    killer.start()
    t0 = time.perf_counter()
    try:
        report = run_ray(store, redis_url, spec, histories, plan, opts, RayOptions(address=cluster.address,
                                                                                   actors=actors))  # fmt: skip
    finally:
        killer.stop.set()
        killer.join(60)
    return report, killer.kill, time.perf_counter() - t0


def entries(store: ThinkStore, version: str, users: list[int]) -> dict[int, Any]:
    """Each user's entry as comparable fields (None: missing)."""
    got = store.get_entries(version, users)
    return {u: None if (e := got.get(u)) is None else (e.reasoning, e.prefixes, e.history_len, e.history_tail,
                                                       e.model_id) for u in users}  # fmt: skip


def measure_ray_nodes(workdir: Path, users: int, items: int = 200, workers: int = 3, actors: int = 2, chunk: int = 4,
                      object_store_mb: int = 80, health_check_ms: int = 500) -> dict[str, Any]:  # fmt: skip
    """Build a synthetic world under `workdir`, refresh its users in one process and on a Ray cluster of `workers`
    nodes with one node killed mid-refresh (its own redis-server); the metrics of the module docstring."""
    import torch

    from benchmarks.scale_out import build_world
    from model.semantic_ids import SemanticIDs
    from offline_worker.hf_engine import HFEngine
    from offline_worker.refresh import offline_histories, plan_refresh, run_shard
    from services.harness import redis_server
    from services.store import connect

    if workers < 2:
        raise ValueError(f"workers: expected >= 2 (one is killed), got {workers}")
    world = build_world(workdir / "world", items, users)
    hist = offline_histories(world["seqs"])
    ids = sorted(hist)
    opts = RefreshOptions(chunk=chunk, progress=False, history_max=20, write_histories=False)
    key = {"engine": "hf", "greedy": True}
    spec = EngineSpec("hf", str(world["think"]), str(world["sid"]), CFG, None, hf_batch_size=8)
    out: dict[str, Any] = {"ray_users": len(ids), "ray_actors": actors, "ray_chunk": chunk,
                           "ray_health_check_ms": health_check_ms}  # fmt: skip
    (workdir / "redis").mkdir(parents=True, exist_ok=True)
    with redis_server(workdir / "redis") as server:
        client = connect(server.url)
        threads = torch.get_num_threads()
        t0 = time.perf_counter()
        try:
            engine = HFEngine(world["think"], world["sid"], CFG, batch_size=8, threads=1)
            single = ThinkStore(client, "raynodes_one")
            plan1 = plan_refresh(single, hist, engine.model_id, key, opts)
            rep1 = run_shard(single, engine, SemanticIDs.load(world["sid"]), hist, plan1, opts)
        finally:
            torch.set_num_threads(threads)
        out["ray_single_wall_s"] = round(time.perf_counter() - t0, 1)
        model_id = engine.model_id
        del engine
        store = ThinkStore(client, "raynodes_ray")
        plan = plan_refresh(store, hist, model_id, key, opts)
        out["ray_chunks_total"] = len(plan.chunks())
        t_cluster = time.perf_counter()
        with ray_cluster(workers, object_store_mb, health_check_ms) as cluster:
            out["ray_cluster_start_s"] = round(time.perf_counter() - t_cluster, 1)
            head = cluster.head_node.node_id
            out["ray_nodes"] = len(alive_nodes(cluster) - {head})
            rep, kill, wall = refresh_with_node_kill(cluster, store, server.url, spec, hist, plan, opts, actors)
            done_at = time.perf_counter()
            alive = alive_nodes(cluster)
            actors_run = chunk_actors(cluster)
            out["ray_nodes_alive_after"] = len(alive - {head})
            out["ray_killed_node_dead"] = kill.node_id is not None and kill.node_id not in alive
            out["ray_chunk_actors"] = len(actors_run)  # actors created (a replaced one would count twice)
            out["ray_actor_restarts"] = sum(a["NumRestarts"] for a in actors_run)
            out["ray_restarted_on_live_node"] = any(a["NumRestarts"] > 0 and a["Address"]["NodeID"] in alive - {head}
                                                    for a in actors_run)  # fmt: skip
        identical = entries(store, plan.version, ids) == entries(single, plan1.version, ids)
        published = (rep.published and rep1.published and store.current_version() == plan.version
                     and store.previous_version() is None)  # fmt: skip
        complete = store.done_chunks(plan.version, 0) == set(range(len(plan.chunks()))) and rep.computed == len(ids)
        out |= {
            "ray_wall_s": round(wall, 1),
            "ray_kill_to_done_s": round(done_at - kill.at, 1) if kill.node_id else None,
            "ray_chunks_before_kill": kill.chunks_before_kill,
            "ray_killed_node_had_actor": kill.had_actor,
            "ray_kill_error": kill.error,
            "ray_entries_identical": identical,
            "ray_published_once": published,
            "ray_node_kill_completed": bool(kill.node_id) and complete and published and identical,
        }  # fmt: skip
        client.close()
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ray_nodes", description=__doc__.split("\n")[0])
    p.add_argument("--users", type=int, default=80, help="users of the synthetic world (all refreshed)")
    p.add_argument("--items", type=int, default=200, help="catalogue size of the synthetic world")
    p.add_argument("--workers", type=int, default=3, help="Ray worker nodes (one CPU each; one is killed)")
    p.add_argument("--actors", type=int, default=2, help="engine replicas (Ray actors)")
    p.add_argument("--chunk", type=int, default=4, help="users per chunk (many chunks: the kill lands mid-refresh)")
    p.add_argument("--object-store-mb", type=int, default=80, help="object store of each node")
    p.add_argument("--health-check-ms", type=int, default=500, help="GCS health check period (3 missed: dead)")
    args = p.parse_args(argv)
    from benchmarks.scale_out import stdout_to_stderr

    # the Ray driver and the node processes (children of this one) print to fd 1: stdout is the JSON alone
    with stdout_to_stderr(), tempfile.TemporaryDirectory(prefix="ray_nodes_") as tmp:
        out = measure_ray_nodes(Path(tmp), args.users, args.items, args.workers, args.actors, args.chunk,
                                args.object_store_mb, args.health_check_ms)  # fmt: skip
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
