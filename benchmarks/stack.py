"""Wall time of `make stack` (scripts/stack.sh up), first run and cached run, and the sizes of its images.

Runs `scripts/stack.sh up` twice with a `scripts/stack.sh down` (volumes included) between: the first run
builds what the build cache lacks (with ``--fresh``, everything: the project images, the local base
images and the build cache are removed first, so the run is a cold build on this host; the engine,
docker.io and Compose stay installed), the second reuses the image layers but trains, serves and
refreshes again. Each run's step times come from the timings file stack.sh writes
(runs/stack/<project>.json). Writes docs/results/stack.json (+ its RESULTS.md line). Not a load test: the
stack's latency and fault behaviour are measured by benchmarks/online_load.py and benchmarks/faults.py.

    python -m benchmarks.stack --fresh          # cold first run, then a cached run (tens of minutes)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
STACK = ROOT / "scripts" / "stack.sh"
LOCAL_BASE = ["onerec-think-local/debian:bookworm", "onerec-think-local/python:3.11", "onerec-think-local/redis:7"]


def images(prefix: str, tag: str) -> dict[str, str]:
    return {"api": f"{prefix}-api:{tag}", "worker_cpu": f"{prefix}-worker-cpu:{tag}"}


def image_bytes(name: str) -> int | None:
    out = subprocess.run(["docker", "image", "inspect", "-f", "{{.Size}}", name], capture_output=True, text=True)
    return int(out.stdout.strip()) if out.returncode == 0 else None


def run_stack(project: str, action: str) -> float:
    env = {**os.environ, "COMPOSE_PROJECT_NAME": project}
    t0 = time.perf_counter()
    subprocess.run([str(STACK), action], cwd=ROOT, env=env, check=True)
    return round(time.perf_counter() - t0, 1)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.stack", description=__doc__.split("\n")[0])
    ap.add_argument("--fresh", action="store_true", help="remove the images and the build cache first (cold build)")
    ap.add_argument("--project", default="onerec-think", help="compose project name")
    ap.add_argument("--keep", action="store_true", help="leave the stack of the second run running")
    ap.add_argument("--no-results", action="store_true", help="do not write docs/results/stack.json")
    args = ap.parse_args(argv)
    prefix, tag = os.environ.get("IMAGE_PREFIX", "onerec-think"), os.environ.get("IMAGE_TAG", "latest")
    timings = ROOT / "runs" / "stack" / f"{args.project}.json"

    if args.fresh:
        run_stack(args.project, "down")
        subprocess.run(["docker", "image", "rm", "-f", *images(prefix, tag).values(), *LOCAL_BASE],
                       capture_output=True)
        subprocess.run(["docker", "builder", "prune", "-af"], capture_output=True, check=True)
    runs: dict[str, Any] = {}
    for name in ("first", "cached"):
        if name == "cached":
            run_stack(args.project, "down")
        wall = run_stack(args.project, "up")
        steps = json.loads(timings.read_text())
        runs[name] = {"wall_s": wall, "steps_s": steps["steps_s"], "local_base": steps["local_base"]}
        print(f"[bench] {name} run: {wall:.0f} s  {steps['steps_s']}", flush=True)
    if not args.keep:
        run_stack(args.project, "down")

    metrics: dict[str, Any] = {
        "first_run_s": runs["first"]["wall_s"],
        "cached_run_s": runs["cached"]["wall_s"],
        "first_build_s": runs["first"]["steps_s"]["base_images"] + runs["first"]["steps_s"]["build"],
        "cached_build_s": runs["cached"]["steps_s"]["base_images"] + runs["cached"]["steps_s"]["build"],
        "first_steps_s": runs["first"]["steps_s"],
        "cached_steps_s": runs["cached"]["steps_s"],
        "cold_build_cache": args.fresh,
        "local_base_images": runs["first"]["local_base"],
    }
    for key, name in images(prefix, tag).items():
        metrics[f"image_{key}_bytes"] = image_bytes(name)
    if runs["first"]["local_base"]:
        metrics["image_local_python_bytes"] = image_bytes(LOCAL_BASE[1])
        metrics["image_local_redis_bytes"] = image_bytes(LOCAL_BASE[2])
    print(json.dumps(metrics, indent=2))
    if not args.no_results:
        from services.results import write_result

        cache = "first run from an empty build cache" if args.fresh else "first run on the existing cache"
        note = f"scripts/stack.sh up, tiny training profile; engine, docker.io and Compose already installed; {cache}"
        write_result("stack", metrics, note=note)


if __name__ == "__main__":
    main()
