"""The main job: the whole Think-Ahead pipeline on a dataset, ending in what it measured.

Stages (each one command of its own, see README; built artifacts are reused unless ``--fresh``):
dataset check -> semantic IDs -> lightweight OneRec -> the consumed-item rule chosen on validation ->
OneRec-Think (base, alignment, activation, enhancement) -> a local redis-server -> an offline vLLM refresh
on the staler histories and the test-split quality table (MostPop, online, think-ahead) -> the serving
refresh -> the online API and sample ``POST /v1/recommend`` answers -> the stage-time table. A progress line
with the whole job's ETA is printed after every stage and every minute. Profiles: ``quick`` (default,
small budgets: its numbers are labelled quick), ``full`` (the budgets behind docs/RESULTS.md, hours) and
``tiny`` (a few-minute smoke run of every stage on a small shop; its numbers mean nothing). Expected times
per profile: README, "Expected times".

    make demo                       # quick profile, set-up included
    make demo ARGS="--profile full"
    make demo DATA=path/to/folder   # the same on your own dataset (its artifacts in artifacts/<folder name>/)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from scripts.demo_report import JobClock, fmt_s, quality_table
from services.catalog import exit_if_invalid
from services.config import CONSUMED_RULE_FILE, claim_or_exit, get_settings
from services.harness import PY, ROOT, free_port, process, redis_server, wait_http


@dataclass
class Profile:
    """Budgets of one demo profile and its expected stage times (seconds, 2-core machine: README)."""

    note: str  # what its quality numbers are
    sid_args: list[str]
    onerec_args: list[str]
    think_args: dict[str, list[str]]  # stage -> flags (base, align, activate, enhance)
    refresh_users: int | None  # serving refresh; None = all users
    quality_users: int | None  # test users of the quality table (and of its refresh); None = all
    rule_users: int | None  # validation users that choose the consumed-item rule; None = all
    expected_s: dict[str, float]  # stage -> expected seconds (the ETA)


STAGES = ("semantic IDs", "OneRec", "consumed-item rule", "OneRec-Think", "redis", "refresh for the test",
          "quality table", "serving refresh", "API + samples")
LIMIT = "--limit-users"
PROFILES = {
    "quick": Profile(
        note="quick numbers: small budgets, a sample of users; the recipe's are in docs/RESULTS.md",
        sid_args=["--variant", "text_cf"],
        onerec_args=["--max-minutes", "4", "--val-users", "1000"],
        think_args={"base": ["--steps", "200", LIMIT, "3000"], "align": ["--steps", "300", LIMIT, "3000"],
                    "activate": ["--steps", "150", LIMIT, "3000"], "enhance": ["--steps", "10", LIMIT, "3000"]},
        refresh_users=300, quality_users=300, rule_users=2000,
        # Beauty, idle 2-core Xeon 2.5 GHz (docs/results/demo.json: 954 s for the stages before this table);
        # the rule, refresh-for-test and quality stages are estimates from their parts
        expected_s={"semantic IDs": 60, "OneRec": 260, "consumed-item rule": 90, "OneRec-Think": 420, "redis": 1,
                    "refresh for the test": 150, "quality table": 60, "serving refresh": 150,
                    "API + samples": 30}),
    "full": Profile(
        note="the full budgets (OneRec 60 min, all users); the recipe (selection + refit) is in docs/RESULTS.md",
        sid_args=["--variant", "text_cf"],
        onerec_args=["--max-minutes", "60", "--val-users", "1000"],
        think_args={"base": ["--steps", "800"], "align": ["--steps", "1600"], "activate": ["--steps", "600"],
                    "enhance": ["--steps", "150"]},
        refresh_users=None, quality_users=None, rule_users=None,
        # estimates from the parts measured on Beauty (docs/RESULTS.md: refresh 661 s for all users)
        expected_s={"semantic IDs": 60, "OneRec": 3700, "consumed-item rule": 900, "OneRec-Think": 5400, "redis": 1,
                    "refresh for the test": 700, "quality table": 600, "serving refresh": 700,
                    "API + samples": 30}),
    "tiny": Profile(
        note="tiny smoke run: every stage for a few seconds; the numbers say nothing about quality",
        sid_args=["--variant", "text", "--levels", "2", "--codebook-size", "8"],
        onerec_args=["--epochs", "2", "--d-model", "32", "--layers", "1", "--heads", "2", "--batch-size", "16",
                     "--val-users", "100", "--threads", "2"],
        think_args={
            "base": ["--steps", "10", "--batch-size", "8", "--bpe-vocab", "300", "--hidden", "64", "--layers", "1",
                     "--heads", "2", "--kv-heads", "1", "--head-dim", "32", "--intermediate", "128"],
            "align": ["--warmup-steps", "5", "--steps", "10", "--epochs", "0", "--batch-size", "8"],
            "activate": ["--steps", "10", "--batch-size", "8", "--embeddings", "bow", "--lora-r", "4"],
            "enhance": ["--steps", "1", "--batch-size", "2", "--group", "2", "--beam", "4", "--max-think", "8"]},
        refresh_users=20, quality_users=40, rule_users=None,
        expected_s={"semantic IDs": 10, "OneRec": 15, "consumed-item rule": 8, "OneRec-Think": 60, "redis": 1,
                    "refresh for the test": 45, "quality table": 10, "serving refresh": 45, "API + samples": 10}),
}


def step(title: str) -> None:
    print(f"\n=== {title} ===", flush=True)


def run(args: list[str], env: dict[str, str] | None = None) -> None:
    print("$ " + " ".join(args), flush=True)
    subprocess.run(args, cwd=ROOT, check=True, env={**os.environ, **(env or {})})


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return dict(json.loads(r.read()))


def build_sid(p: Profile, art: Path, fresh: bool) -> bool:
    """Semantic IDs; True when reused."""
    sid = art / "sid" / "current"
    if not fresh and (sid / "codes.tsv").exists():
        print(f"semantic IDs: reusing {sid.resolve().name}")
        return True
    step("semantic IDs (item text embeddings, residual k-means + disambiguation level)")
    run([PY, "-m", "model.semantic_ids", "build", *p.sid_args, "--out", str(art / "sid")])
    return False


def build_onerec(p: Profile, profile: str, art: Path, fresh: bool) -> bool:
    onerec = art / "onerec" / "current"
    if not fresh and (onerec / "model.safetensors").exists():
        print(f"OneRec: reusing {onerec.resolve().name}")
        return True
    step("lightweight OneRec (selection run: validation each epoch, best epoch kept)")
    run([PY, "-m", "model.onerec", "train", "--sid", str(art / "sid" / "current"), "--out", str(art / "onerec"),
         "--name", f"select-demo-{profile}-{time.strftime('%Y%m%d-%H%M%S')}", *p.onerec_args])
    return False


def choose_consumed_rule(p: Profile, art: Path, fresh: bool) -> bool:
    """`evaluation repeats --record` on validation; reused while the OneRec checkpoint it measured is current."""
    rule = art / CONSUMED_RULE_FILE
    checkpoint = (art / "onerec" / "current").resolve().name
    if not fresh and rule.exists() and Path(json.loads(rule.read_text()).get("checkpoint", "")).name == checkpoint:
        print(f"consumed-item rule: reusing {rule}")
        return True
    step("consumed-item rule: OneRec as served, history items excluded vs kept, on validation")
    limit = ["--limit", str(p.rule_users)] if p.rule_users else []
    run([PY, "-m", "evaluation", "repeats", "--split", "valid", "--record", *limit])
    return False


def build_think(p: Profile, art: Path, fresh: bool) -> bool:
    think = art / "think"
    if not fresh and (think / "current" / "config.json").exists():
        print(f"OneRec-Think: reusing {(think / 'current').resolve().name}")
        return True
    step("OneRec-Think: base -> itemic alignment -> reasoning activation -> reasoning enhancement")
    sid = art / "sid" / "current"
    common = ["--sid-dir", str(sid), "--threads", "2"]
    prev: Path | None = None
    for stage in ("base", "align", "activate", "enhance"):
        out = think / f"demo-{stage}"
        init = ["--init", str(prev)] if prev is not None else []
        run([PY, "-m", "model.think", stage, *init, "--out", str(out), *p.think_args[stage], *common,
             *(["--current"] if stage == "enhance" else [])])
        prev = out
    return False


def show_samples(base: str, users: int) -> None:
    from services.catalog import load_dataset

    ds = load_dataset(get_settings().data_dir)
    for user in sorted(ds.sequences)[:users]:
        out = post(base + "/v1/recommend", {"user_id": user, "k": 5})
        hist = ds.sequences[user][:-1][-5:]
        print(f"\nuser {user}  (source={out['source']}, {out['latency_ms']:.1f} ms, version={out['version']})")
        print("  recent history: " + " | ".join(ds.catalog.title(i) or "?" for i in hist))
        print(f"  reasoning: {(out.get('reasoning') or '(none)')[:300]}")
        for rank, item in enumerate(out["items"], 1):
            print(f"  {rank}. [{item['item_id']}] {item['title']}  (score {item['score']:.2f})")
    print("\nscores are log-probabilities of the item under the online model (negative; higher is better); "
          "popular-item fill-ins carry the log of their share of interactions")


def serve_and_show(p: Profile, profile: str, art: Path, users: int, clock: JobClock) -> str:
    """Redis, the two refreshes, the quality table, the API and the samples; returns the quality table."""
    tmp = Path(tempfile.mkdtemp(prefix="onerec-demo-"))
    table = ""
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, tmp, True)
        env: dict[str, str] = {"ONEREC_ARTIFACTS_DIR": str(art), "VLLM_CPU_KVCACHE_SPACE": "2"}

        def redis_stage() -> None:
            step("local redis-server")
            env["ONEREC_REDIS_URL"] = stack.enter_context(redis_server(tmp)).url

        clock.run("redis", redis_stage)
        quality_ns = "demo-quality"

        def refresh_for_test() -> None:
            step(f"offline refresh for the test split ({p.quality_users or 'all'} users, history without its last "
                 "two items): reasoning + (a, b) prefixes")
            limit = ["--limit", str(p.quality_users)] if p.quality_users else []
            run([PY, "-m", "offline_worker", "--namespace", quality_ns, "refresh", "--engine", "vllm", "--holdout",
                 "2", *limit], env=env)

        clock.run("refresh for the test", refresh_for_test)

        def quality() -> None:
            nonlocal table
            step("quality on the test split: MostPop, online (OneRec alone), think-ahead")
            out = tmp / "quality.json"
            users = ["--users", str(p.quality_users)] if p.quality_users else []
            run([PY, "-m", "scripts.demo_report", "quality", "--namespace", quality_ns, *users, "--profile", profile,
                 "--profile-note", p.note, "--out", str(out)], env=env)
            table = quality_table(json.loads(out.read_text()))
            print(table)

        clock.run("quality table", quality)

        def refresh() -> None:
            step(f"serving refresh with vLLM ({p.refresh_users or 'all'} users): reasoning + (a, b) prefixes -> Redis")
            limit = ["--limit", str(p.refresh_users)] if p.refresh_users else []
            run([PY, "-m", "offline_worker", "refresh", "--engine", "vllm", *limit], env=env)

        clock.run("serving refresh", refresh)

        def api() -> None:
            step("online API + sample recommendations")
            port = free_port()
            proc = stack.enter_context(process([PY, "-m", "online_api", "--port", str(port)], env, echo=True))
            base = f"http://127.0.0.1:{port}"
            wait_http(base + "/readyz", 180, proc)
            show_samples(base, users)
            print(f"\nAPI docs while it runs: {base}/docs  (stopping now; `python -m online_api` serves it)")

        clock.run("API + samples", api)
    return table


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m scripts.demo", description=__doc__.split("\n")[0])
    ap.add_argument("--profile", choices=sorted(PROFILES), default="quick", help="training/refresh budgets")
    ap.add_argument("--fresh", action="store_true", help="rebuild every artifact instead of reusing it")
    ap.add_argument("--data", type=Path, default=None,
                    help="dataset folder (sequences.txt, items.tsv); default ONEREC_DATA_DIR or data/beauty")
    ap.add_argument("--artifacts", type=Path, default=None,
                    help="artifacts folder of the dataset (default: the dataset's, see ONEREC_ARTIFACTS_ROOT)")
    ap.add_argument("--users", type=int, default=3, help="sample users to print")
    ap.add_argument("--progress-every", type=float, default=60.0, help="seconds between whole-job progress lines")
    args = ap.parse_args(argv)
    if args.data is not None:  # every stage (child processes and this one) reads the dataset from Settings
        os.environ["ONEREC_DATA_DIR"] = str(args.data.resolve())
        get_settings.cache_clear()
    exit_if_invalid(get_settings().data_dir)  # bad data: one line per problem, before any stage starts
    args.artifacts = args.artifacts or get_settings().artifacts_dir
    os.environ["ONEREC_ARTIFACTS_DIR"] = str(args.artifacts.resolve())
    get_settings.cache_clear()
    claim_or_exit(get_settings())
    p = PROFILES[args.profile]
    print(f"dataset {get_settings().dataset} ({get_settings().data_dir}), artifacts {args.artifacts}, profile "
          f"{args.profile}: expected about {fmt_s(sum(p.expected_s.values()))} on a 2-core machine (README)")
    clock = JobClock({stage: p.expected_s[stage] for stage in STAGES}, heartbeat_s=args.progress_every)
    art = args.artifacts
    try:
        clock.run("semantic IDs", lambda: build_sid(p, art, args.fresh))
        clock.run("OneRec", lambda: build_onerec(p, args.profile, art, args.fresh))
        clock.run("consumed-item rule", lambda: choose_consumed_rule(p, art, args.fresh))
        clock.run("OneRec-Think", lambda: build_think(p, art, args.fresh))
        quality = serve_and_show(p, args.profile, art, args.users, clock)
    except subprocess.CalledProcessError as e:  # the stage's own output above says why
        print(clock.table(args.profile), file=sys.stderr)
        raise SystemExit(f"error: a stage failed (exit status {e.returncode}): {' '.join(map(str, e.cmd))}; "
                         "its output is above; built artifacts are reused when you run the job again") from None
    step("summary")
    print(quality)
    print()
    print(clock.table(args.profile))
    print(f"\nmain job finished in {fmt_s(time.perf_counter() - clock.t0)}")


if __name__ == "__main__":
    main()
