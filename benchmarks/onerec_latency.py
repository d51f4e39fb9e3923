"""Model-only latency of the lightweight OneRec on this machine.

Measures, for one user with a 50-item history: completion under 32 allowed (a, b) prefixes and full
decode, p50/p99 over >= 1000 calls each; plus users/s of full decode at batch 16. Beam, own prefixes
and prefix weight default to the API's settings (`services.config`), so the numbers are the served ones.
Baseline in the same run: the trunk forward alone (the floor any decode pays), and for the served one-user
engine (fused, `model.onerec.fused_user`) the numpy engine (`model.onerec.one_user`, before it) and the batched
torch path on the same calls. Also the CPU time of one
completion (thread CPU, steadier than wall time on a shared machine) and, with ``--process``, of the same
calls through the API's model process (`online_api.model_process.ProcessModel`: the child's CPU from /proc
and the calling thread's), whose difference to the in-process CPU is the hand-off's cost; ``--profile N``
prints the top N frames of the completion (cProfile, thread CPU). ``--paced-ms G`` (default 10) also times the
completions G ms apart, as one process sees them at 100 req/s: on this project's virtual machines a call then
costs about twice its back-to-back CPU (caches and branch predictors go cold between calls), and that, not the
back-to-back number, is what an answer costs at a moderate rate. Writes docs/results/onerec_latency.json.

    python -m benchmarks.onerec_latency --calls 1000
    python -m benchmarks.onerec_latency --calls 400 --process --profile 25 --no-results
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from model.onerec import OneRec
from model.onerec.numpy_net import one_blas_thread
from model.onerec.serving import ModuleNet
from model.policy import PolicyConfig
from services.catalog import load_dataset
from services.config import get_settings
from services.harness import percentile
from services.results import write_result


def percentiles(xs: list[float]) -> dict[str, float]:
    """p50, p99 and mean in ms of timings in seconds (percentiles by `services.harness.percentile`)."""
    ms = [x * 1000 for x in xs]
    return {"p50": percentile(ms, 50), "p99": percentile(ms, 99), "mean": statistics.fmean(ms)}


def main(argv: list[str] | None = None) -> None:
    st = get_settings()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", type=Path, default=st.resolved("onerec"), help="OneRec checkpoint")
    p.add_argument("--calls", type=int, default=1000, help="timed calls per measurement")
    p.add_argument("--prefixes", type=int, default=32, help="allowed (a, b) prefixes per user")
    p.add_argument("--beam", type=int, default=st.beam, help="beam width (default: the API's)")
    p.add_argument("--own-prefixes", type=int, default=st.own_prefixes, help="own prefixes (default: the API's)")
    p.add_argument("--prefix-weight", type=float, default=st.prefix_weight, help="offline prefix weight")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the online tier uses 1)")
    p.add_argument("--process", action="store_true", help="also the CPU of the calls through the API's model process")
    p.add_argument("--paced-ms", type=float, default=10.0, metavar="MS",
                   help="also the CPU of completions MS apart (10 = one process at 100 req/s; 0 = skip)")
    p.add_argument("--profile", type=int, default=0, metavar="N", help="print the top N frames of the completion")
    p.add_argument("--no-results", action="store_true", help="do not write the results file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    one_blas_thread()  # as the API's model process runs numpy
    onerec = OneRec.load(args.checkpoint)
    ds = load_dataset(st.data_dir)
    rng = random.Random(0)
    pool = list(ds.sequences.values())
    items = [int(i) for i in onerec.sid.item_ids]
    prefixes2 = sorted({(int(c[0]), int(c[1])) for c in onerec.sid.codes.tolist()})

    def user() -> tuple[list[int], list[tuple[int, int, float]]]:
        seq = rng.choice(pool)
        hist = (seq + rng.sample(items, 50))[-50:]  # always 50 items, real ones first
        pre = [(a, b, -rng.random() * 5) for a, b in rng.sample(prefixes2, args.prefixes)]
        return hist, pre

    cases = [user() for _ in range(args.calls)]
    # the served policy, with the flags on top
    policy = PolicyConfig.from_settings(st, beam=args.beam, prefix_weight=args.prefix_weight,
                                        own_prefixes=args.own_prefixes)
    for h, pre in cases[:20]:  # warm-up
        onerec.complete([h], [pre], k=10, policy=policy)
        onerec.decode_full([h], k=10, beam=args.beam)

    def timed(fn) -> list[float]:
        out = []
        for h, pre in cases:
            t = time.perf_counter()
            fn(h, pre)
            out.append(time.perf_counter() - t)
        return out

    with torch.no_grad():
        trunk = timed(lambda h, pre: onerec._last_hidden([h]))
    complete = timed(lambda h, pre: onerec.complete([h], [pre], k=10, policy=policy))
    onerec.numpy_one_user = False  # baseline in the same run: the batched torch path for the same one-user calls
    complete_torch = timed(lambda h, pre: onerec.complete([h], [pre], k=10, policy=policy))
    onerec.numpy_one_user, onerec.fused_one_user = True, False  # and the numpy engine
    complete_numpy = timed(lambda h, pre: onerec.complete([h], [pre], k=10, policy=policy))
    onerec.fused_one_user = True
    full = timed(lambda h, pre: onerec.decode_full([h], k=10, beam=args.beam))
    # baseline in the same run: the same calls through the nn.Modules instead of the serving copy
    frozen, onerec.net = onerec.net, ModuleNet(onerec.model)
    complete_modules = timed(lambda h, pre: onerec.complete([h], [pre], k=10, policy=policy))
    onerec.net = frozen
    batches = [cases[s : s + 16] for s in range(0, min(len(cases), 640), 16)]
    t0 = time.perf_counter()
    for b in batches:
        onerec.decode_full([h for h, _ in b], k=10, beam=args.beam)
    batch_rate = sum(len(b) for b in batches) / (time.perf_counter() - t0)
    c, f, tr = percentiles(complete), percentiles(full), percentiles(trunk)
    cm, ct, cn = percentiles(complete_modules), percentiles(complete_torch), percentiles(complete_numpy)
    def one(h: list[int], pre: list[tuple[int, int, float]]) -> object:
        return onerec.complete([h], [pre], k=10, policy=policy, exclude=[set(h)])

    cpu = engines_cpu(onerec, one, cases, args.paced_ms)
    if args.process:
        cpu |= process_cpu(args.checkpoint, st, policy, cases, cpu["complete_cpu_ms"])
    if args.profile:
        profile(one, cases, args.profile)
    metrics = {
        "complete_p50_ms": round(c["p50"], 3), "complete_p99_ms": round(c["p99"], 3),
        "full_p50_ms": round(f["p50"], 3), "full_p99_ms": round(f["p99"], 3),
        "batch16_users_per_s": round(batch_rate, 1),
        "trunk_p50_ms": round(tr["p50"], 3),
        "complete_over_trunk_p50": round(c["p50"] / tr["p50"], 2),
        "complete_modules_p50_ms": round(cm["p50"], 3), "serving_copy_speedup_p50": round(cm["p50"] / ct["p50"], 2),
        "complete_torch_p50_ms": round(ct["p50"], 3), "complete_numpy_p50_ms": round(cn["p50"], 3),
        "served_speedup_p50": round(ct["p50"] / c["p50"], 2), "fused_over_numpy_p50": round(c["p50"] / cn["p50"], 2),
        "calls": args.calls, "prefixes": args.prefixes, "beam": args.beam, "threads": args.threads,
        "own_prefixes": args.own_prefixes, "prefix_weight": args.prefix_weight, **cpu,
    }
    print(metrics, f"(mean complete {statistics.mean(complete) * 1000:.2f} ms)")
    if not args.no_results:
        write_result("onerec_latency", metrics, note=f"checkpoint={args.checkpoint.resolve().name}")


Case = tuple[list[int], list[tuple[int, int, float]]]


def cpu_ms(fn: Callable[[list[int], list[tuple[int, int, float]]], object], cases: list[Case],
           gap_s: float = 0.0) -> float:
    """Mean thread CPU milliseconds of `fn` over `cases` (after 20 untimed calls), back to back or with
    `gap_s` of sleep after each call (sleep is not thread CPU)."""
    with torch.inference_mode():
        for h, pre in cases[:20]:
            fn(h, pre)
        t = time.thread_time()
        for h, pre in cases:
            fn(h, pre)
            if gap_s > 0:
                time.sleep(gap_s)
        return (time.thread_time() - t) * 1000 / len(cases)


def engines_cpu(onerec: OneRec, one: Callable[[list[int], list[tuple[int, int, float]]], object],
                cases: list[Case], paced_ms: float) -> dict[str, float]:
    """Thread CPU per completion of the served one-user engine (fused), the numpy engine and the batched torch path
    on the same calls, alternated (torch, numpy, fused, twice) so that drift on a shared host hits all; back to
    back and, with `paced_ms` > 0, spaced as live traffic spaces them (caches and predictors go cold between calls)."""
    runs: dict[str, list[float]] = {}
    plans = [("", 0.0)] + ([("_paced", paced_ms / 1000.0)] if paced_ms > 0 else [])
    for suffix, gap in plans:
        some = cases if not gap else cases[: min(len(cases), 400)]
        for _ in range(2):
            for engine, one_user, fused in (("torch", False, False), ("numpy", True, False), ("fused", True, True)):
                onerec.numpy_one_user, onerec.fused_one_user = one_user, fused
                runs.setdefault(f"{engine}{suffix}", []).append(cpu_ms(one, some, gap))
    onerec.numpy_one_user = onerec.fused_one_user = True
    ms = {name: statistics.fmean(v) for name, v in runs.items()}
    out = {"complete_cpu_ms": round(ms["fused"], 3), "complete_numpy_cpu_ms": round(ms["numpy"], 3),
           "complete_torch_cpu_ms": round(ms["torch"], 3), "numpy_cpu_ratio": round(ms["numpy"] / ms["torch"], 2),
           "fused_over_numpy_cpu": round(ms["fused"] / ms["numpy"], 2)}
    if paced_ms > 0:
        out |= {"complete_paced_cpu_ms": round(ms["fused_paced"], 3),
                "complete_numpy_paced_cpu_ms": round(ms["numpy_paced"], 3),
                "complete_torch_paced_cpu_ms": round(ms["torch_paced"], 3), "paced_ms": paced_ms,
                "numpy_paced_cpu_ratio": round(ms["numpy_paced"] / ms["torch_paced"], 2),
                "fused_over_numpy_paced_cpu": round(ms["fused_paced"] / ms["numpy_paced"], 2),
                "paced_over_back_to_back": round(ms["fused_paced"] / ms["fused"], 2)}
    return out


def process_cpu(checkpoint: Path, settings: object, policy: PolicyConfig, cases: list[Case],
                in_process_ms: float) -> dict[str, float]:
    """The same completions through the API's model process: CPU of the child and of the calling thread per
    call, and the hand-off's share (both minus the in-process CPU of the same calls)."""
    from benchmarks.online_load import cpu_split
    from online_api.model_process import ProcessModel

    pm = ProcessModel(checkpoint, settings, policy)  # type: ignore[arg-type]  # a services.config.Settings
    pm.start()
    try:
        def call(h: list[int], pre: list[tuple[int, int, float]]) -> object:
            return pm.complete([h], [pre], 10, policy, [set(h)], time.perf_counter() + 5.0)

        assert pm.pid is not None
        child0 = cpu_split(pm.pid)
        parent = cpu_ms(call, cases)
        child1 = cpu_split(pm.pid)
    finally:
        pm.close()
    assert child0 is not None and child1 is not None
    child = (child1[0] - child0[0]) * 1000 / (len(cases) + 20)  # cpu_ms's 20 warm-up calls ran in the child too
    return {"process_child_cpu_ms": round(child, 3), "process_caller_cpu_ms": round(parent, 3),
            "handoff_cpu_ms": round(child + parent - in_process_ms, 3)}


def profile(fn: Callable[[list[int], list[tuple[int, int, float]]], object], cases: list[Case], top: int) -> None:
    """Print the top frames of `fn` over `cases` by own time (cProfile with a thread-CPU clock)."""
    prof = cProfile.Profile(time.thread_time)
    with torch.inference_mode():
        prof.enable()
        for h, pre in cases:
            fn(h, pre)
        prof.disable()
    print(f"top {top} frames by own CPU over {len(cases)} completions:")
    pstats.Stats(prof).sort_stats("tottime").print_stats(top)


if __name__ == "__main__":
    main()
