"""The main job: the whole Think-Ahead pipeline on the bundled data, ending in printed recommendations.

Stages (each one command of its own, see README; built artifacts are reused unless ``--fresh``):
semantic IDs -> lightweight OneRec -> OneRec-Think (base, alignment, activation, enhancement) ->
a local redis-server -> offline vLLM refresh of reasoning + prefixes -> the online API -> sample
``POST /v1/recommend`` answers with titles and reasoning. Profile ``quick`` (default) fits in about
20 minutes on 2 cores; ``full`` reruns the budgets behind docs/RESULTS.md (hours).

    make demo                       # quick profile, set-up included
    make demo ARGS="--profile full"
    make demo DATA=path/to/folder   # the same on your own dataset (its artifacts in artifacts/<folder name>/)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from services.catalog import exit_if_invalid
from services.config import claim_or_exit, get_settings

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


@dataclass
class Profile:
    """Budgets of one demo profile."""

    onerec_minutes: float
    think_steps: dict[str, int]
    refresh_users: int | None  # None = all users
    think_limit_users: int | None


PROFILES = {
    "quick": Profile(onerec_minutes=4.0, think_steps={"base": 200, "align": 300, "activate": 150, "enhance": 10},
                     refresh_users=300, think_limit_users=3000),
    "full": Profile(onerec_minutes=60.0, think_steps={"base": 800, "align": 1600, "activate": 600, "enhance": 150},
                    refresh_users=None, think_limit_users=None),
}


def step(title: str) -> None:
    print(f"\n=== {title} ===", flush=True)


def run(args: list[str], env: dict[str, str] | None = None) -> None:
    print("$ " + " ".join(args), flush=True)
    subprocess.run(args, cwd=ROOT, check=True, env={**os.environ, **(env or {})})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not ready after {timeout_s:.0f}s")


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return dict(json.loads(r.read()))


def build_models(p: Profile, art: Path, fresh: bool) -> None:
    sid = art / "sid" / "current"
    if fresh or not (sid / "codes.tsv").exists():
        step("1/6 semantic IDs (MiniLM title embeddings + item2vec, residual k-means 3x256 + disambiguation)")
        run([PY, "-m", "model.semantic_ids", "build", "--variant", "text_cf", "--out", str(art / "sid")])
    else:
        print(f"semantic IDs: reusing {sid.resolve().name}")
    onerec = art / "onerec" / "current"
    if fresh or not (onerec / "model.safetensors").exists():
        step(f"2/6 lightweight OneRec ({p.onerec_minutes:.0f} min budget)")
        run([PY, "-m", "model.onerec", "train", "--sid", str(sid), "--out", str(art / "onerec"), "--name",
             f"demo-{int(time.time())}", "--max-minutes", str(p.onerec_minutes), "--val-users", "1000"])
    else:
        print(f"OneRec: reusing {onerec.resolve().name}")
    think = art / "think"
    if fresh or not (think / "current" / "config.json").exists():
        step("3/6 OneRec-Think: base -> itemic alignment -> reasoning activation -> reasoning enhancement")
        limit = ["--limit-users", str(p.think_limit_users)] if p.think_limit_users else []
        common = ["--sid-dir", str(sid), "--threads", "2", *limit]
        run([PY, "-m", "model.think.train", "base", "--out", str(think / "demo-base"), "--steps",
             str(p.think_steps["base"]), *common])
        prev = think / "demo-base"
        for stage in ("align", "activate", "enhance"):
            out = think / f"demo-{stage}"
            run([PY, "-m", "model.think.train", stage, "--init", str(prev), "--out", str(out), "--steps",
                 str(p.think_steps[stage]), *common, *(["--current"] if stage == "enhance" else [])])
            prev = out
    else:
        print(f"OneRec-Think: reusing {(think / 'current').resolve().name}")


def start_redis(tmp: Path) -> tuple[subprocess.Popen, str]:
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(tmp)], stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc, url
        time.sleep(0.1)
    raise TimeoutError("redis-server did not start")


def serve_and_show(p: Profile, art: Path, users: int) -> None:
    from services.catalog import load_dataset

    tmp = Path(tempfile.mkdtemp(prefix="onerec-demo-"))
    procs: list[subprocess.Popen] = []
    try:
        step("4/6 local redis-server")
        redis_proc, url = start_redis(tmp)
        procs.append(redis_proc)
        env = {"ONEREC_REDIS_URL": url, "ONEREC_ARTIFACTS_DIR": str(art), "VLLM_CPU_KVCACHE_SPACE": "2"}
        step(f"5/6 offline refresh with vLLM ({p.refresh_users or 'all'} users): reasoning + (a, b) prefixes -> Redis")
        limit = ["--limit", str(p.refresh_users)] if p.refresh_users else []
        run([PY, "-m", "offline_worker", "refresh", "--engine", "vllm", *limit], env=env)
        step("6/6 online API + sample recommendations")
        port = free_port()
        api = subprocess.Popen([PY, "-m", "online_api", "--port", str(port)], cwd=ROOT, env={**os.environ, **env})
        procs.append(api)
        base = f"http://127.0.0.1:{port}"
        wait_http(base + "/readyz", 180)
        ds = load_dataset(get_settings().data_dir)
        for user in sorted(ds.sequences)[:users]:
            out = post(base + "/v1/recommend", {"user_id": user, "k": 5})
            hist = ds.sequences[user][:-1][-5:]
            print(f"\nuser {user}  (source={out['source']}, {out['latency_ms']:.1f} ms, version={out['version']})")
            print("  recent history: " + " | ".join(ds.catalog.title(i) or "?" for i in hist))
            print(f"  reasoning: {(out.get('reasoning') or '(none)')[:300]}")
            for rank, item in enumerate(out["items"], 1):
                print(f"  {rank}. [{item['item_id']}] {item['title']}  (score {item['score']:.2f})")
        print(f"\nAPI docs while it runs: {base}/docs  (stopping now; `python -m online_api` serves it)")
    finally:
        for proc in reversed(procs):
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m scripts.demo", description=__doc__.split("\n")[0])
    ap.add_argument("--profile", choices=sorted(PROFILES), default="quick", help="training/refresh budgets")
    ap.add_argument("--fresh", action="store_true", help="rebuild every artifact instead of reusing it")
    ap.add_argument("--data", type=Path, default=None,
                    help="dataset folder (sequences.txt, items.tsv); default ONEREC_DATA_DIR or data/beauty")
    ap.add_argument("--artifacts", type=Path, default=None,
                    help="artifacts folder of the dataset (default: the dataset's, see ONEREC_ARTIFACTS_ROOT)")
    ap.add_argument("--users", type=int, default=3, help="sample users to print")
    args = ap.parse_args(argv)
    if args.data is not None:  # every stage (child processes and this one) reads the dataset from Settings
        os.environ["ONEREC_DATA_DIR"] = str(args.data.resolve())
        get_settings.cache_clear()
    exit_if_invalid(get_settings().data_dir)  # bad data: one line per problem, before any stage starts
    args.artifacts = args.artifacts or get_settings().artifacts_dir
    os.environ["ONEREC_ARTIFACTS_DIR"] = str(args.artifacts.resolve())
    get_settings.cache_clear()
    claim_or_exit(get_settings())
    print(f"dataset {get_settings().dataset} ({get_settings().data_dir}), artifacts {args.artifacts}")
    t0 = time.perf_counter()
    p = PROFILES[args.profile]
    build_models(p, args.artifacts, args.fresh)
    serve_and_show(p, args.artifacts, args.users)
    print(f"\nmain job finished in {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
