"""The refresh job: choose users, run the engine in chunks, write one new version, verify, flip.

A refresh always produces a *complete* version (an entry for every user of the dataset): the mode only
chooses which users are recomputed (``all``; ``list``: given ids; ``changed``: users whose history,
model or entry differs from the live version). The others are carried over with a server-side COPY.

Work is cut into numbered chunks (recompute chunks of ``chunk`` users, then carry chunks); chunk ``c``
belongs to shard ``c % N`` so N workers (``--shard i/N``, on N GPUs or machines) fill one version
against one Redis. A chunk is marked done only after its entries (and histories) are written, so a job
killed at any point resumes by skipping done chunks; re-written entries are idempotent SETs. The
version name is a hash of the plan (model, settings, users and their histories, mode, base version),
so re-running the same command resumes the same version. Once every shard's chunks are done, the
version is verified (entry count) and ``current`` is flipped in one atomic write (`ThinkStore.publish`).
Readers never see a half-written version because they only read the version ``current`` names.

Not here: decoding (`offline_worker.engine_interface`), key names and encoding (`services.store`), the CLI.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from tqdm import tqdm

from model.semantic_ids import SemanticIDs
from offline_worker.engine_interface import Engine, ThinkRequest
from offline_worker.prompts import PromptBuilder
from services.config import Settings, setting_default
from services.store import IncompleteVersionError, ThinkEntry, ThinkStore

log = logging.getLogger(__name__)
UNCLOSED_REASONING = ""  # the reasoning stored for a path that never closed (the mark: no reasoning)

MODES = ("all", "list", "changed")
HISTORY_TAIL = 5  # items of the prompt history stored with each entry (staleness checks)


@dataclass
class RefreshOptions:
    """What one worker does (CLI flags map onto these)."""

    mode: str = "all"
    user_list: list[int] | None = None  # mode "list"
    chunk: int = setting_default("refresh_chunk")  # users per engine call
    carry_chunk: int = setting_default("carry_chunk")  # users per carry-over chunk
    shard: int = 0
    shards: int = 1
    version: str | None = None  # default: derived from the plan (same command = same version = resume)
    ttl_s: int = setting_default("think_ttl_s")
    history_max: int = setting_default("history_max")  # bounded per-user history written for the online tier
    history_cap: int = setting_default("think_history_cap")  # history items in a prompt
    holdout: int = 0  # drop each user's last N items (evaluation: make the offline history stale)
    limit: int | None = None  # only the first N users (smoke runs, benchmarks)
    write_histories: bool = True
    publish: bool = True  # flip `current` when every shard is complete
    progress: bool = True
    throttle_s: float = 0.0  # pause after each chunk (leave headroom on a shared machine; tests)

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> RefreshOptions:
        """The served refresh options (`ONEREC_REFRESH_CHUNK`, ...); flags arrive as `overrides` (None: not given)."""
        s = settings
        base: dict[str, Any] = dict(chunk=s.refresh_chunk, carry_chunk=s.carry_chunk, ttl_s=s.think_ttl_s,
                                    history_max=s.history_max, history_cap=s.think_history_cap)
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {self.mode!r}")
        if self.mode == "list" and not self.user_list:
            raise ValueError("user_list: mode 'list' needs at least one user id")
        if not 0 <= self.shard < self.shards:
            raise ValueError(f"shard: expected 0 <= shard < shards, got {self.shard}/{self.shards}")
        for name in ("chunk", "carry_chunk", "ttl_s", "history_max", "history_cap"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(self, name)!r}")
        if self.holdout < 0 or (self.limit is not None and self.limit < 1):
            raise ValueError(f"holdout/limit: expected >= 0 / >= 1, got {self.holdout}/{self.limit}")


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/N"`` -> (i, N) with 0 <= i < N."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard: expected i/N (e.g. 0/4), got {text!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise ValueError(f"--shard: expected 0 <= i < N, got {text!r}")
    return i, n


@dataclass
class RefreshPlan:
    """Everything a shard needs to do its part of one version; identical for every shard."""

    version: str
    users: list[int]  # every user of the version (sorted)
    recompute: list[int]  # users the engine runs on (sorted)
    carry: list[int]  # users copied from `base`
    base: str | None
    chunk: int
    carry_chunk: int
    shards: int
    plan_hash: str
    meta: dict[str, Any] = field(default_factory=dict)

    def chunks(self) -> list[tuple[str, list[int]]]:
        """All chunks by global index: ``("run", users)`` first, then ``("copy", users)``."""
        run = [("run", self.recompute[i : i + self.chunk]) for i in range(0, len(self.recompute), self.chunk)]
        cp = [("copy", self.carry[i : i + self.carry_chunk]) for i in range(0, len(self.carry), self.carry_chunk)]
        return run + cp

    def shard_chunks(self, shard: int) -> list[int]:
        return [c for c in range(len(self.chunks())) if c % self.shards == shard]


@dataclass
class RefreshReport:
    version: str
    shard: int
    shards: int
    computed: int = 0  # users run through the engine by this call
    copied: int = 0
    resumed_chunks: int = 0  # chunks found done at start
    seconds: float = 0.0
    users_per_s: float = 0.0
    truncated: int = 0  # reasoning paths cut by the token budget
    unclosed: int = 0  # users whose stored (greedy) reasoning never reached `</think>`: stored without reasoning
    corrupt: int = 0  # undecodable / unknown-schema values met (treated as missing and recomputed)
    published: bool = False
    skipped: str | None = None  # why nothing was done ("already live", "nothing changed")
    previous: str | None = None
    timings: dict[str, float] = field(default_factory=dict)


def _sha(parts: Iterable[str]) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode())
        h.update(b"\n")
    return h.hexdigest()


def offline_histories(
    sequences: dict[int, list[int]], holdout: int = 0, limit: int | None = None
) -> dict[int, list[int]]:
    """The history each user's entry is computed from (sorted users, last `holdout` items dropped)."""
    users = sorted(sequences)[:limit] if limit else sorted(sequences)
    return {u: list(sequences[u][: len(sequences[u]) - holdout] if holdout else sequences[u]) for u in users}


def _is_stale(entry: ThinkEntry | None, history: Sequence[int], model: str) -> bool:
    if entry is None or entry.model_id != model or entry.history_len != len(history):
        return True
    tail = list(history[-len(entry.history_tail) :]) if entry.history_tail else []
    return entry.history_tail != tail


def plan_refresh(
    store: ThinkStore,
    histories: dict[int, list[int]],
    model: str,
    engine_settings: dict[str, Any],
    opts: RefreshOptions,
) -> RefreshPlan:
    """Decide which users to recompute, which to carry over, the chunking and the version name."""
    users = sorted(histories)
    if not users:
        raise ValueError("histories: no users to refresh")
    base = store.current_version()
    if opts.mode == "all" or base is None:
        if opts.mode == "list":
            unknown = sorted(set(opts.user_list or []) - set(histories))
            if unknown:
                raise ValueError(f"user_list: {len(unknown)} ids not in the dataset, e.g. {unknown[:5]}")
        recompute = users  # nothing live to carry from
    else:
        entries = store.get_entries(base, users)
        if opts.mode == "list":
            wanted = set(opts.user_list or [])
            unknown = sorted(wanted - set(histories))
            if unknown:
                raise ValueError(f"user_list: {len(unknown)} ids not in the dataset, e.g. {unknown[:5]}")
            recompute = [u for u in users if u in wanted or entries[u] is None]
        else:  # changed
            recompute = [u for u in users if _is_stale(entries[u], histories[u], model)]
    todo = set(recompute)
    carry = [u for u in users if u not in todo] if base is not None else []
    settings_json = json.dumps(engine_settings, sort_keys=True, default=str)
    content = _sha(
        [model, settings_json, opts.mode, str(base) if opts.mode != "all" else "-", str(opts.holdout),
         str(opts.history_cap)]
        + [f"{u}:{' '.join(map(str, histories[u]))}" for u in users]
        + [f"r{u}" for u in recompute]
    )
    version = opts.version or f"r{content[:12]}"
    plan_hash = _sha([content, version, str(opts.chunk), str(opts.carry_chunk), str(opts.shards)])[:16]
    meta = {
        "model": model,
        "engine": engine_settings,
        "mode": opts.mode,
        "base": base,
        "expected_users": len(users),
        "recompute": len(recompute),
        "carry": len(carry),
        "chunk": opts.chunk,
        "carry_chunk": opts.carry_chunk,
        "shards": opts.shards,
        "holdout": opts.holdout,
        "history_cap": opts.history_cap,
        "plan_hash": plan_hash,
    }
    plan = RefreshPlan(
        version, users, recompute, carry, base, opts.chunk, opts.carry_chunk, opts.shards, plan_hash, meta
    )
    plan.meta["chunks"] = len(plan.chunks())
    return plan


def shard_progress(store: ThinkStore, version: str) -> dict[int, tuple[int, int]]:
    """shard -> (done chunks, expected chunks), from the version's metadata."""
    meta = store.meta(version)
    if "chunks" not in meta or "shards" not in meta:
        raise ValueError(f"version {version!r}: no refresh metadata (was it begun by this worker?)")
    n, shards = int(meta["chunks"]), int(meta["shards"])
    out = {}
    for s in range(shards):
        want = {c for c in range(n) if c % shards == s}
        out[s] = (len(store.done_chunks(version, s) & want), len(want))
    return out


def publish_version(store: ThinkStore, version: str) -> str | None:
    """Verify every shard's chunks are done and the entry count, then flip `current`. Returns the old."""
    progress = shard_progress(store, version)
    missing = {s: want - done for s, (done, want) in progress.items() if done < want}
    if missing:
        raise IncompleteVersionError(
            f"version {version!r}: shards not complete (shard: chunks missing) {missing}; not published"
        )
    expected = int(store.meta(version)["expected_users"])
    store.finish_version(version, {"verified_users": expected})
    old = store.publish(version, expected)
    log.info("published %s (previous %s, %d users)", version, old, expected)
    return old


def _entries(results: Sequence[Any], histories: dict[int, list[int]], model: str) -> dict[int, ThinkEntry]:
    """Entries to store. A reasoning that never closed (the budget ran out before `</think>`: e.g. an
    alignment-only checkpoint writing code tokens) is not reasoning: such an entry is marked by an empty
    reasoning text (its prefixes are kept) and counted in the report (`RefreshReport.unclosed`)."""
    now = time.time()
    return {
        r.user_id: ThinkEntry(
            reasoning=r.reasoning if getattr(r, "closed", True) else UNCLOSED_REASONING,
            prefixes=[(a, b, float(s)) for a, b, s in r.prefixes],
            history_len=len(histories[r.user_id]),
            history_tail=list(histories[r.user_id][-HISTORY_TAIL:]),
            model_id=model,
            created_at=now,
            items=[(int(i), float(lp)) for i, lp in getattr(r, "items", [])],
        )
        for r in results
    }


def _begin(store: ThinkStore, plan: RefreshPlan, report: RefreshReport) -> bool:
    """Step 1, plan: False when there is nothing to do (already live, nothing changed); else the version is
    begun (or resumed with the same plan)."""
    if store.current_version() == plan.version:
        report.skipped = "already live"
        return False
    if not plan.recompute and plan.base is not None:
        report.skipped = f"nothing changed since {plan.base}"
        return False
    if plan.version in store.versions():
        begun = store.meta(plan.version).get("plan_hash")
        if begun is not None and begun != plan.plan_hash:
            raise ValueError(
                f"version {plan.version!r} was begun with a different plan (chunking, shards or inputs); "
                "resume with the same settings or pass a new --version"
            )
    store.begin_version(plan.version, plan.meta)
    return True


def _carry(store: ThinkStore, plan: RefreshPlan, users: list[int], opts: RefreshOptions,
           report: RefreshReport) -> list[int]:
    """Step 2, carry: copy unchanged users' entries from the base version; returns those to recompute
    (entries that expired in the base come back)."""
    assert plan.base is not None
    run = store.copy_entries(plan.base, plan.version, users, opts.ttl_s)
    report.copied += len(users) - len(run)
    return run


def _compute(store: ThinkStore, engine: Engine, builder: PromptBuilder, histories: dict[int, list[int]],
             version: str, users: list[int], opts: RefreshOptions, report: RefreshReport) -> None:
    """Step 3, compute: reasoning + prefixes for `users`, written to `version` (and their histories)."""
    prompts = builder.build((u, histories[u]) for u in users)
    results = engine.think([ThinkRequest(u, ids, histories[u]) for u, ids in prompts])
    report.truncated += sum(r.truncated for r in results)
    report.unclosed += sum(not getattr(r, "closed", True) for r in results)
    store.write_entries(version, _entries(results, histories, engine.model_id), opts.ttl_s)
    if opts.write_histories:
        store.write_histories({u: histories[u] for u in users}, opts.history_max)
        store.clear_staleness(users)  # the histories were replaced: events counted before are gone
    report.computed += len(users)


def _publish_if_complete(store: ThinkStore, plan: RefreshPlan, opts: RefreshOptions, report: RefreshReport) -> None:
    """Step 4, publish: flip `current` once every shard of the version is complete."""
    progress = shard_progress(store, plan.version)
    if all(done_ == want for done_, want in progress.values()):
        report.previous = publish_version(store, plan.version)
        report.published = True
    else:
        log.info("shard %d done; waiting for shards %s", opts.shard,
                 [s for s, (d, w) in progress.items() if d < w])  # fmt: skip


def _finish_report(report: RefreshReport, store: ThinkStore, engine: Engine, builder: PromptBuilder,
                   seconds: float) -> None:
    report.seconds = seconds
    report.users_per_s = report.computed / seconds if seconds > 0 else 0.0
    report.timings = dict(engine.timings)
    report.corrupt = store.corrupt
    if store.corrupt:
        log.warning("%d corrupt or unknown-schema values were treated as missing", store.corrupt)
    if report.unclosed:
        share = report.unclosed / max(1, report.computed)
        hint = (" the checkpoint does not close its reasoning (an alignment-only model? run the activate stage)"
                if share >= 0.5 else "")
        log.warning("%d of %d users' reasoning never reached </think> within max_reasoning_tokens: stored without "
                    "reasoning%s", report.unclosed, report.computed, hint)  # fmt: skip
    if builder.skipped_items or builder.empty_users:
        log.warning("%d history items had no codes; %d users had no known item", builder.skipped_items,
                    len(builder.empty_users))  # fmt: skip


def run_shard(
    store: ThinkStore,
    engine: Engine,
    sid: SemanticIDs,
    histories: dict[int, list[int]],
    plan: RefreshPlan,
    opts: RefreshOptions,
    on_chunk: Callable[[int, str, int], None] | None = None,
) -> RefreshReport:
    """Do shard `opts.shard` of `plan` (resuming done chunks) and publish if every shard is complete:
    plan (`_begin`), then per chunk carry (`_carry`) and compute (`_compute`), then publish."""
    report = RefreshReport(plan.version, opts.shard, plan.shards)
    if not _begin(store, plan, report):
        return report
    chunks = plan.chunks()
    mine = plan.shard_chunks(opts.shard)
    done = store.done_chunks(plan.version, opts.shard)
    report.resumed_chunks = len(done & set(mine))
    todo = [c for c in mine if c not in done]
    run_total = sum(len(chunks[c][1]) for c in mine if chunks[c][0] == "run")
    builder = PromptBuilder(engine.tokenizer, sid, opts.history_cap)
    bar = tqdm(total=run_total, initial=run_total - sum(len(chunks[c][1]) for c in todo if chunks[c][0] == "run"),
               unit="user", desc=f"refresh {plan.version} shard {opts.shard}/{plan.shards}",
               disable=not opts.progress, dynamic_ncols=True, smoothing=0.1)  # fmt: skip
    t0 = time.perf_counter()
    try:
        for c in todo:
            kind, users = chunks[c]
            run = _carry(store, plan, users, opts, report) if kind == "copy" else users
            if run:
                _compute(store, engine, builder, histories, plan.version, run, opts, report)
            store.mark_chunk_done(plan.version, opts.shard, c)
            if kind == "run":
                bar.update(len(users))
            if on_chunk is not None:
                on_chunk(c, kind, len(users))
            if opts.throttle_s:
                time.sleep(opts.throttle_s)
    finally:
        bar.close()
    _finish_report(report, store, engine, builder, time.perf_counter() - t0)
    if opts.publish:
        _publish_if_complete(store, plan, opts, report)
    return report


def report_dict(report: RefreshReport) -> dict[str, Any]:
    return asdict(report)
