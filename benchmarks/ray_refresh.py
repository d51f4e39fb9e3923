"""Ray overhead: the same refresh single-process and on a local Ray cluster (``--ray``), same run, same Redis.

Runs ``python -m offline_worker refresh`` twice as subprocesses on one dataset folder, each into its own
namespace of a given Redis: once in one process, once with ``--ray`` and ``--actors`` engine replicas
(vLLM by default). Reports users/s end to end (engine start-up, Ray start-up and publish included: what an
operator waits for) and the refresh's own users/s, and the ratio Ray / single. Writes
docs/results/ray_refresh.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from services.results import write_result


def _run(cmd: list[str]) -> tuple[dict[str, Any], float]:
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    start = out.stdout.rfind("\n{") + 1  # the report is the last JSON object (vLLM may log before it)
    text = out.stdout[start:]
    return json.loads(text), wall


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ray_refresh", description=__doc__.split("\n\n")[0])
    p.add_argument("--redis-url", required=True)
    p.add_argument("--prefix", default="bench_ray_", help="namespaces PREFIX + one / ray (must be empty)")
    p.add_argument("--data", type=Path, required=True, help="dataset folder with sequences.txt")
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--engine", choices=("vllm", "hf"), default="vllm")
    p.add_argument("--actors", type=int, default=2)
    p.add_argument("--chunk", type=int, default=128)
    p.add_argument("--no-results", action="store_true")
    args = p.parse_args(argv)

    base = [sys.executable, "-m", "offline_worker", "--redis-url", args.redis_url]
    common = ["refresh", "--engine", args.engine, "--data", str(args.data), "--model", str(args.model),
              "--chunk", str(args.chunk), "--no-progress", "--no-histories"]  # fmt: skip
    one, one_wall = _run([*base, "--namespace", f"{args.prefix}one", *common])
    ray, ray_wall = _run([*base, "--namespace", f"{args.prefix}ray", *common, "--ray", "--ray-actors",
                          str(args.actors)])  # fmt: skip
    users = one["computed"]
    assert ray["computed"] == users and one["published"] and ray["published"], (one, ray)
    metrics = {
        "users": users,
        "actors": args.actors,
        "single_wall_s": round(one_wall, 1),
        "ray_wall_s": round(ray_wall, 1),
        "single_users_per_s": round(users / one_wall, 2),
        "ray_users_per_s": round(users / ray_wall, 2),
        "ray_over_single": round(one_wall / ray_wall, 3),
        "single_refresh_users_per_s": round(one["users_per_s"], 2),
        "ray_refresh_users_per_s": round(ray["users_per_s"], 2),
    }
    print(json.dumps(metrics, indent=2))
    if not args.no_results:
        note = (f"engine={args.engine}, chunk={args.chunk}; wall = the whole command (engine and Ray start-up, "
                "publish); refresh_users_per_s = the report's (single: after engine start-up; ray: Ray and actor "
                "start-up included)")
        write_result("ray_refresh", metrics, note=note)


if __name__ == "__main__":
    main()
