"""Grounded reasoning cost: users/s of a refresh with the grounded grammar vs free reasoning vs direct mode.

One vLLM engine (one model load) refreshes users through the real refresh job into Redis in alternating
rounds (free, grounded, direct, then again; the median round counts), each variant into its own version.
Within a round the three variants see the same ``--limit`` users; each round takes the next users, so no
grammar is ever compiled twice (vLLM caches compiled grammars; a real refresh sees each user once). Then
the grounding report (`evaluation.reasoning.grounding_report`) runs over the free and grounded versions of
the last round.

    python -m benchmarks.grounded_refresh --model artifacts/think/current --limit 200

Writes ``docs/results/grounded_refresh.json`` (metrics ``<variant>_users_per_s``, ``grounded_vs_free``,
``grammar_ms_per_user``, ``<variant>_nonempty_share``, the grounded version's report shares, ...) via
`services.results.write_result`. A model without reasoning training (itemic.json ``think: false``) is run
in think mode here anyway: the grammar forces the format, the model only chooses within it. Not a test.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

VARIANTS = ("free", "grounded", "direct")


def main(argv: list[str] | None = None) -> None:
    import redis

    from evaluation.reasoning import grounding_report
    from model.semantic_ids import SemanticIDs
    from model.think.grounding import Grounding
    from offline_worker.engine_interface import EngineConfig
    from offline_worker.refresh import RefreshOptions, offline_histories, plan_refresh, run_shard
    from offline_worker.vllm_engine import VLLMEngine, VLLMOptions, cpu_defaults
    from services.catalog import load_items, load_sequences
    from services.config import get_settings
    from services.harness import RedisServer
    from services.results import write_result
    from services.store import ThinkStore

    p = argparse.ArgumentParser(prog="python -m benchmarks.grounded_refresh", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True, help="OneRec-Think folder")
    p.add_argument("--sid", type=Path, help="semantic IDs (default: <model>/sid)")
    p.add_argument("--data", type=Path, help="dataset folder (default: ONEREC_DATA_DIR)")
    p.add_argument("--limit", type=int, default=200, help="users per refresh")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds per variant (median counts)")
    p.add_argument("--samples", type=int, default=1, help="reasoning paths per user")
    p.add_argument("--max-reasoning-tokens", type=int, help="default: ONEREC_MAX_REASONING_TOKENS")
    p.add_argument("--redis-url", help="default: a private redis-server")
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args(argv)

    settings = get_settings()
    data = Path(args.data or settings.data_dir)
    sid_dir = args.sid or args.model / "sid"
    catalog, sid = load_items(data / "items.tsv"), SemanticIDs.load(sid_dir)
    sequences = load_sequences(data / "sequences.txt", catalog)
    everyone = offline_histories(sequences, 0, args.limit * args.rounds)
    users = sorted(everyone)
    if len(users) < args.limit * args.rounds:
        raise ValueError(f"--limit x --rounds: {args.limit * args.rounds} users wanted, the dataset has {len(users)}")
    base = EngineConfig.from_settings(settings, samples=args.samples, max_reasoning_tokens=args.max_reasoning_tokens,
                                      mode="think", grounding_data=str(data))
    configs = {"free": base, "grounded": replace(base, grounded_reasoning=True), "direct": replace(base, mode="direct")}
    grounding = Grounding.build(catalog, sid)
    cpu_defaults()
    engine = VLLMEngine(args.model, sid_dir, base, VLLMOptions(dtype="float32", enforce_eager=True))
    server = None if args.redis_url else RedisServer(Path(tempfile.mkdtemp(prefix="bench_redis_")))
    if server is not None:
        server.start()
    url = server.url if server is not None else args.redis_url
    rates: dict[str, list[float]] = {v: [] for v in VARIANTS}
    grammar_s: list[float] = []
    metrics: dict[str, Any] = {}
    examples: dict[str, str] = {}
    try:
        client = redis.Redis.from_url(url, socket_timeout=60)
        for r in range(args.rounds):
            hist = {u: everyone[u] for u in users[r * args.limit : (r + 1) * args.limit]}
            for v in VARIANTS:
                store = ThinkStore(client, f"grounded{int(time.time())}{r}{v}")
                engine.config, engine.grounding = configs[v], (grounding if v == "grounded" else None)
                engine.timings = dict.fromkeys(engine.timings, 0.0)
                opts = RefreshOptions(chunk=settings.refresh_chunk, progress=False)
                plan = plan_refresh(store, hist, engine.model_id, {"engine": "vllm", **asdict(configs[v])}, opts)
                report = run_shard(store, engine, sid, hist, plan, opts)
                rates[v].append(report.users_per_s)
                if v == "grounded":
                    grammar_s.append(engine.timings.get("grammar_s", 0.0))
                print(f"round {r} {v}: {report.users_per_s:.2f} users/s, unclosed {report.unclosed}", flush=True)
                if r == args.rounds - 1 and v != "direct":
                    entries = store.get_entries(plan.version, sorted(hist))
                    rep = grounding_report(entries, {u: list(h) for u, h in hist.items()}, grounding)
                    keep = rep if v == "grounded" else {"nonempty_share": rep["nonempty_share"]}
                    metrics.update({f"{v}_{k}": val for k, val in keep.items() if k != "users"})
                    examples[v] = next((e.reasoning for e in entries.values() if e and e.reasoning), "")
    finally:
        engine.close()
        if server is not None:
            server.stop()
    for v in VARIANTS:
        metrics[f"{v}_users_per_s"] = round(statistics.median(rates[v]), 3)
    metrics["grounded_vs_free"] = round(metrics["grounded_users_per_s"] / metrics["free_users_per_s"], 3)
    metrics["grammar_ms_per_user"] = round(1000 * statistics.median(grammar_s) / args.limit, 3)
    metrics.update({f"{v}_users_per_s_rounds": [round(x, 3) for x in rates[v]] for v in VARIANTS})
    metrics.update(users=args.limit, rounds=args.rounds, samples=args.samples,
                   max_reasoning_tokens=base.max_reasoning_tokens)
    print(json.dumps({**metrics, "examples": examples}, indent=2))
    if not args.no_write:
        note = (f"model {args.model.name} ({engine.model_id}), vLLM CPU eager; max_reasoning_tokens is free "
                f"reasoning's budget, a grounded path's is its grammar's longest rationale in bytes + 1; "
                f"grounded example: {examples.get('grounded')!r}")
        print(write_result("grounded_refresh", metrics, note=note))


if __name__ == "__main__":
    main()
