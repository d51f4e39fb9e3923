"""Alternated A/B of API settings under the same open-loop load (the online_load machinery).

Each arm is a set of ``ONEREC_*`` environment settings; arms run one after the other, each in a fresh
API process against the same seeded Redis, so that a host whose speed drifts hits every arm alike
(name an arm twice to alternate). Per arm: p50/p90/p99, think-ahead share, fallback reasons, server CPU
ms per request and the CPU-speed probe. Prints one JSON line per arm; ``--out`` also writes them all.

    python -m benchmarks.online_ab --rate 100 \\
        --arms default,ONEREC_OWN_PREFIXES=0+ONEREC_BEAM=10,default,ONEREC_OWN_PREFIXES=0+ONEREC_BEAM=10
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks import online_load as ol
from services.harness import ROOT, free_port, process, redis_server, uvicorn_cmd, wait_http


def arm_env(arm: str) -> dict[str, str]:
    """``default`` -> {}; ``A=1+B=2`` -> {"A": "1", "B": "2"}."""
    if arm == "default":
        return {}
    env = dict(kv.split("=", 1) for kv in arm.split("+"))
    bad = [k for k in env if not k.startswith("ONEREC_")]
    if bad:
        raise SystemExit(f"arm {arm!r}: only ONEREC_* settings, got {bad}")
    return env


def main(argv: list[str] | None = None) -> None:
    from services.config import get_settings

    p = argparse.ArgumentParser(prog="python -m benchmarks.online_ab", description=__doc__.split("\n")[0])
    p.add_argument("--arms", required=True, help="comma-separated arms: default or ONEREC_X=v+ONEREC_Y=w")
    p.add_argument("--rate", type=float, default=100.0, help="offered requests/s")
    p.add_argument("--duration", type=float, default=15.0, help="seconds per arm")
    p.add_argument("--users", type=int, default=2000, help="test users seeded into Redis")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--entry-items", type=int, default=0,
                   help="items per seeded entry (random catalogue items: what ONEREC_ITEM_WEIGHT > 0 costs, not its "
                        "quality)")
    p.add_argument("--out", type=Path, default=None, help="also write the arms' results here (JSON)")
    p.add_argument("--results", metavar="NAME", default=None,
                   help="also write the results file NAME.json (docs/results/ for Beauty): per distinct arm, the "
                        "means of its runs; the runs themselves under 'arms'")
    args = p.parse_args(argv)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    envs = [arm_env(a) for a in arms]
    checkpoint = get_settings().resolved("onerec").resolve()
    results = []
    with redis_server() as server:
        url = server.url
        users = ol.seed_redis(url, "bench", checkpoint, args.users, 32, "bench", items=args.entry_items)
        for arm, extra in zip(arms, envs, strict=True):
            env = {"ONEREC_REDIS_URL": url, "ONEREC_NAMESPACE": "bench", "ONEREC_ONEREC_DIR": str(checkpoint),
                   "PYTHONPATH": str(ROOT), **extra}  # fmt: skip
            port = free_port()
            with process(uvicorn_cmd("online_api.app:create_app", port), env) as api:
                wait_http(f"http://127.0.0.1:{port}/readyz", 120, api)
                base = f"http://127.0.0.1:{port}"
                ol.run_client(f"{base}/v1/recommend", 50, 3, users, args.k)  # warm-up (not reported)
                r = ol.client_step(f"{base}/v1/recommend", args.rate, args.duration, users, args.k,
                                   f"{base}/metrics", api.pid)  # fmt: skip
            total = sum(r["sources"].values()) or 1
            row = {"arm": arm, "rate": args.rate, "p50_ms": r["p50_ms"], "p90_ms": r["p90_ms"], "p99_ms": r["p99_ms"],
                   "errors": r["errors"], "think_ahead_share": round(r["sources"].get("think-ahead", 0) / total, 4),
                   "fallback_reasons": r.get("fallback_reasons", {}),
                   "server_cpu_ms_per_request": r.get("server_cpu_ms_per_request"),
                   "api_cpu_ms_per_request": r.get("api_cpu_ms_per_request"),
                   "model_cpu_ms_per_request": r.get("model_cpu_ms_per_request"), "cpu_probe_ms": ol.cpu_probe_ms()}
            results.append(row)
            print(json.dumps(row), flush=True)
    command = " ".join(["python -m benchmarks.online_ab", *(sys.argv[1:] if argv is None else argv)])
    if args.out is not None:
        args.out.write_text(json.dumps({"command": command, "arms": results}, indent=2) + "\n")
    if args.results:
        from services.results import write_result

        path = write_result(args.results, arm_means(results), note=f"alternated arms, one API process each, same "
                            f"seeded Redis ({args.users} onerec-beam entries, 32 prefixes, {args.entry_items} items); "
                                 "means of each arm's runs")
        doc = json.loads(path.read_text())
        path.write_text(json.dumps({**doc, "arms": results}, indent=2) + "\n")


def arm_label(arm: str) -> str:
    """``default`` -> ``default``; ``ONEREC_A=1+ONEREC_B=x`` -> ``a_1__b_x`` (a metric-name prefix)."""
    if arm == "default":
        return arm
    return "__".join(kv.lower().removeprefix("onerec_").replace("=", "_") for kv in arm.split("+"))


def arm_means(rows: list[dict]) -> dict[str, float]:
    """Per distinct arm: mean p50/p99, server CPU per answer and think-ahead share of its runs, and its run count."""
    out: dict[str, float] = {}
    for arm in dict.fromkeys(r["arm"] for r in rows):
        runs = [r for r in rows if r["arm"] == arm]
        label = arm_label(arm)
        for key, name in (("p50_ms", "p50_ms"), ("p99_ms", "p99_ms"),
                          ("server_cpu_ms_per_request", "cpu_ms_per_answer"),
                          ("think_ahead_share", "think_ahead_share")):
            vals = [float(r[key]) for r in runs if r.get(key) is not None]
            if vals:
                out[f"{label}_{name}"] = round(sum(vals) / len(vals), 3)
        out[f"{label}_runs"] = len(runs)
    out["rate"] = rows[0]["rate"] if rows else 0.0
    return out


if __name__ == "__main__":
    main()
