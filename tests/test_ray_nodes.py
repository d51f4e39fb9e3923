"""The refresh on a multi-node Ray cluster with a worker node killed mid-refresh: complete, identical, one publish.

A real cluster of Ray node processes (`ray.cluster_utils.Cluster` via `benchmarks.ray_nodes.ray_cluster`): a head
with no CPUs and 3 worker nodes of one CPU each, so that the 2 engine actors run on worker nodes. `run_ray`
connects by the cluster's address. Once a chunk is done, a worker node hosting a live chunk actor is removed
without grace (raylet, object store and workers killed). The refresh must still complete with every user's
entry equal to a one-process greedy refresh's and publish once; the driver disconnects without stopping the
cluster. The kill must land before the last chunk is done, else the test fails (it does not pass vacuously).
"""

from __future__ import annotations

from typing import Any

import pytest
import redis
from offline_helpers import TinyWorld, build_world, one_process_refresh

from benchmarks.ray_nodes import alive_nodes, chunk_actors, entries, ray_cluster, refresh_with_node_kill
from offline_worker.engine_interface import EngineConfig
from offline_worker.ray_refresh import EngineSpec, RayOptions, run_ray
from offline_worker.refresh import RefreshOptions, offline_histories, plan_refresh
from services.store import ThinkStore

ray = pytest.importorskip("ray")

CFG = EngineConfig(samples=2, prefixes_per_sample=4, beam_a=2, max_reasoning_tokens=8, greedy=True)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> TinyWorld:
    return build_world(tmp_path_factory.getbasetemp() / "offline_world")


def test_ray_refresh_on_three_nodes_survives_a_killed_worker_node_and_matches_one_process(
    world: TinyWorld, redis_client: redis.Redis, redis_server: Any, ns: str
) -> None:
    opts = RefreshOptions(chunk=4, progress=False, history_max=5)
    hist = offline_histories(world.sequences)
    users = sorted(hist)
    key = {"engine": "hf", "greedy": True}

    single, plan1, model_id = one_process_refresh(world, redis_client, ns, CFG, opts, key)

    store = ThinkStore(redis_client, ns)
    plan = plan_refresh(store, hist, model_id, key, opts)
    assert plan.version == plan1.version
    chunks = len(plan.chunks())
    assert chunks >= 8  # many chunks, so that a kill after the first one lands mid-refresh
    spec = EngineSpec("hf", str(world.model_dir), str(world.sid_dir), CFG, None, hf_batch_size=8)

    with ray_cluster(workers=3, object_store_mb=80) as cluster:
        head = cluster.head_node.node_id
        workers_before = alive_nodes(cluster) - {head}
        assert len(workers_before) == 3
        rep, kill, _ = refresh_with_node_kill(cluster, store, redis_server.url, spec, hist, plan, opts, actors=2)

        assert kill.error is None, kill.error
        assert kill.had_actor and kill.node_id in workers_before  # a worker node that hosted a chunk actor
        assert 1 <= kill.chunks_before_kill < chunks  # killed mid-refresh, not after the last chunk
        assert kill.node_id not in alive_nodes(cluster)  # and it is dead
        live = alive_nodes(cluster) - {head}
        restarted = [a for a in chunk_actors(cluster) if a["NumRestarts"] > 0]
        assert restarted and all(a["Address"]["NodeID"] in live for a in restarted)  # Ray restarted it elsewhere
        assert not ray.is_initialized()  # the driver disconnected ...
        assert live == workers_before - {kill.node_id}  # ... and left the cluster running

        assert rep.published and rep.computed == len(users)  # every chunk counted once
        assert store.current_version() == plan.version and store.previous_version() is None
        assert store.meta(plan.version)["users"] == len(users)
        assert store.done_chunks(plan.version, 0) == set(range(chunks))
        got, want = entries(store, plan.version, users), entries(single, plan1.version, users)
        assert None not in got.values() and got == want

        again = run_ray(store, redis_server.url, spec, hist, plan, opts, RayOptions(address=cluster.address))
        assert again.skipped == "already live" and not again.published  # published once: a re-run is a no-op
