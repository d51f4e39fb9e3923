"""The refresh on a local Ray cluster: 2 actors, the tiny model, the same entries as one process, one publish.

The engine replicas are the HF engine (greedy): two vLLM CPU engines in one test cost minutes on a
2-core machine. The Ray path is engine-agnostic (actors build their engine with `make_engine` from the
options passed through); the vLLM path was run by hand (docs/RESULTS.md, ``ray_refresh``). One actor
SIGKILLs itself after writing a chunk's entries and before marking it done: Ray restarts it and retries
the chunk, and the version still comes out complete and identical.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import redis
from offline_helpers import TinyWorld, build_world, one_process_refresh

from offline_worker.engine_interface import EngineConfig
from offline_worker.ray_refresh import EngineSpec, RayOptions, run_ray
from offline_worker.refresh import RefreshOptions, offline_histories, plan_refresh
from services.store import ThinkStore

pytest.importorskip("ray")

CFG = EngineConfig(samples=2, prefixes_per_sample=4, beam_a=2, max_reasoning_tokens=8, greedy=True)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> TinyWorld:
    return build_world(tmp_path_factory.getbasetemp() / "offline_world")


def _entries(store: ThinkStore, version: str, users: list[int]) -> dict[int, Any]:
    out = {}
    for u, e in store.get_entries(version, users).items():
        assert e is not None, f"user {u} missing"
        out[u] = (e.reasoning, e.prefixes, e.history_len, e.history_tail, e.model_id)
    return out


def test_ray_refresh_with_two_actors_matches_one_process_survives_a_killed_actor_and_publishes_once(
    world: TinyWorld, redis_client: redis.Redis, redis_server: Any, ns: str, tmp_path: Path
) -> None:
    opts = RefreshOptions(chunk=8, progress=False, history_max=5)
    hist = offline_histories(world.sequences)
    users = sorted(hist)
    key = {"engine": "hf", "greedy": True}

    single, plan1, model_id = one_process_refresh(world, redis_client, ns, CFG, opts, key)

    store = ThinkStore(redis_client, ns)
    plan = plan_refresh(store, hist, model_id, key, opts)
    assert plan.version == plan1.version  # same inputs, same version name
    spec = EngineSpec("hf", str(world.model_dir), str(world.sid_dir), CFG, None, hf_batch_size=8)
    marker = tmp_path / "actor-killed"
    rep = run_ray(store, redis_server.url, spec, hist, plan, opts,
                  RayOptions(actors=2, fault_marker=str(marker)))  # fmt: skip

    assert marker.exists()  # an actor did die mid-job (entries written, chunk not marked done)
    assert rep.published and rep.computed == len(users)  # the retried chunk is counted once
    assert store.current_version() == plan.version and store.previous_version() is None
    meta = store.meta(plan.version)
    assert meta["users"] == len(users) and isinstance(meta["published"], float)
    assert store.done_chunks(plan.version, 0) == set(range(len(plan.chunks())))
    assert _entries(store, plan.version, users) == _entries(single, plan1.version, users)
    again = run_ray(store, redis_server.url, spec, hist, plan, opts, RayOptions(actors=2))
    assert again.skipped == "already live" and not again.published  # published once: a re-run is a no-op
