"""The refresh on Ray: a Ray Data pipeline over the plan's chunks, an actor pool of engine replicas.

Same job as `offline_worker.refresh.run_shard`, scaled out by Ray instead of static ``--shard i/N``
processes: the plan (`plan_refresh`: version name, recompute/carry chunks) is made once by the driver;
the chunks not yet done are read as a dataset (one row per chunk: its users and their histories); an
actor pool (``map_batches`` with a class, ``concurrency=actors``) holds one engine per actor (vLLM or
HF, CPU or GPU, built with `make_engine` from the options passed through) and for each chunk carries or
computes its users, writes their entries to the new version in one pipelined batch and marks the chunk
done. When the dataset is consumed, the driver verifies the version and flips ``current`` once
(`publish_version`). Versioning, resume and gc are the sharded mode's: a killed actor is restarted by
Ray and its chunk retried (re-written entries are idempotent SETs); a killed driver resumes with the
same command (done chunks are skipped); a running Ray job and ``--shard`` workers must not share a
version (the plan is one shard).

A dead worker node is handled as a killed actor. Run on a multi-node cluster (tests/test_ray_nodes.py,
`benchmarks.ray_nodes`: `ray.cluster_utils.Cluster` on one machine, a head with no CPUs and 3 worker nodes
of one CPU, 2 HF actors, the driver connected by address): a worker node hosting an actor was removed
without grace after the first chunk was done; the cluster marked the node dead (health checks), Ray
restarted the actor on the spare node and retried the chunk it had in flight, and the version came out
complete, every entry equal to a one-process greedy refresh's, and was published once. Not run: a cluster
with no spare CPU (or GPU) for the restarted actor, and the death of the driver's node (the driver, the
input rows and the actors' constructor arguments live there; re-run the command, done chunks are skipped).

Ray is an optional dependency (``pip install .[ray]``); this module imports it lazily. With no address a
local cluster is started (and stopped) in this process; with an address (``ray://host:10001``, a GCS
``host:port`` or ``auto``) the driver connects and at the end only disconnects (the cluster keeps running);
the cluster's workers must have this package and the model folder at the same paths (``PYTHONPATH`` is
passed to them as this package's root).

Not here: what a chunk computes (`offline_worker.refresh`), the engines, key names, the CLI.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from model.semantic_ids import SemanticIDs
from offline_worker.engine_interface import EngineConfig
from offline_worker.prompts import PromptBuilder
from offline_worker.refresh import (
    RefreshOptions,
    RefreshPlan,
    RefreshReport,
    _begin,
    _carry,
    _compute,
    _publish_if_complete,
)
from offline_worker.vllm_engine import VLLMOptions
from services.store import ThinkStore

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parent.parent


@dataclass
class EngineSpec:
    """How an actor builds its engine replica (`offline_worker.engine_factory.make_engine` arguments)."""

    kind: str
    model_dir: str
    sid_dir: str
    config: EngineConfig
    vllm: VLLMOptions | None = None
    hf_batch_size: int = 32


@dataclass
class RayOptions:
    """The cluster and the actor pool (``--ray [ADDRESS]``, ``--ray-actors``, ...)."""

    address: str | None = None  # None: start a local cluster in this process
    actors: int = 2  # engine replicas
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0  # 1 for a vLLM GPU replica per actor
    fault_marker: str | None = None  # tests: the first actor to write a chunk SIGKILLs itself before marking it done

    def __post_init__(self) -> None:
        if self.actors < 1:
            raise ValueError(f"actors: expected >= 1, got {self.actors!r}")
        if self.cpus_per_actor <= 0 or self.gpus_per_actor < 0:
            raise ValueError(f"cpus_per_actor/gpus_per_actor: expected > 0 / >= 0, got "
                             f"{self.cpus_per_actor}/{self.gpus_per_actor}")  # fmt: skip


class ChunkWorker:
    """One Ray actor: an engine replica and a Redis connection; each call does whole chunks."""

    def __init__(self, redis_url: str, ns: str, spec: EngineSpec, plan: RefreshPlan, opts: RefreshOptions,
                 fault_marker: str | None = None) -> None:  # fmt: skip
        from offline_worker.engine_factory import make_engine
        from services.store.connect import connect

        self.store = ThinkStore(connect(redis_url, timeout_s=30), ns)
        self.engine = make_engine(spec.kind, spec.model_dir, spec.sid_dir, spec.config, spec.vllm, spec.hf_batch_size)
        self.builder = PromptBuilder(self.engine.tokenizer, SemanticIDs.load(spec.sid_dir), opts.history_cap)
        self.plan, self.opts, self.fault_marker = plan, opts, fault_marker

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, list[Any]] = {"chunk": [], "computed": [], "copied": [], "truncated": []}
        for c, kind, users_json, hist_json in zip(batch["chunk"], batch["kind"], batch["users"], batch["histories"],
                                                  strict=True):  # fmt: skip
            users = [int(u) for u in json.loads(users_json)]
            histories = {int(u): h for u, h in json.loads(hist_json).items()}
            part = RefreshReport(self.plan.version, 0, 1)
            run = _carry(self.store, self.plan, users, self.opts, part) if kind == "copy" else users
            if run:
                _compute(self.store, self.engine, self.builder, histories, self.plan.version, run, self.opts, part)
            self._maybe_crash()
            self.store.mark_chunk_done(self.plan.version, 0, int(c))
            for key, value in (("chunk", int(c)), ("computed", part.computed), ("copied", part.copied),
                               ("truncated", part.truncated)):  # fmt: skip
                out[key].append(value)
        return out

    def _maybe_crash(self) -> None:
        """Fault injection for tests: die (SIGKILL) once, with the chunk's entries written but not marked done."""
        if self.fault_marker is None:
            return
        try:
            fd = os.open(self.fault_marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.close(fd)
        os.kill(os.getpid(), signal.SIGKILL)


def _rows(plan: RefreshPlan, chunks: list[int], histories: dict[int, list[int]]) -> list[dict[str, Any]]:
    """The dataset: one row per chunk (JSON columns keep Arrow out of the ragged lists)."""
    all_chunks = plan.chunks()
    rows = []
    for c in chunks:
        kind, users = all_chunks[c]
        hist = {u: histories[u] for u in users}  # carried users need theirs too (an expired entry is recomputed)
        rows.append({"chunk": c, "kind": kind, "users": json.dumps(users), "histories": json.dumps(hist)})
    return rows


def _init_ray(ray_opts: RayOptions) -> bool:
    """Connect to the cluster at ``address`` (or start a local one); True when this call did, so that the caller
    calls ``ray.shutdown()`` after: it stops a local cluster this call started and only disconnects this driver
    from a cluster at an address (that cluster keeps running). False when Ray was already initialized."""
    import ray

    if ray.is_initialized():
        return False
    env = {"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}}
    if ray_opts.address:
        ray.init(address=ray_opts.address, runtime_env=env, log_to_driver=False)
        return True
    cpus = max(float(os.cpu_count() or 1), ray_opts.actors * ray_opts.cpus_per_actor)
    ray.init(num_cpus=int(cpus + 0.999), runtime_env=env, include_dashboard=False, log_to_driver=False,
             object_store_memory=256 * 2**20)  # fmt: skip
    return True


def run_ray(
    store: ThinkStore,
    redis_url: str,
    spec: EngineSpec,
    histories: dict[int, list[int]],
    plan: RefreshPlan,
    opts: RefreshOptions,
    ray_opts: RayOptions,
) -> RefreshReport:
    """Do every chunk of `plan` on a Ray actor pool (resuming done chunks), then publish once."""
    if plan.shards != 1 or opts.shards != 1:
        raise ValueError(f"--ray: the plan must be one shard (Ray distributes the chunks), got {plan.shards}")
    report = RefreshReport(plan.version, 0, 1)
    if not _begin(store, plan, report):
        return report
    import ray
    import ray.data

    done = store.done_chunks(plan.version, 0)
    todo = [c for c in range(len(plan.chunks())) if c not in done]
    report.resumed_chunks = len(done)
    connected = _init_ray(ray_opts) if todo else False
    t0 = time.perf_counter()
    try:
        if todo:
            ray.data.DataContext.get_current().enable_progress_bars = False
            light = dataclasses.replace(plan, users=[], recompute=[], carry=plan.carry[:0])  # rows carry the users
            ds = ray.data.from_items(_rows(plan, todo, histories), override_num_blocks=len(todo)).map_batches(
                ChunkWorker,
                batch_size=1,
                concurrency=min(ray_opts.actors, len(todo)),
                num_cpus=ray_opts.cpus_per_actor,
                num_gpus=ray_opts.gpus_per_actor or None,
                fn_constructor_kwargs=dict(redis_url=redis_url, ns=store.keys.ns, spec=spec, plan=light, opts=opts,
                                           fault_marker=ray_opts.fault_marker),  # fmt: skip
            )  # Ray Data's actor defaults (max_restarts=-1, max_task_retries=-1): a dead actor is replaced and
            # its chunk retried (idempotent writes)
            bar = tqdm(total=len(plan.recompute), unit="user", desc=f"refresh {plan.version} on ray",
                       disable=not opts.progress, dynamic_ncols=True)  # fmt: skip
            try:
                for row in ds.iter_rows():
                    report.computed += int(row["computed"])
                    report.copied += int(row["copied"])
                    report.truncated += int(row["truncated"])
                    bar.update(int(row["computed"]))
            finally:
                bar.close()
    finally:
        if connected:  # a local cluster is stopped; a cluster at an address is only disconnected from
            ray.shutdown()
    report.seconds = time.perf_counter() - t0
    report.users_per_s = report.computed / report.seconds if report.seconds > 0 else 0.0
    report.corrupt = store.corrupt
    if opts.publish:
        _publish_if_complete(store, plan, opts, report)
    return report
