"""Open-loop load test of the online API, with the stack's floor and the full model as baselines.

One run (about 5 minutes with the defaults) measures on this machine:
1. the API (uvicorn, 1 worker, uvloop/httptools) over a private redis-server seeded with the test users'
   fresh histories and think-ahead entries computed from histories one interaction *staler*;
   100 requests/s for 60 s, then a short sweep of higher rates for the largest one with p99 within the
   request budget (``--p99-limit-ms``, default ``ONEREC_DEFAULT_BUDGET_MS``);
2. the floor: a trivial FastAPI endpoint doing one Redis GET of the same entry, same server settings, at the
   main step's rate (its CPU per answer) and over its own sweep;
3. the full OneRec-Think model answering one request at a time the way a user would otherwise serve it:
   reasoning then trie-constrained codes (vLLM engine of the offline worker, compiled: its fastest setting on
   CPU; ``--full-eager`` for eager mode, ``--full-engine hf`` for the transformers reference, ``none`` to skip).

The load generator is a separate process (aiohttp, not httpx-bound) that sends request i at
``t0 + i / rate`` whatever happened before (open loop) and times each answer from that *scheduled* send
time, so a stalled server shows up as latency instead of as fewer requests (coordinated omission).
CPU per answer (``cpu_ms_per_answer``) is the server process's plus its model process's CPU seconds over the
answers of the main step (/proc, Linux), and ``cpu_ratio_to_floor`` divides it by the floor's at the same rate
in the same run: on a shared machine these hold up where latency does not.
Results: ``docs/results/online_load.json`` (`services.results`). Not a test; never run by CI.

    python -m benchmarks.online_load --results            # full run
    python -m benchmarks.online_load --quick              # a 20-second smoke run, nothing written
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from services.harness import PY, ROOT, free_port, percentile, process, redis_server, uvicorn_cmd, wait_http

REASONING = ("The user has been buying moisturisers, a vitamin C serum and sunscreen lately; they care about "
             "skincare routines and gentle formulas, so the next purchase is likely another skincare step such "
             "as a cleanser, toner or a night cream from a similar brand. ")  # ~300 chars, like real entries


# --------------------------------------------------------------------------- small utilities


def cpu_probe_ms() -> float:
    """Median time of a fixed pure-Python loop: how fast this (shared, virtual) CPU is right now. The load
    average misses a slow host: the same code measured 2-3x apart with an idle load average."""
    times = []
    for _ in range(3):
        t = time.perf_counter()
        total = 0
        for i in range(1_000_000):
            total += i
        times.append(time.perf_counter() - t)
    return round(statistics.median(times) * 1000, 1)


# --------------------------------------------------------------------------- the floor endpoint


class FloorRequest(BaseModel):
    user_id: int
    k: int = 10


class FloorResponse(BaseModel):
    user_id: int
    found: bool
    bytes: int


def floor_app() -> Any:
    """Trivial FastAPI + Redis endpoint: validate a body, one GET, answer JSON (uvicorn --factory)."""
    from fastapi import FastAPI

    from online_api.app import open_redis, warm_redis
    from services.config import get_settings
    from services.store import ThinkKeys

    s = get_settings()
    keys = ThinkKeys(s.namespace)
    r = open_redis(s)  # the API's own pool settings, warmed like the API's

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await warm_redis(r, s.redis_url, s.redis_max_connections, max(s.redis_timeout_ms / 1000.0, 1.0))
        yield
        await r.aclose()

    app = FastAPI(lifespan=lifespan)
    version = os.environ.get("FLOOR_VERSION", "bench")

    @app.get("/readyz")
    async def ready() -> dict[str, bool]:
        return {"ready": bool(await r.ping())}

    @app.post("/v1/recommend", response_model=FloorResponse)
    async def floor(req: FloorRequest) -> FloorResponse:
        raw = await r.get(keys.think(version, req.user_id))
        return FloorResponse(user_id=req.user_id, found=raw is not None, bytes=len(raw or b""))

    return app


# --------------------------------------------------------------------------- load generator (own process)


async def _load(url: str, rate: float, duration_s: float, users: list[int], k: int, timeout_s: float) -> dict:
    import aiohttp

    n = int(rate * duration_s)
    bodies = [json.dumps({"user_id": users[i % len(users)], "k": k}).encode() for i in range(n)]
    lat: list[float] = []
    errors: Counter[str] = Counter()
    sources: Counter[str] = Counter()
    degraded = 0
    done_at: list[float] = []
    # idle connections are dropped by the client before uvicorn's keep-alive timeout closes them, so a
    # request never races a server-side close (ServerDisconnectedError)
    conn = aiohttp.TCPConnector(limit=512, ttl_dns_cache=300, keepalive_timeout=2.0)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    headers = {"content-type": "application/json"}
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as session:
        # warm the connection pool (not timed)
        await asyncio.gather(*(session.post(url, data=bodies[0], headers=headers) for _ in range(8)),
                             return_exceptions=True)

        async def one(i: int, scheduled: float) -> None:
            nonlocal degraded
            try:
                async with session.post(url, data=bodies[i], headers=headers) as resp:
                    data = await resp.read()
                    if resp.status != 200:
                        errors[f"http_{resp.status}"] += 1
                        return
            except Exception as e:  # noqa: BLE001 - counted, never fatal
                errors[type(e).__name__] += 1
                return
            now = time.perf_counter()
            lat.append(now - scheduled)
            done_at.append(now)
            body = json.loads(data)
            sources[body.get("source", "floor")] += 1
            degraded += bool(body.get("degraded"))

        tasks = []
        t0 = time.perf_counter() + 0.05
        for i in range(n):
            scheduled = t0 + i / rate
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i, scheduled)))
        send_end = time.perf_counter()
        await asyncio.gather(*tasks)
    ok = len(lat)
    span = (max(done_at) - t0) if done_at else float("nan")
    return {
        "offered_rps": rate, "duration_s": duration_s, "requests": n, "ok": ok,
        "errors": sum(errors.values()), "error_kinds": dict(errors),
        "achieved_rps": round(ok / span, 1) if ok else 0.0,
        "send_lag_ms": round((send_end - (t0 + (n - 1) / rate)) * 1000, 2),  # did the generator keep up?
        "p50_ms": round(percentile(lat, 50) * 1000, 3), "p90_ms": round(percentile(lat, 90) * 1000, 3),
        "p99_ms": round(percentile(lat, 99) * 1000, 3), "max_ms": round(max(lat) * 1000, 3) if lat else None,
        "mean_ms": round(statistics.fmean(lat) * 1000, 3) if lat else None,
        "sources": dict(sources), "degraded": degraded,
    }  # fmt: skip


def run_client(url: str, rate: float, duration_s: float, users: list[int], k: int, timeout_s: float = 5.0) -> dict:
    """Run one load step in a separate process (its own event loop and core time)."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(users, f)
        users_file = f.name
    try:
        cmd = [PY, "-m", "benchmarks.online_load", "client", "--url", url, "--rate", str(rate),
               "--duration", str(duration_s), "--users-file", users_file, "--k", str(k), "--timeout", str(timeout_s)]
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=duration_s * 3 + 60)
        if out.returncode != 0:
            raise RuntimeError(f"load client failed: {out.stderr[-2000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        os.unlink(users_file)


def fallback_counts(metrics_url: str) -> dict[str, float]:
    """The API's ``onerec_fallback_total`` counters by reason (Prometheus text format)."""
    import urllib.request

    with urllib.request.urlopen(metrics_url, timeout=10) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("onerec_fallback_total{"):
            labels, value = line.rsplit(" ", 1)
            out[labels.split('reason="', 1)[1].split('"', 1)[0]] = float(value)
    return out


def _proc_stat(pid: int | str) -> tuple[int, float]:
    """(parent pid, user + system CPU seconds) of a process, from /proc/<pid>/stat (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def child_pids(pid: int) -> list[int]:
    """Live direct children of process `pid` (Linux /proc; [] elsewhere)."""
    out = []
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else []:
        if entry.name.isdigit() and entry.name != str(pid):
            try:
                if _proc_stat(entry.name)[0] == pid:
                    out.append(int(entry.name))
            except (OSError, IndexError, ValueError):  # exited meanwhile, or not a process
                continue
    return out


def cpu_split(pid: int) -> tuple[float, float] | None:
    """(CPU seconds of process `pid`, CPU seconds of its live children, e.g. the API's model process), user +
    system (Linux /proc; None elsewhere)."""
    try:
        own = _proc_stat(pid)[1]
    except OSError:
        return None
    children = 0.0
    for child in child_pids(pid):
        try:
            children += _proc_stat(child)[1]
        except (OSError, IndexError, ValueError):
            continue
    return own, children


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of process `pid` and its live children (Linux /proc; None elsewhere)."""
    split = cpu_split(pid)
    return None if split is None else split[0] + split[1]


def client_step(url: str, rate: float, duration_s: float, users: list[int], k: int,
                metrics_url: str | None = None, pid: int | None = None) -> dict:
    """`run_client`, plus why answers fell back during the step (delta of the API's counters) and the
    server's CPU milliseconds per answered request, when given: `server_cpu_ms_per_request` (server process
    + its model process), split into `api_cpu_ms_per_request` and `model_cpu_ms_per_request`."""
    before = fallback_counts(metrics_url) if metrics_url else {}
    cpu0 = cpu_split(pid) if pid else None
    res = run_client(url, rate, duration_s, users, k)
    cpu1 = cpu_split(pid) if pid else None
    if metrics_url:
        after = fallback_counts(metrics_url)
        res["fallback_reasons"] = {r: int(v - before.get(r, 0)) for r, v in after.items() if v > before.get(r, 0)}
    if cpu0 is not None and cpu1 is not None and res["ok"]:
        api, model = (cpu1[0] - cpu0[0]) * 1000 / res["ok"], (cpu1[1] - cpu0[1]) * 1000 / res["ok"]
        res["server_cpu_ms_per_request"] = round(api + model, 3)
        res["api_cpu_ms_per_request"], res["model_cpu_ms_per_request"] = round(api, 3), round(model, 3)
    return res


def sweep(url: str, rates: Sequence[float], duration_s: float, users: list[int], k: int, limit_ms: float,
          label: str, metrics_url: str | None = None, pid: int | None = None) -> tuple[float, list[dict]]:
    """Increasing rates until p99 > limit_ms, errors, achieved < 95% of offered or > 1% degraded answers.
    Returns (best passing rate, steps)."""
    best, steps = 0.0, []
    for rate in rates:
        load = round(os.getloadavg()[0], 2)  # other jobs on a shared machine: recorded per step
        res = client_step(url, rate, duration_s, users, k, metrics_url, pid)
        res["load_avg_1m"] = load
        steps.append(res)
        # a rate only counts if answers stay real: <= 1% degraded (fallback) answers
        good = (res["errors"] == 0 and res["p99_ms"] <= limit_ms and res["achieved_rps"] >= 0.95 * rate
                and res["degraded"] <= 0.01 * max(1, res["ok"]))
        print(f"[{label}] {rate:>6.0f}/s: achieved {res['achieved_rps']}/s p50 {res['p50_ms']} p99 {res['p99_ms']} "
              f"ms errors {res['errors']} sources {res['sources']} reasons {res.get('fallback_reasons', {})} "
              f"server cpu {res.get('server_cpu_ms_per_request')} ms/req load {load} {'ok' if good else 'FAIL'}",
              flush=True)
        if not good:
            break
        best = rate
    return best, steps


# --------------------------------------------------------------------------- data set-up


def bench_examples(n_users: int) -> list[Any]:
    """The benchmark's users: the first `n_users` test examples in a fixed shuffled order."""
    from services.catalog import load_dataset
    from services.config import get_settings

    examples = load_dataset(get_settings().data_dir).splits.test
    random.Random(0).shuffle(examples)
    return examples[:n_users]


def seed_redis(redis_url: str, ns: str, checkpoint: Path, n_users: int, prefixes: int, version: str,
               entries: str = "onerec-beam", think_dir: Path | None = None, items: int = 0) -> list[int]:
    """Fresh histories (test split) and entries from one-interaction-staler histories; returns the users.

    `entries` ``think``: a real offline refresh by the OneRec-Think checkpoint (`think_dir`, vLLM, the served
    offline settings) over the staler histories, as in deployment; ``onerec-beam``: the lightweight model's
    own beam with a fixed reasoning text (cheap; the reliability benchmarks use it), and with `items` > 0 that
    many catalogue items per entry with descending log-probs (random per user: a stand-in for the think head's
    items whose cost, not quality, is measured)."""
    from services.store import ThinkStore
    from services.store.connect import connect

    examples = bench_examples(n_users)
    t0 = time.perf_counter()
    if entries == "think":
        _refresh_entries(redis_url, ns, think_dir, [e.user_id for e in examples], version)
        model = "think refresh"
    else:
        model = "bench-onerec-beam"
        by_user = _onerec_beam_entries(checkpoint, examples, prefixes, items)
        store = ThinkStore(connect(redis_url), ns)
        store.begin_version(version, {"model": model})
        store.write_entries(version, by_user, 3600)
        store.publish(version, len(by_user))
    print(f"[seed] {len(examples)} entries ({model}) in {time.perf_counter() - t0:.1f}s", flush=True)
    client = connect(redis_url)
    # the online tier reads the fresh history (the refresh wrote the staler one)
    ThinkStore(client, ns).write_histories({e.user_id: e.history for e in examples}, 50)
    client.close()
    return [e.user_id for e in examples]


def _onerec_beam_entries(checkpoint: Path, examples: list[Any], prefixes: int, items: int = 0) -> dict[int, Any]:
    import numpy as np

    from evaluation.think_ahead import OneRecPrefixSource
    from model.onerec import OneRec

    onerec = OneRec.load(checkpoint)
    source = OneRecPrefixSource(onerec, prefixes=prefixes, beam=max(64, prefixes * 2))
    catalogue = np.asarray(onerec.sid.item_ids)
    out = {}
    for s in range(0, len(examples), 256):
        batch = examples[s : s + 256]
        for e, en in zip(batch, source(batch), strict=True):
            assert en is not None
            en.reasoning = REASONING
            en.model_id = "bench-onerec-beam"
            if items > 0:
                picked = np.random.default_rng(e.user_id).choice(catalogue, min(items, len(catalogue)), replace=False)
                en.items = [(int(i), -1.0 - 0.05 * r) for r, i in enumerate(picked)]
            out[e.user_id] = en
    return out


def _refresh_entries(redis_url: str, ns: str, think_dir: Path | None, users: list[int], version: str) -> None:
    """`python -m offline_worker refresh` of `users` over their staler histories (test target and the last
    history item held out), published as `version`. A version holds every user of its dataset, so the
    refresh reads a dataset folder of just these users."""
    from services.catalog import load_sequences
    from services.config import get_settings

    data_dir = get_settings().data_dir
    sequences = load_sequences(data_dir / "sequences.txt")
    with tempfile.TemporaryDirectory(prefix="bench-users-") as d:
        (Path(d) / "sequences.txt").write_text("".join(f"{u} {' '.join(map(str, sequences[u]))}\n" for u in users))
        (Path(d) / "items.tsv").symlink_to((data_dir / "items.tsv").resolve())
        cmd = [PY, "-m", "offline_worker", "--redis-url", redis_url, "--namespace", ns, "refresh", "--engine", "vllm",
               "--data", d, "--holdout", "2", "--version", version, "--no-progress"]
        if think_dir is not None:
            cmd += ["--model", str(think_dir)]
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
        subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)


# --------------------------------------------------------------------------- the full-model baseline


def full_model_latency(think_dir: Path, sid_dir: Path, engine_kind: str, histories: list[list[int]],
                       max_reasoning_tokens: int, eager: bool = False) -> dict:
    """Per-request latency of OneRec-Think answering alone: reasoning, then the codes (beam over a, b by the
    engine's prefix beam, then the best c and d under the best prefix), one request at a time.

    vLLM runs as fast as it can here (compiled, the offline throughput benchmark's setting: about a minute
    more start-up, not timed), unless `eager`: the baseline is how a user would best serve the full model."""
    import torch

    from model.semantic_ids import SemanticIDs
    from offline_worker.engine_factory import make_engine
    from offline_worker.engine_interface import EngineConfig, ThinkRequest
    from offline_worker.prompts import PromptBuilder
    from offline_worker.vllm_engine import VLLMOptions, cpu_defaults
    from services.config import get_settings

    s = get_settings()
    if not torch.cuda.is_available():
        cpu_defaults(eager=eager)
    options = VLLMOptions.from_settings(s, enforce_eager=eager)
    # the served offline decoding (beam over level a included), one greedy path, the top 10 prefixes
    cfg = EngineConfig.from_settings(s, samples=1, prefixes_per_sample=10, max_reasoning_tokens=max_reasoning_tokens,
                                     greedy=True)
    t0 = time.perf_counter()
    engine = make_engine(engine_kind, think_dir, sid_dir, cfg, vllm_options=options)
    load_s = time.perf_counter() - t0
    builder = PromptBuilder(engine.tokenizer, SemanticIDs.load(sid_dir))
    tm = engine.tokmap
    lat = []
    try:
        for i, hist in enumerate([histories[0], *histories]):  # the first one warms up (not timed)
            t = time.perf_counter()
            ids = builder.ids(hist)
            res = engine.think([ThinkRequest(i, ids)])[0]
            a, b, _ = res.prefixes[0]
            ctx = ids + res.reasoning_ids[0] + engine.answer_ids + [tm.token_id(0, a), tm.token_id(1, b)]
            codes = [a, b]
            for _level in range(2, tm.num_levels):
                best = engine._top_next([ctx], [engine.allowed_ids(codes)], 1)[0][0][0]
                codes.append(tm.level_code(best)[1])
                ctx = ctx + [best]
            if i > 0:
                lat.append(time.perf_counter() - t)
    finally:
        engine.close()
    return {"engine": engine_kind, "compiled": engine_kind == "vllm" and not eager, "requests": len(lat),
            "load_s": round(load_s, 1),
            "p50_ms": round(percentile(lat, 50) * 1000, 1), "p90_ms": round(percentile(lat, 90) * 1000, 1),
            "mean_ms": round(statistics.fmean(lat) * 1000, 1)}


# --------------------------------------------------------------------------- main


def run(args: argparse.Namespace) -> dict:
    from services.config import get_settings

    settings = get_settings()
    checkpoint = (args.checkpoint or settings.resolved("onerec")).resolve()
    if not (checkpoint / "model.safetensors").is_file():
        raise SystemExit(f"no OneRec checkpoint at {checkpoint} (train it: python -m model.onerec train)")
    logdir = Path(args.log_dir)
    logdir.mkdir(parents=True, exist_ok=True)
    ns, version = "bench", "bench"
    # other jobs on a shared machine change every number: record how busy it was
    out: dict[str, Any] = {"checkpoint": str(checkpoint), "load_avg_1m_start": round(os.getloadavg()[0], 2),
                           "cpu_probe_ms_start": cpu_probe_ms(), "p99_limit_ms": args.p99_limit_ms}
    with redis_server() as server:
        redis_url = server.url
        users = seed_redis(redis_url, ns, checkpoint, args.users, args.prefixes, version, args.entries, args.think_dir)
        out["entries"] = args.entries
        env = {"ONEREC_REDIS_URL": redis_url, "ONEREC_NAMESPACE": ns, "ONEREC_ONEREC_DIR": str(checkpoint),
               "FLOOR_VERSION": version, "PYTHONPATH": str(ROOT)}
        port = free_port()
        with process(uvicorn_cmd("online_api.app:create_app", port), env, logdir / "api.log") as api:
            wait_http(f"http://127.0.0.1:{port}/readyz", 120, api)
            url, metrics_url = f"http://127.0.0.1:{port}/v1/recommend", f"http://127.0.0.1:{port}/metrics"
            run_client(url, 50, 3, users, args.k)  # warm-up (not reported)
            main = client_step(url, args.rate, args.duration, users, args.k, metrics_url, api.pid)
            print(f"[api] {args.rate}/s for {args.duration}s: {json.dumps(main)}", flush=True)
            out["api_main"] = main
            best, steps = sweep(url, args.sweep, args.sweep_duration, users, args.k, args.p99_limit_ms, "api",
                                metrics_url, api.pid)
            out["api_max_rps"], out["api_sweep"] = best, steps
        port = free_port()
        with process(uvicorn_cmd("benchmarks.online_load:floor_app", port), env, logdir / "floor.log") as floor:
            wait_http(f"http://127.0.0.1:{port}/readyz", 60, floor)
            url = f"http://127.0.0.1:{port}/v1/recommend"
            run_client(url, 50, 2, users, args.k)
            # the floor's CPU per answer at the main step's rate (same run): the denominator of the CPU ratio
            out["floor_main"] = client_step(url, args.rate, min(args.duration, 20.0), users, args.k, pid=floor.pid)
            print(f"[floor] {args.rate}/s: {json.dumps(out['floor_main'])}", flush=True)
            best, steps = sweep(url, args.floor_sweep, args.sweep_duration, users, args.k, args.p99_limit_ms, "floor",
                                pid=floor.pid)
            out["floor_max_rps"], out["floor_sweep"] = best, steps
    out["load_avg_1m_end"], out["cpu_probe_ms_end"] = round(os.getloadavg()[0], 2), cpu_probe_ms()
    if args.full_engine != "none":
        out["full_model"] = full_model_step(args, checkpoint)
    return out


def full_model_step(args: argparse.Namespace, checkpoint: Path) -> dict:
    """The full-model baseline on the benchmark's first `--full-requests` users (their test histories)."""
    from services.config import get_settings

    think_dir = (args.think_dir or get_settings().resolved("think")).resolve()
    sid_dir = think_dir / "sid" if (think_dir / "sid" / "codes.tsv").is_file() else checkpoint / "sid"
    hists = [e.history for e in bench_examples(args.full_requests)]
    res = full_model_latency(think_dir, sid_dir, args.full_engine, hists, args.max_reasoning_tokens,
                             eager=args.full_eager)  # fmt: skip
    print(f"[full] {json.dumps(res)}", flush=True)
    return res


def metrics_of(out: dict) -> dict[str, Any]:
    main = out["api_main"]
    total = sum(main["sources"].values()) or 1
    m: dict[str, Any] = {
        "p50_ms": main["p50_ms"], "p90_ms": main["p90_ms"], "p99_ms": main["p99_ms"], "errors": main["errors"],
        "think_ahead_share": round(main["sources"].get("think-ahead", 0) / total, 4),
        "offered_rps": main["offered_rps"], "achieved_rps": main["achieved_rps"],
        "p99_limit_ms": out["p99_limit_ms"],
        "max_rps_p99_under_limit": out["api_max_rps"], "floor_max_rps": out["floor_max_rps"],
        "ratio_to_floor": round(out["api_max_rps"] / out["floor_max_rps"], 3) if out["floor_max_rps"] else None,
        # CPU of one answer: server process + model process CPU seconds / answers of the main step
        "cpu_ms_per_answer": main.get("server_cpu_ms_per_request"),
        "api_cpu_ms_per_answer": main.get("api_cpu_ms_per_request"),
        "model_cpu_ms_per_answer": main.get("model_cpu_ms_per_request"),
        "floor_cpu_ms_per_answer": out["floor_main"].get("server_cpu_ms_per_request"),
        "load_avg_1m_start": out["load_avg_1m_start"], "load_avg_1m_end": out["load_avg_1m_end"],
        "cpu_probe_ms_start": out["cpu_probe_ms_start"], "cpu_probe_ms_end": out["cpu_probe_ms_end"],
    }  # fmt: skip
    if m["cpu_ms_per_answer"] and m["floor_cpu_ms_per_answer"]:
        m["cpu_ratio_to_floor"] = round(m["cpu_ms_per_answer"] / m["floor_cpu_ms_per_answer"], 2)
    if "full_model" in out:
        m["full_model_p50_ms"] = out["full_model"]["p50_ms"]
        m["speedup_p50"] = round(out["full_model"]["p50_ms"] / main["p50_ms"], 1)
    return m


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.online_load", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd")
    c = sub.add_parser("client", help="(internal) one open-loop load step; prints a JSON line")
    c.add_argument("--url", required=True)
    c.add_argument("--rate", type=float, required=True)
    c.add_argument("--duration", type=float, required=True)
    c.add_argument("--users-file", required=True)
    c.add_argument("--k", type=int, default=10)
    c.add_argument("--timeout", type=float, default=5.0)
    p.add_argument("--checkpoint", type=Path, default=None, help="OneRec folder (default: artifacts/onerec/current)")
    p.add_argument("--think-dir", type=Path, default=None, help="OneRec-Think HF folder (default: think/current)")
    p.add_argument("--entries", choices=["think", "onerec-beam"], default="think",
                   help="think: seed Redis by a real refresh with the think checkpoint (as deployed); onerec-beam: "
                        "the lightweight model's own beam with a fixed reasoning text (cheaper)")
    p.add_argument("--users", type=int, default=2000, help="test users seeded into Redis and requested in turn")
    p.add_argument("--prefixes", type=int, default=32, help="prefixes per think entry (T x m of the offline tier)")
    p.add_argument("--k", type=int, default=10, help="items per request")
    p.add_argument("--rate", type=float, default=100.0, help="offered rate of the main step (requests/s)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of the main step")
    # both sweeps stop at the first failing rate, so they start low enough to pass on a busy 2-core machine
    p.add_argument("--sweep", type=lambda s: [float(x) for x in s.split(",")],
                   default=[100, 150, 200, 250, 300, 350, 400, 500, 600, 800],
                   help="API rates for the max-rate sweep (comma-separated, increasing)")
    p.add_argument("--floor-sweep", type=lambda s: [float(x) for x in s.split(",")],
                   default=[100, 200, 300, 400, 500, 600, 800, 1000, 1200, 1500, 2000],
                   help="floor rates (comma-separated, increasing)")
    p.add_argument("--sweep-duration", type=float, default=15.0, help="seconds per sweep step")
    p.add_argument("--p99-limit-ms", type=float, default=None,
                   help="a sweep rate passes with p99 at most this (default: the API's ONEREC_DEFAULT_BUDGET_MS)")
    p.add_argument("--full-engine", choices=["vllm", "hf", "none"], default="vllm", help="full-model baseline engine")
    p.add_argument("--full-requests", type=int, default=20, help="requests answered by the full model")
    p.add_argument("--full-eager", action="store_true",
                   help="full-model baseline in vLLM eager mode (default: compiled, its fastest on CPU)")
    p.add_argument("--max-reasoning-tokens", type=int, default=48, help="reasoning budget of the full model")
    p.add_argument("--log-dir", default="/tmp/online_load", help="server logs")
    p.add_argument("--quick", action="store_true", help="smoke run: short steps, no full model, nothing written")
    p.add_argument("--full-only", action="store_true",
                   help="only the full-model baseline (e.g. compiled vs --full-eager); prints it, writes nothing")
    p.add_argument("--results", action="store_true", help="write docs/results/online_load.json")
    args = p.parse_args(argv)
    if args.cmd == "client":
        users = json.loads(Path(args.users_file).read_text())
        res = asyncio.run(_load(args.url, args.rate, args.duration, users, args.k, args.timeout))
        print(json.dumps(res))
        return
    if args.full_only:
        from services.config import get_settings

        full_model_step(args, (args.checkpoint or get_settings().resolved("onerec")).resolve())
        return
    if args.p99_limit_ms is None:
        from services.config import get_settings

        args.p99_limit_ms = get_settings().default_budget_ms
    if args.quick:
        args.duration, args.sweep, args.floor_sweep, args.sweep_duration = 5.0, [200.0], [300.0], 3.0
        args.users, args.full_engine = 300, "none"
    out = run(args)
    metrics = metrics_of(out)
    print(json.dumps(metrics, indent=2))
    Path(args.log_dir, "online_load_full.json").write_text(json.dumps(out, indent=2))
    if args.results and not args.quick:
        from services.results import write_result

        entries = ("a real offline refresh (vLLM) over the staler histories" if args.entries == "think" else
                   f"{args.prefixes} prefixes from the OneRec beam over the staler history")
        mode = " (eager)" if args.full_eager else " (compiled)" if args.full_engine == "vllm" else ""
        full = ("none" if args.full_engine == "none" else f"{args.full_engine} engine{mode}, "
                f"{args.max_reasoning_tokens} reasoning tokens, one request at a time")
        note = (f"API: uvicorn 1 worker; entries: {entries}; full model: {full}; sweep limit p99 <= "
                f"{args.p99_limit_ms:g} ms; every step's details: online_load_full.json in the run's --log-dir")
        write_result("online_load", metrics, note=note)


if __name__ == "__main__":
    main()
