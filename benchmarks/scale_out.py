"""Failover under load on a real local Redis Cluster: ``python -m benchmarks.scale_out``.

Six local redis-server processes form a cluster (3 primaries + 3 replicas, `services.harness.LocalRedisCluster`,
``cluster-node-timeout`` 1 s). One API process (uvicorn, the served settings) reads it through
``redis+cluster://``; an open-loop generator (`benchmarks.fault_load`) sends recommends over every user and
events for a set of event users; an offline refresh (the real CLI, HF engine) writes a new version meanwhile.
Then one primary is SIGKILLed; its replica is promoted by the cluster. Measured:

- ``failover_5xx``: answers >= 500 over the whole run (must be 0); ``failover_transport_errors``: no answer;
- ``failover_answers_by_source``: recommend answers scheduled from the kill until the cluster is whole again
  (+ 2 s), by source (think-ahead, online-only, fallback);
- ``failover_cluster_s``: kill -> every live node says ``cluster_state:ok`` (the replica promoted);
  ``failover_recovery_s``: kill -> think-ahead answers again (3 in a row) for users whose slots the killed
  primary served;
- ``failover_events_acked`` / ``failover_lost_events``: events the API answered as stored (200) or queued (202)
  vs what the histories hold at the end (`fault_load.event_ledger`);
- ``refresh_during_failover_published``: the refresh running across the kill completed and published a version
  holding every user (``refresh_during_failover_entries`` / ``refresh_users``). It runs with ``--no-histories``:
  a full refresh replaces every history with the dataset's (by design), which would erase the events of this
  run and make the event ledger meaningless.

Then, in the same run, two more parts of the scale-out (each its own module, skipped with ``--skip-replicas`` /
``--skip-ray``):
- **API replicas behind HAProxy** (`benchmarks.replicas`): the max rate with p99 under the request budget for 1 and
  2 replicas (``replicas_1_max_rps``, ``replicas_2_max_rps``, ``replicas_ratio``), then one replica stopped
  gracefully (``replica_graceful_stop_client_errors``) and one SIGKILLed (``replica_kill_client_errors``,
  ``replica_kill_reroute_s``: kill -> the balancer's health check marks it down) under load;
- **multi-node Ray** (`benchmarks.ray_nodes`): the refresh on a Ray cluster of ``ray_nodes`` worker nodes with
  one node hosting an engine actor killed mid-refresh (``ray_node_kill_completed``: complete, published once,
  entries identical to one process).

The world is synthetic and built here (a random catalogue, a random-init OneRec and a tiny random-init
think model): this measures the serving and storage path under faults, not recommendation quality.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.fault_load import LoadProcess, event_ledger, recovery_after
from benchmarks.replicas import replica_env
from services.harness import PY, ROOT, free_port, process, redis_cluster, uvicorn_cmd, wait_http
from services.results import write_result

NS = "scaleout"


def build_world(root: Path, n_items: int, n_users: int, seed: int = 0) -> dict[str, Any]:
    """items.tsv + sequences.txt, random unique 4-level codes, a random-init OneRec checkpoint and a tiny think
    model, all under `root`."""
    from model.onerec.modeling import OneRecConfig, build_model, save_checkpoint
    from model.semantic_ids import SemanticIDConfig, SemanticIDs
    from model.think.base_model import TinyBaseConfig, build_tiny_base

    rng = random.Random(seed)
    words = "hydrating face cream serum lip gloss matte nail polish shampoo argan oil brush mascara toner mask".split()
    items = list(range(1, n_items + 1))
    titles = {i: " ".join(rng.choice(words) for _ in range(rng.randint(2, 5))) for i in items}
    seqs = {u: [rng.choice(items) for _ in range(rng.randint(4, 12))] for u in range(1, n_users + 1)}
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    (data / "items.tsv").write_text("item_id\ttitle\n" + "".join(f"{i}\t{t}\n" for i, t in titles.items()))
    (data / "sequences.txt").write_text("".join(f"{u} {' '.join(map(str, s))}\n" for u, s in seqs.items()))
    nrng = np.random.default_rng(seed)
    codes: set[tuple[int, ...]] = set()
    while len(codes) < n_items:
        codes.add((int(nrng.integers(0, 6)), *(int(x) for x in nrng.integers(0, 16, size=3))))
    sid = SemanticIDs(np.asarray(items), np.asarray(sorted(codes), dtype=np.int64),
                      SemanticIDConfig(variant="text", levels=3, codebook_size=16))  # fmt: skip
    sid.save(root / "sid")
    save_checkpoint(build_model(OneRecConfig(d_model=32, n_layers=1, n_heads=2, d_ff=64, max_len=20, dropout=0.0),
                                sid, seed=seed), sid, root / "onerec")  # fmt: skip
    tiny = TinyBaseConfig(bpe_vocab=320, hidden=64, layers=2, heads=2, kv_heads=1, head_dim=32, intermediate=128,
                          max_positions=512, seed=seed)  # fmt: skip
    build_tiny_base(list(titles.values()), sid, root / "think", tiny)
    return {"data": data, "sid": root / "sid", "onerec": root / "onerec", "think": root / "think", "seqs": seqs,
            "items": items, "codes": {i: c for i, c in zip(items, sorted(codes), strict=True)}}  # fmt: skip


def seed_store(store: Any, world: dict[str, Any], history_max: int) -> None:
    """A complete live version (every user: three (a, b) prefixes of items they have not seen) + histories."""
    from services.store import ThinkEntry

    entries = {}
    for u, seq in world["seqs"].items():
        pre: list[tuple[int, int, float]] = []
        for i in world["items"][(u * 7) % 50 :]:
            a, b = world["codes"][i][:2]
            if i not in seq and (a, b) not in {(p[0], p[1]) for p in pre}:
                pre.append((a, b, -0.5 * (len(pre) + 1)))
            if len(pre) == 3:
                break
        entries[u] = ThinkEntry("seeded", pre, len(seq), seq[-5:], "scale-out-seed", time.time())
    store.begin_version("seed", {"model": "scale-out-seed"})
    store.write_entries("seed", entries, 3600)
    store.publish("seed", len(entries))
    store.write_histories(world["seqs"], history_max)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from services.store import ThinkStore, connect

    out: dict[str, Any] = {"load_avg_1m_start": round(os.getloadavg()[0], 2)}
    t_start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="scale_out_") as tmp, redis_cluster(Path(tmp) / "cluster") as cluster:
        root = Path(tmp)
        world = build_world(root / "world", args.items, args.users)
        store = ThinkStore(connect(cluster.url), NS)
        seed_store(store, world, args.history_max)
        users = sorted(world["seqs"])
        event_users = random.Random(1).sample(users, args.event_users)
        initial = {u: world["seqs"][u][-args.history_max :] for u in event_users}
        out["cluster_nodes"] = len(cluster.nodes)
        out["cluster_primaries"] = len(cluster.primaries())
        env = replica_env(cluster.url, NS, world["data"], world["onerec"], history_max=str(args.history_max))
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        with process(uvicorn_cmd("online_api.app:create_app", port), env, root / "api.log") as api:
            try:
                wait_http(f"{base}/readyz", args.ready_timeout_s, api)
            except RuntimeError:
                print((root / "api.log").read_text(errors="replace")[-3000:], flush=True)
                raise
            load = LoadProcess(root, base, users, args.rate, event_users, world["items"], args.event_rate, None,
                               None)  # fmt: skip
            refresh_cmd = [PY, "-m", "offline_worker", "--redis-url", cluster.url, "--namespace", NS, "refresh",
                           "--engine", "hf", "--model", str(world["think"]), "--sid", str(world["sid"]), "--data",
                           str(world["data"]), "--chunk", "8", "--samples", "1", "--prefixes", "4", "--beam-a", "2",
                           "--max-reasoning-tokens", "4", "--no-progress", "--no-histories", "--throttle-s",
                           str(args.refresh_throttle_s)]  # fmt: skip
            load.start()
            time.sleep(args.warm_s)
            with (root / "refresh.json").open("wb") as fo, (root / "refresh.log").open("wb") as fe:
                refresh = subprocess.Popen(refresh_cmd, cwd=ROOT, env={**os.environ, **env}, stdout=fo, stderr=fe)
                # kill once the refresh has written a few chunks, so that it writes across the failover
                deadline = time.monotonic() + 180
                while time.monotonic() < deadline and refresh.poll() is None:
                    vs = [v for v in store.versions() if v != "seed"]
                    if vs and len(store.done_chunks(vs[0], 0)) >= 2:
                        break
                    time.sleep(0.1)
                victim = cluster.node_of(store.keys.history(users[0]))
                shard_users = [u for u in users if cluster.node_of(store.keys.history(u)).port == victim.port]
                t_kill = time.monotonic()
                victim.signal(signal.SIGKILL)
                out["failover_cluster_s"] = round(cluster.wait_ok(60), 3)
                t_whole = time.monotonic()
                time.sleep(args.after_s)
                outcomes = load.stop()
                refresh_rc = refresh.wait(args.refresh_timeout_s)
            time.sleep(2.0)  # events queued by the API during the failover are flushed
            out["api_alive"] = api.poll() is None
        report = json.loads((root / "refresh.json").read_text() or "{}") if refresh_rc == 0 else {}
        version = report.get("version")
        stored = store.get_histories(event_users)
        out |= {
            "refresh_users": len(users),
            "refresh_exit_code": refresh_rc,
            "refresh_during_failover_published": bool(report.get("published")) and store.current_version() == version,
            "refresh_during_failover_entries": store.count_entries(version) if version else 0,
        }  # fmt: skip
        recs = [o for o in outcomes if o.kind == "recommend"]
        window = [o for o in recs if t_kill <= o.sched < t_whole + 2.0]
        before = [o for o in recs if o.sched < t_kill]
        shard = [o for o in outcomes if o.kind == "recommend" and o.user in set(shard_users)]
        ledger = event_ledger(outcomes, initial, stored, args.history_max)
        out |= {
            "requests": len(outcomes),
            "failover_5xx": sum(o.status >= 500 for o in outcomes),
            "failover_transport_errors": sum(o.status == 0 for o in outcomes),
            "failover_answers_by_source": dict(Counter(o.source or f"status {o.status}" for o in window)),
            "answers_by_source_before_kill": dict(Counter(o.source or f"status {o.status}" for o in before)),
            "failover_killed_shard_users": len(shard_users),
            "failover_recovery_s": recovery_after(shard, t_kill, float("inf"), streak=3),
            "failover_events_acked": ledger["events_acked"],
            "failover_events_stored_200": sum(o.kind == "event" and o.status == 200 and bool(o.stored)
                                              for o in outcomes),  # fmt: skip
            "failover_events_queued_202": sum(o.kind == "event" and o.status == 202 for o in outcomes),
            "failover_lost_events": ledger["lost_events"],
            "failover_duplicate_events": ledger["duplicate_events"],
        }  # fmt: skip
        if out["failover_recovery_s"] is not None:
            out["failover_recovery_s"] = round(out["failover_recovery_s"], 3)
        store.r.close()
    out["wall_s"] = round(time.monotonic() - t_start, 1)
    out["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
    return out


@contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """File descriptor 1 -> 2 meanwhile: Ray's driver and node processes print there, and stdout is the JSON."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.scale_out", description=__doc__.split("\n")[0])
    p.add_argument("--users", type=int, default=300, help="users of the synthetic world (all requested in turn)")
    p.add_argument("--items", type=int, default=400, help="catalogue size of the synthetic world")
    p.add_argument("--rate", type=float, default=20.0, help="recommend requests per second (open loop)")
    p.add_argument("--event-users", type=int, default=30, help="users who receive events")
    p.add_argument("--event-rate", type=float, default=5.0, help="events per second")
    p.add_argument("--history-max", type=int, default=50, help="bounded history length (ONEREC_HISTORY_MAX)")
    p.add_argument("--warm-s", type=float, default=5.0, help="load before the refresh starts")
    p.add_argument("--after-s", type=float, default=10.0, help="load after the cluster is whole again")
    p.add_argument("--refresh-throttle-s", type=float, default=0.3, help="pause per refresh chunk (spans the kill)")
    p.add_argument("--refresh-timeout-s", type=float, default=600.0, help="longest wait for the refresh to end")
    p.add_argument("--ready-timeout-s", type=float, default=300.0, help="longest wait for the API's /readyz")
    p.add_argument("--skip-replicas", action="store_true", help="skip the API replicas part (benchmarks.replicas)")
    p.add_argument("--skip-ray", action="store_true", help="skip the multi-node Ray part (benchmarks.ray_nodes)")
    p.add_argument("--replica-rates", type=lambda v: [float(x) for x in v.split(",")],
                   default=[50, 100, 200, 300, 400, 500, 600, 800, 1000, 1200, 1500],
                   help="offered rates of the 1- and 2-replica sweeps (comma-separated, increasing)")
    p.add_argument("--ray-users", type=int, default=80, help="users of the multi-node Ray refresh")
    p.add_argument("--no-write", action="store_true", help="print, do not write docs/results/scale_out.json")
    args = p.parse_args(argv)
    t0 = time.monotonic()
    out = run(args)
    if not args.skip_replicas:
        from benchmarks.replicas import measure_replicas

        with tempfile.TemporaryDirectory(prefix="scale_out_replicas_") as tmp:
            out |= measure_replicas(Path(tmp), users=args.users, items=args.items, rates=args.replica_rates,
                                    ready_timeout_s=args.ready_timeout_s)
    if not args.skip_ray:
        from benchmarks.ray_nodes import measure_ray_nodes

        with tempfile.TemporaryDirectory(prefix="scale_out_ray_") as tmp, stdout_to_stderr():
            out |= measure_ray_nodes(Path(tmp), args.ray_users)
    out["wall_s_all"] = round(time.monotonic() - t0, 1)
    print(json.dumps(out, indent=2))
    if not args.no_write:
        note = (f"not Beauty (the dataset field is only the default label): a synthetic world of {args.users} users "
                f"and {args.items} items (random catalogue, random-init OneRec, tiny think model), measuring the "
                "serving and storage path under a primary SIGKILL, a replica stop/kill behind HAProxy and a Ray node "
                "kill, not quality; all processes (6 redis-server, API replicas, Ray nodes) "
                "on one shared 2-core machine (load_avg_1m_start: its load; fallbacks before the kill are the "
                "model missing its 50 ms budget on that load)")
        write_result("scale_out", out, note=note)


if __name__ == "__main__":
    main()
