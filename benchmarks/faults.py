"""Reliability suite: real faults injected into real processes, and what clients saw, counted.

One run (about 5 minutes on 2 shared cores) does, against the trained artifacts and Beauty:
1. **Redis under load.** A private redis-server (AOF with ``appendfsync always``, so what it acknowledged
   survives a SIGKILL) is seeded with think-ahead entries for ``--users`` test users
   (`benchmarks.online_load.seed_redis`); the API runs as a uvicorn subprocess and gets open-loop load
   (`benchmarks.fault_load`: ``--rate`` recommend/s plus events). Redis is SIGKILLed and restarted
   ``--kills`` times (down ``--down-s`` each), frozen once with SIGSTOP for ``--freeze-s``, then corrupt,
   oversized and foreign values are written under some users' keys while the load goes on; the API's model
   process (`online_api.model_process`) is SIGKILLed ``--model-kills`` times. Counted: 5xx,
   answers that never came, degraded answers, and per restart ``recovery_s``: from the restarted Redis
   answering PING until answers are think-ahead and not degraded again (and the share of such answers
   until the next fault), per model kill ``model_recovery_s`` (from the kill until such answers again:
   the API replaces the child meanwhile); events acknowledged vs stored at the end (lost, duplicated).
2. **Refresh killed.** ``python -m offline_worker refresh`` (HF engine, the real think model, the first
   ``--refresh-users`` users) is SIGKILLed ``--refresh-kills`` times mid-way and then re-run to completion
   (it resumes and publishes). A reader thread polls the live version all along: every version it sees
   must hold all users' entries (else a partial read). Then every user's entry and history is checked
   against the plan (missing or wrong = lost write).
3. **Fuzzing.** schemathesis over the API's OpenAPI document (`benchmarks.fuzz`, positive and negative
   cases): 5xx and schema-check failures counted.
4. **Hostile input** (`benchmarks.hostile`): ``--http-fuzz-cases`` byte-level, Unicode, depth, number
   and content-type cases; ``--redis-fuzz-cases`` hostile values written under the entries, histories and the
   live-version pointer the API reads while requests run; then Redis refuses writes (``maxmemory`` 1 with
   ``noeviction``, then a replica of nothing: READONLY) while ``--refusal-requests`` events and recommends run.
   Counted: 5xx, hangs over the budget + 1 s, non-JSON bodies, and whether the read breaker opened.

    python -m benchmarks.faults --results     # full run, writes docs/results/faults.json
    python -m benchmarks.faults --quick       # a short smoke run, nothing written
    python -m benchmarks.faults --phases hostile   # only phase 4 (no think model needed); --results merges

Not a test (the CI-sized parts are tests/test_api_reliability.py, test_api_fuzz.py, test_api_hostile.py,
test_offline_refresh.py); never run by CI.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import redis

from benchmarks.fault_load import LoadProcess, Outcome, dump, event_ledger, good_share, recovery_after
from benchmarks.online_load import child_pids, seed_redis
from services.harness import PY, ROOT, RedisServer, free_port, percentile, process, uvicorn_cmd, wait_http
from services.store import SCHEMA_VERSION, ThinkEntry, ThinkKeys, ThinkStore

NS, VERSION, KEY = "faults", "faults", "faults-key"
ENTRY_FAULTS = ("garbage", "foreign_json", "future_schema", "oversized", "wrong_type", "empty")
HISTORY_FAULTS = ("history_wrong_type", "history_junk")


# --------------------------------------------------------------------------- phase 1: serving under faults


def corrupt(client: redis.Redis, users: list[int]) -> dict[int, tuple[str, float]]:
    """Write a bad value under each user's entry or history key, kinds in turn.
    Returns user -> (kind, time.monotonic() once written)."""
    keys, out = ThinkKeys(NS), dict[int, tuple[str, float]]()
    kinds = ENTRY_FAULTS + HISTORY_FAULTS
    for n, u in enumerate(users):
        kind = kinds[n % len(kinds)]
        entry, hist = keys.think(VERSION, u), keys.history(u)
        values: dict[str, bytes] = {
            "garbage": os.urandom(64),
            "foreign_json": json.dumps({"user": u, "recommendations": [1, 2, 3]}).encode(),
            "future_schema": json.dumps({"v": SCHEMA_VERSION + 1, "r": "from a newer writer"}).encode(),
            "oversized": b'{"v":1,"r":"' + b"x" * (4 << 20) + b'"}',  # 4 MiB
            "empty": b"",
        }
        if kind in values:
            client.set(entry, values[kind])
        elif kind == "wrong_type":
            client.delete(entry)
            client.rpush(entry, b"not", b"an", b"entry")
        elif kind == "history_wrong_type":
            client.delete(hist)
            client.set(hist, b"not a list")
        else:  # history_junk: non-ids among 1000 elements
            client.rpush(hist, *[random.choice([b"junk", b"-5", b"1e3", b"\xff", b"12"]) for _ in range(1000)])
        out[u] = (kind, time.monotonic())
    return out


def api_counters(base: str) -> dict[str, float]:
    """The API's own view: fallback reasons, Redis errors, corrupt values, queued events (Prometheus text)."""
    wanted = ("onerec_fallback_total{", "onerec_redis_errors_total{", "onerec_corrupt_values_total ",
              "onerec_pending_events ", "onerec_events_total{", "onerec_events_replayed ")  # fmt: skip
    with urllib.request.urlopen(f"{base}/metrics", timeout=5) as r:
        lines = r.read().decode().splitlines()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(wanted)}


def model_child(api_pid: int) -> int | None:
    """Pid of the API process's model child (``python -m online_api.model_process``), if it has one."""
    for pid in child_pids(api_pid):
        try:
            if b"online_api.model_process" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return pid
        except OSError:
            continue
    return None


def phase_serving(args: argparse.Namespace, rp: RedisServer, base: str, users: list[int],
                  initial: dict[int, list[int]], items: list[int], api_pid: int) -> dict[str, Any]:  # fmt: skip
    load = LoadProcess(Path(args.log_dir), base, users, args.rate, sorted(initial), items, args.event_rate, KEY,
                       args.budget_ms)  # fmt: skip
    faults: list[tuple[str, float, float]] = []  # (kind, start, end: Redis answers again)
    boot: list[float] = []  # seconds from spawning redis-server to its first PING answer
    load.start()
    time.sleep(args.warm_s + 2.0)  # + the generator's start-up
    for n in range(args.kills):
        t_kill = time.monotonic()
        rp.signal(signal.SIGKILL)
        time.sleep(args.down_s)
        spawned, ready = rp.start()
        faults.append(("kill", t_kill, ready))
        boot.append(round(ready - spawned, 3))
        print(f"[faults] redis SIGKILL {n + 1}/{args.kills}: down {ready - t_kill:.2f}s (boot {boot[-1]:.2f}s)",
              flush=True)  # fmt: skip
        time.sleep(args.gap_s)
    if args.freeze_s > 0:
        t = time.monotonic()
        rp.signal(signal.SIGSTOP)
        time.sleep(args.freeze_s)
        rp.signal(signal.SIGCONT)
        faults.append(("freeze", t, time.monotonic()))
        print(f"[faults] redis SIGSTOP for {args.freeze_s}s", flush=True)
        time.sleep(args.gap_s)
    for n in range(args.model_kills):
        child = model_child(api_pid)
        if child is None:
            raise SystemExit("the API has no model process to kill (ONEREC_MODEL_PROCESS=false?)")
        t = time.monotonic()
        os.kill(child, signal.SIGKILL)
        faults.append(("model_kill", t, t))
        print(f"[faults] model process {child} SIGKILL {n + 1}/{args.model_kills}", flush=True)
        time.sleep(args.gap_s)
    client = redis.Redis.from_url(rp.url, socket_timeout=10)
    t_corrupt = time.monotonic()
    bad = corrupt(client, random.Random(1).sample(users, args.corrupt_users))
    kinds = Counter(kind for kind, _ in bad.values())
    print(f"[faults] {len(bad)} corrupt values written in {time.monotonic() - t_corrupt:.2f}s: {dict(kinds)}",
          flush=True)  # fmt: skip
    time.sleep(args.corrupt_s)
    outcomes = load.stop()
    t_end = time.monotonic()
    marks = faults + [("corrupt", t_corrupt, t_corrupt)]
    dump(outcomes, Path(args.log_dir) / "outcomes.jsonl", min(o.sched for o in outcomes), marks)

    # acknowledged events: wait for the API's write-behind buffer to drain, then read what Redis holds
    deadline = time.monotonic() + 15
    while api_counters(base).get("onerec_pending_events", 0) != 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    store = ThinkStore(client, NS)
    ledger = event_ledger(outcomes, initial, {u: store.get_history(u) for u in initial}, args.history_max)
    client.close()
    extra = {"api_counters": api_counters(base), "redis_boot_s_each": boot}
    return analyse(outcomes, faults, t_corrupt, t_end, bad) | ledger | extra


def analyse(outcomes: list[Outcome], faults: list[tuple[str, float, float]], t_corrupt: float, t_end: float,
            bad: dict[int, tuple[str, float]]) -> dict[str, Any]:  # fmt: skip
    starts = [f[1] for f in faults] + [t_corrupt]
    recovery: dict[str, list[float | None]] = {}
    after: list[float | None] = []  # share of good answers from recovery to the next fault
    windows = []  # (start, end) of each fault plus its recovery: degraded answers there are expected
    for n, (kind, start, end) in enumerate(faults):
        rec = recovery_after(outcomes, end, starts[n + 1])
        recovery.setdefault(kind, []).append(rec)
        windows.append((start, end + (rec if rec is not None else starts[n + 1] - end)))
        after.append(good_share(outcomes, windows[-1][1], starts[n + 1]))
    entry_bad = {u for u, (kind, _) in bad.items() if kind in ENTRY_FAULTS}
    recs = [o for o in outcomes if o.kind == "recommend"]
    during = [o for o in recs if any(s <= o.sched < e for kind, s, e in faults if kind == "kill")]
    steady = [o for o in recs if not any(s <= o.sched < e for s, e in windows)
              and not (o.sched >= t_corrupt and o.user in bad)]  # fmt: skip
    # answers to a corrupted user count from the moment its bad value was written
    corrupt_recs = [o for o in recs if o.user in bad and o.sched >= bad[o.user][1]]
    healthy_after = [o for o in recs if o.sched >= t_corrupt and o.user not in bad]
    kills = recovery.get("kill", [])
    statuses = Counter(o.status for o in outcomes)
    return {
        "requests": len(outcomes), "recommend_requests": len(recs), "statuses": dict(statuses),
        "server_errors": sum(n for s, n in statuses.items() if s >= 500),
        "transport_errors": statuses.get(0, 0),
        "error_kinds": dict(Counter(o.error for o in outcomes if o.error)),
        "redis_kills": len(kills), "redis_freezes": len(recovery.get("freeze", [])),
        "recovery_s_each": [round(r, 3) if r is not None else None for r in kills],
        # JSON has no infinity: a restart after which answers never recovered makes recovery_s null
        "recovery_s": round(max(r for r in kills if r is not None), 3) if kills and None not in kills else None,
        "restarts_not_recovered": sum(r is None for r in kills),
        "good_share_after_recovery": after,
        "freeze_recovery_s": [round(r, 3) if r is not None else None for r in recovery.get("freeze", [])],
        "model_kills": len(recovery.get("model_kill", [])),
        "model_recovery_s_each": [round(r, 3) if r is not None else None for r in recovery.get("model_kill", [])],
        "model_kills_not_recovered": sum(r is None for r in recovery.get("model_kill", [])),
        "answers_during_redis_down": len(during),
        "degraded_during_redis_down": sum(o.degraded for o in during),
        "p99_ms_during_redis_down": (round(percentile([o.done - o.sched for o in during], 99) * 1000, 1)
                                     if during else None),
        "degraded_outside_faults": sum(o.degraded or o.status != 200 for o in steady),
        "answers_outside_faults": len(steady),
        "p50_ms_outside_faults": round(percentile([o.done - o.sched for o in steady], 50) * 1000, 1),
        "p99_ms_outside_faults": round(percentile([o.done - o.sched for o in steady], 99) * 1000, 1),
        "corrupt_values": len(bad), "corrupt_user_answers": len(corrupt_recs),
        "corrupt_user_5xx": sum(o.status >= 500 for o in corrupt_recs),
        "corrupt_entries_served": sum(o.source == "think-ahead" for o in corrupt_recs if o.user in entry_bad),
        "think_ahead_share_other_users_during_corruption": round(
            sum(o.good for o in healthy_after) / max(1, len(healthy_after)), 4),
        "load_s": round(t_end - min((o.sched for o in outcomes), default=t_end), 1),
    }  # fmt: skip


# --------------------------------------------------------------------------- phase 2: refresh killed mid-way


class VersionReader(threading.Thread):
    """Polls the live version of `ns`; a read is partial if that version lacks any user's entry."""

    def __init__(self, url: str, ns: str, users: list[int]) -> None:
        super().__init__(name="version-reader", daemon=True)
        self.url, self.ns, self.users = url, ns, users
        self.stop_flag = threading.Event()
        self.reads = self.partial = self.errors = 0
        self.seen: Counter[str | None] = Counter()

    def run(self) -> None:
        store = ThinkStore(redis.Redis.from_url(self.url, socket_timeout=5), self.ns)
        rng = random.Random(0)
        while not self.stop_flag.is_set():
            try:
                v = store.current_version()
                n = store.count_entries(v) if v is not None else 0
                sample = store.get_entries(v, rng.sample(self.users, 8)) if v is not None else {}
            except redis.RedisError:
                self.errors += 1
                continue
            self.reads += 1
            self.seen[v] += 1
            self.partial += v is None or n != len(self.users) or any(e is None for e in sample.values())
            time.sleep(0.01)


def phase_refresh(args: argparse.Namespace, redis_url: str, logdir: Path) -> dict[str, Any]:
    from model.semantic_ids import SemanticIDs
    from offline_worker.refresh import HISTORY_TAIL, offline_histories
    from services.catalog import load_sequences
    from services.config import get_settings

    s = get_settings()
    ns = NS + "_refresh"
    histories = offline_histories(load_sequences(Path(s.data_dir) / "sequences.txt"), 0, args.refresh_users)
    users = sorted(histories)
    think = s.resolved("think")
    sid_dir = think / "sid" if (think / "sid" / "codes.tsv").is_file() else s.resolved("sid")
    valid = {(int(c[0]), int(c[1])) for c in SemanticIDs.load(sid_dir).codes}
    client = redis.Redis.from_url(redis_url, socket_timeout=30)
    store = ThinkStore(client, ns)
    # the live version the refresh replaces (complete, so readers have something to read from the start)
    a, b = next(iter(valid))
    store.begin_version("baseline", {"model": "faults-baseline"})
    store.write_entries("baseline", {u: ThinkEntry("baseline", [(a, b, -1.0)], len(h), h[-HISTORY_TAIL:],
                                                   "faults-baseline", time.time()) for u, h in histories.items()},
                        3600)  # fmt: skip
    store.publish("baseline", len(users))
    reader = VersionReader(redis_url, ns, users)
    reader.start()
    cmd = [PY, "-m", "offline_worker", "--redis-url", redis_url, "--namespace", ns, "refresh", "--engine", "hf",
           "--limit", str(args.refresh_users), "--chunk", str(args.refresh_chunk), "--samples", "1", "--prefixes", "4",
           "--beam-a", "2", "--max-reasoning-tokens", "8", "--no-progress"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    version: str | None = None
    kills, early, report = 0, 0, dict[str, Any]()
    for attempt in range(args.refresh_kills + 1):
        last = attempt == args.refresh_kills
        out, err = logdir / f"refresh{attempt}.json", logdir / f"refresh{attempt}.log"
        extra = [] if last else ["--throttle-s", str(args.refresh_throttle_s)]
        done_before = len(store.done_chunks(version, 0)) if version else 0
        with out.open("wb") as fo, err.open("wb") as fe:
            proc = subprocess.Popen(cmd + extra, cwd=ROOT, env=env, stdout=fo, stderr=fe)
            deadline = time.monotonic() + 300
            while proc.poll() is None and time.monotonic() < deadline:
                if not last:
                    version = version or next((v for v in store.versions() if v != "baseline"), None)
                    if version is not None and len(store.done_chunks(version, 0)) >= done_before + 2:
                        proc.send_signal(signal.SIGKILL)
                        proc.wait(10)
                        kills += 1
                        early += store.current_version() != "baseline"  # published with chunks missing?
                        print(f"[faults] refresh SIGKILL {kills}: {len(store.done_chunks(version, 0))} chunks "
                              "done", flush=True)  # fmt: skip
                        break
                time.sleep(0.02)
            if proc.poll() is None:
                proc.kill()
                raise RuntimeError(f"refresh attempt {attempt} did not finish in time; see {err}")
        if last:
            if proc.returncode != 0:
                raise RuntimeError(f"resumed refresh failed ({proc.returncode}); see {err}")
            report = json.loads(out.read_text())
    time.sleep(0.3)  # a few reads of the new version
    reader.stop_flag.set()
    reader.join(10)
    version = report["version"]
    entries = store.get_entries(version, users)
    bad_entries = bad_histories = 0
    for u, h in histories.items():
        e = entries[u]
        bad_entries += not (e is not None and e.history_len == len(h) and e.history_tail == h[-HISTORY_TAIL:]
                            and e.model_id != "faults-baseline" and e.prefixes
                            and all((p[0], p[1]) in valid for p in e.prefixes))  # fmt: skip
        bad_histories += store.get_history(u) != h[-s.history_max :]
    live = store.current_version()
    client.close()
    return {
        "refresh_users": len(users), "refresh_kills": kills, "refresh_published_early": early,
        "refresh_resumed_chunks": report.get("resumed_chunks"), "refresh_live_is_new": live == version,
        "refresh_lost_entries": bad_entries, "refresh_lost_histories": bad_histories,
        "version_reads": reader.reads, "partial_version_reads": reader.partial + early,
        "versions_seen": {str(k): v for k, v in reader.seen.items()}, "reader_errors": reader.errors,
    }  # fmt: skip


# --------------------------------------------------------------------------- phase 4: hostile input


def phase_hostile(args: argparse.Namespace, redis_url: str, base: str, users: list[int],
                  items: list[int]) -> dict[str, Any]:  # fmt: skip
    """Hostile HTTP bytes, hostile Redis values under every key the API reads, and write refusals."""
    from benchmarks.hostile import http_cases, redis_value_cases, refusal_check, run_http_fuzz, run_redis_fuzz

    budget_s = args.budget_ms / 1000.0
    t = time.monotonic()
    http = run_http_fuzz(base, http_cases(args.http_fuzz_cases, users, items, seed=0), KEY, budget_s)
    print(f"[faults] http fuzz: {http.cases} cases in {time.monotonic() - t:.1f}s, {http.server_errors} 5xx",
          flush=True)  # fmt: skip
    client = redis.Redis.from_url(redis_url, socket_timeout=10)
    # the fuzzed users are not the healthy one; each case's key is put back before the next case
    cases = redis_value_cases(args.redis_fuzz_cases, users[1:], VERSION, ThinkKeys(NS), seed=0)
    t = time.monotonic()
    targeted, background = run_redis_fuzz(base, client, cases, users[0], items[0], KEY, budget_s)
    print(f"[faults] redis fuzz: {args.redis_fuzz_cases} values in {time.monotonic() - t:.1f}s, "
          f"{targeted.server_errors + background.server_errors} 5xx", flush=True)  # fmt: skip
    # the API caches the live version ONEREC_CURRENT_TTL_S (1 s): the fuzz's last bad pointer must age out first
    time.sleep(1.5)
    # users whose entries are intact (phase 1 corrupted some): their recommends must stay think-ahead
    entries = ThinkStore(client, NS).get_entries(VERSION, users[1:])
    intact = [u for u, e in entries.items() if e is not None][: args.refusal_users]
    refusals = refusal_check(base, client, intact, items[0], KEY, args.refusal_requests, budget_s)
    client.close()
    rec = {m: refusals[m]["recommends"] for m in ("oom", "readonly")}
    n_rec = sum(n for r in rec.values() for n in r.values())
    good = sum(n for r in rec.values() for k, n in r.items() if k == "200 think-ahead degraded=False")
    return {
        "hostile": {"http": http.summary() | {"examples": http.examples}, "redis_targeted": targeted.summary()
                    | {"examples": targeted.examples}, "redis_background": background.summary(),
                    "refusals": refusals},
        "http_fuzz_cases": http.cases, "http_fuzz_5xx": http.server_errors,
        "http_fuzz_transport_errors": http.transport_errors, "http_fuzz_hangs": http.hangs,
        "http_fuzz_bad_bodies": http.bad_bodies, "http_fuzz_slowest_s": round(http.slowest_s, 3),
        "redis_fuzz_cases": args.redis_fuzz_cases, "redis_fuzz_requests": targeted.cases + background.cases,
        "redis_fuzz_5xx": targeted.server_errors + background.server_errors,
        "redis_fuzz_transport_errors": targeted.transport_errors + background.transport_errors,
        "redis_fuzz_hangs": targeted.hangs + background.hangs,
        "redis_fuzz_bad_bodies": targeted.bad_bodies + background.bad_bodies,
        "redis_fuzz_slowest_s": round(max(targeted.slowest_s, background.slowest_s), 3),
        "refusal_recommends": n_rec, "refusal_recommends_think_ahead": good,
        "refusal_breaker_open_samples": sum(refusals[m]["breaker_open_samples"] for m in ("oom", "readonly")),
        "refusal_breaker_fallbacks": refusals["breaker_fallbacks"],
        "refusal_writes_refused": sum(refusals[m]["refusals_counted"] for m in ("oom", "readonly")),
        "refusal_events_pending_after_10s": sum(refusals[m]["pending_after_s"] for m in ("oom", "readonly")),
    }  # fmt: skip


# --------------------------------------------------------------------------- main


def run(args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.fuzz import fuzz
    from services.catalog import load_sequences
    from services.config import get_settings

    s = get_settings()
    checkpoint = s.resolved("onerec").resolve()
    logdir = Path(args.log_dir)
    logdir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    out: dict[str, Any] = {"load_avg_1m_start": round(os.getloadavg()[0], 2)}
    with tempfile.TemporaryDirectory() as d:
        rp = RedisServer(Path(d), aof=True, start_timeout_s=30)
        rp.start()
        try:
            users = seed_redis(rp.url, NS, checkpoint, args.users, args.prefixes, VERSION)
            seqs = load_sequences(Path(s.data_dir) / "sequences.txt")
            others = sorted(set(seqs) - set(users))
            initial = {u: seqs[u][-5:] for u in random.Random(2).sample(others, args.event_users)}
            client = redis.Redis.from_url(rp.url)
            ThinkStore(client, NS).write_histories(initial, args.history_max)
            client.close()
            items = sorted({i for u in users for i in seqs[u]})
            env = {"ONEREC_REDIS_URL": rp.url, "ONEREC_NAMESPACE": NS, "ONEREC_ONEREC_DIR": str(checkpoint),
                   "ONEREC_API_KEY": KEY, "ONEREC_HISTORY_MAX": str(args.history_max), "PYTHONPATH": str(ROOT)}
            port = free_port()
            base = f"http://127.0.0.1:{port}"
            phases = set(args.phases.split(","))
            with process(uvicorn_cmd("online_api.app:create_app", port), env, logdir / "api.log") as api:
                wait_http(f"{base}/readyz", 180, api)
                if "serving" in phases:
                    out |= phase_serving(args, rp, base, users, initial, items, api.pid)
                    print(f"[faults] serving: {json.dumps(out)}", flush=True)
                if "refresh" in phases:
                    out |= phase_refresh(args, rp.url, logdir)
                    print(f"[faults] refresh done: partial reads {out['partial_version_reads']}", flush=True)
                if "fuzz" in phases:
                    rep = fuzz(base, args.fuzz_per_op, api_key=KEY)
                    out |= {"fuzz_cases": rep.cases, "fuzz_server_errors": rep.server_errors,
                            "fuzz_transport_errors": rep.transport_errors, "fuzz_check_failures": rep.failures,
                            "fuzz_failure_kinds": dict(rep.check_failures), "fuzz_examples": rep.examples}  # fmt: skip
                if "hostile" in phases:
                    out |= phase_hostile(args, rp.url, base, users, items)
                    print(f"[faults] hostile: {json.dumps(out['hostile'])[:2000]}", flush=True)
                out["api_alive"] = api.poll() is None
        finally:
            rp.stop()
    out["wall_s"] = round(time.monotonic() - t0, 1)
    out["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
    return out


def metrics_of(out: dict[str, Any]) -> dict[str, Any]:
    keys = """faults_injected requests server_errors lost_writes partial_version_reads fuzz_cases fuzz_server_errors
        recovery_s restarts_not_recovered transport_errors redis_kills redis_freezes refresh_kills corrupt_values
        lost_events duplicate_events events_acked events_replayed refresh_lost_entries refresh_lost_histories
        version_reads fuzz_check_failures degraded_during_redis_down answers_during_redis_down
        p99_ms_during_redis_down degraded_outside_faults answers_outside_faults p50_ms_outside_faults
        p99_ms_outside_faults corrupt_user_answers corrupt_user_5xx corrupt_entries_served
        think_ahead_share_other_users_during_corruption model_kills model_recovery_s_each model_kills_not_recovered
        http_fuzz_cases http_fuzz_5xx http_fuzz_transport_errors http_fuzz_hangs http_fuzz_bad_bodies
        http_fuzz_slowest_s redis_fuzz_cases redis_fuzz_requests redis_fuzz_5xx redis_fuzz_transport_errors
        redis_fuzz_hangs redis_fuzz_bad_bodies redis_fuzz_slowest_s refusal_recommends refusal_recommends_think_ahead
        refusal_breaker_open_samples refusal_breaker_fallbacks refusal_writes_refused refusal_events_pending_after_10s
        wall_s load_avg_1m_start""".split()
    out = dict(out)
    if "redis_kills" in out and "refresh_kills" in out:
        out["faults_injected"] = (out["redis_kills"] + out["redis_freezes"] + out["refresh_kills"]
                                  + out["corrupt_values"] + out["model_kills"])  # fmt: skip
        out["lost_writes"] = out["lost_events"] + out["refresh_lost_entries"] + out["refresh_lost_histories"]
    if "api_counters" in out:
        out["events_replayed"] = int(out["api_counters"].get("onerec_events_replayed", 0))
    return {k: out[k] for k in keys if k in out}  # only the phases that ran


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.faults", description=__doc__.split("\n")[0])
    p.add_argument("--users", type=int, default=300, help="test users with think-ahead entries, requested in turn")
    p.add_argument("--prefixes", type=int, default=16, help="prefixes per seeded think entry")
    p.add_argument("--rate", type=float, default=40.0, help="recommend requests per second (open loop)")
    p.add_argument("--event-rate", type=float, default=4.0, help="event posts per second")
    p.add_argument("--event-users", type=int, default=40, help="users receiving the events (one every 10 s each)")
    p.add_argument("--budget-ms", type=float, default=500.0,
                   help="budget_ms of each request: generous, so degraded answers mean Redis, not a busy CPU")
    p.add_argument("--history-max", type=int, default=50, help="ONEREC_HISTORY_MAX of the API")
    p.add_argument("--warm-s", type=float, default=6.0, help="load before the first fault")
    p.add_argument("--kills", type=int, default=5, help="Redis SIGKILL + restart cycles")
    p.add_argument("--down-s", type=float, default=2.0, help="seconds Redis stays dead each time")
    p.add_argument("--gap-s", type=float, default=8.0, help="seconds between faults")
    p.add_argument("--freeze-s", type=float, default=1.5, help="SIGSTOP Redis this long (0: skip)")
    p.add_argument("--model-kills", type=int, default=2, help="SIGKILLs of the API's model process")
    p.add_argument("--corrupt-users", type=int, default=40, help="users whose Redis values are corrupted")
    p.add_argument("--corrupt-s", type=float, default=15.0, help="load after the corruption")
    p.add_argument("--refresh-users", type=int, default=64, help="users of the killed refresh")
    p.add_argument("--refresh-chunk", type=int, default=8, help="users per refresh chunk")
    p.add_argument("--refresh-kills", type=int, default=2, help="SIGKILLs of the refresh before it may finish")
    p.add_argument("--refresh-throttle-s", type=float, default=0.3, help="pause per chunk of the runs to be killed")
    p.add_argument("--fuzz-per-op", type=int, default=150, help="fuzz cases per operation and mode")
    p.add_argument("--http-fuzz-cases", type=int, default=5000, help="hostile HTTP cases (phase 4)")
    p.add_argument("--redis-fuzz-cases", type=int, default=1000, help="hostile Redis values written (phase 4)")
    p.add_argument("--refusal-requests", type=int, default=100,
                   help="events + recommends per write-refusal mode (OOM, READONLY)")
    p.add_argument("--refusal-users", type=int, default=100, help="users with entries the refusal check requests")
    p.add_argument("--phases", default="serving,refresh,fuzz,hostile",
                   help="comma list of the phases to run: serving, refresh, fuzz, hostile")
    p.add_argument("--log-dir", default="/tmp/faults", help="server and refresh logs, faults_full.json")
    p.add_argument("--quick", action="store_true", help="smoke run: fewer faults and cases, nothing written")
    p.add_argument("--results", action="store_true", help="write docs/results/faults.json")
    args = p.parse_args(argv)
    if args.quick:
        args.users, args.kills, args.gap_s, args.corrupt_s, args.corrupt_users = 100, 1, 4.0, 5.0, 16
        args.model_kills = 1
        args.refresh_users, args.refresh_kills, args.fuzz_per_op = 24, 1, 10
        args.http_fuzz_cases, args.redis_fuzz_cases, args.refusal_requests = 300, 60, 20
    out = run(args)
    Path(args.log_dir, "faults_full.json").write_text(json.dumps(out, indent=2))
    metrics = metrics_of(out)
    print(json.dumps(metrics, indent=2))
    if args.results and not args.quick:
        from services.results import write_result

        note = (f"API: uvicorn 1 worker, real OneRec checkpoint, {args.rate:g} recommend/s + {args.event_rate:g} "
                f"events/s open loop, budget {args.budget_ms:g} ms; Redis AOF appendfsync always; refresh: HF engine, "
                f"real think model, {args.refresh_users} users; recovery_s: restarted Redis answers PING -> first "
                f"think-ahead, non-degraded answer; model_recovery_s: model process SIGKILLed -> the same; "
                f"details: faults_full.json in the run's --log-dir (a scratch folder, not kept)")  # fmt: skip
        phases = args.phases.split(",")
        if set(phases) != {"serving", "refresh", "fuzz", "hostile"}:
            # a partial run updates its own keys in faults.json; the others keep the run that measured them
            old = json.loads((ROOT / "docs" / "results" / "faults.json").read_text())
            metrics = old["metrics"] | metrics
            note = (f"this run ({'+'.join(phases)} phases only) updated: {', '.join(metrics_of(out))}; the other "
                    f"metrics are from `{old['command']}` on {old['date']}: {old.get('note', '')}")
        write_result("faults", metrics, note=note)


if __name__ == "__main__":
    main()
