"""The incremental refresh: recompute only the users whose live entry is stale, in place, most stale first.

The online events path counts, per user, the interactions appended since the user's live entry was
computed (`services.store`, ``ns:stale``). ``refresh --stale-first N`` / ``--min-staleness S`` takes the
N most stale users with at least S unseen interactions, reads their *current* histories from Redis (the
ones the online tier serves from, events included), runs the engine in chunks and writes each new entry
into the live version with one SET per user, so a reader sees the old entry or the new one, never a mix
and never a half-written version. Then it subtracts from each user's staleness the count it saw when it
read the history: interactions that arrived during the refresh keep the user in the set.

This is not a new version: nothing is planned, carried, verified or flipped, and a kill loses at most
the chunk in flight (its users stay stale and are picked again next time). The full refresh
(`offline_worker.refresh`) remains the way to change model, settings or catalogue.

Not here: key names (`services.store`), decoding (`offline_worker.engine_interface`), the CLI.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from tqdm import tqdm

from model.semantic_ids import SemanticIDs
from offline_worker.engine_interface import Engine, ThinkRequest
from offline_worker.prompts import PromptBuilder
from offline_worker.refresh import HISTORY_TAIL
from services.config import Settings, setting_default
from services.store import ThinkEntry, ThinkStore

log = logging.getLogger(__name__)


@dataclass
class IncrementalOptions:
    """What one incremental refresh does (``--stale-first``, ``--min-staleness``, ``--chunk``)."""

    stale_first: int | None = None  # at most N users, most stale first (None: every user over the threshold)
    min_staleness: int = setting_default("refresh_min_staleness")  # interactions the live entry has not seen
    chunk: int = setting_default("refresh_chunk")
    ttl_s: int = setting_default("think_ttl_s")
    history_cap: int = setting_default("think_history_cap")
    progress: bool = True
    throttle_s: float = 0.0

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> IncrementalOptions:
        """Served defaults (`ONEREC_REFRESH_MIN_STALENESS`, ...); flags arrive as `overrides` (None: not given)."""
        s = settings
        base: dict[str, Any] = dict(min_staleness=s.refresh_min_staleness, chunk=s.refresh_chunk,
                                    ttl_s=s.think_ttl_s, history_cap=s.think_history_cap)  # fmt: skip
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)

    def __post_init__(self) -> None:
        if self.stale_first is not None and self.stale_first < 1:
            raise ValueError(f"stale_first: expected >= 1, got {self.stale_first!r}")
        for name in ("min_staleness", "chunk", "ttl_s", "history_cap"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(self, name)!r}")


@dataclass
class IncrementalReport:
    version: str | None
    candidates: int = 0  # users picked (staleness >= threshold, at most stale_first)
    computed: int = 0  # entries rewritten in the live version
    no_history: int = 0  # picked users with an empty history in Redis (left as they are)
    staleness_seen: int = 0  # interactions the rewritten entries caught up on
    seconds: float = 0.0
    users_per_s: float = 0.0
    skipped: str | None = None
    staleness_histogram: dict[int, int] = field(default_factory=dict)  # staleness -> picked users


def run_incremental(
    store: ThinkStore,
    engine: Engine,
    sid: SemanticIDs,
    opts: IncrementalOptions,
    on_chunk: Callable[[int, int], None] | None = None,
) -> IncrementalReport:
    """Recompute the stalest users' entries into the live version (see the module docstring)."""
    version = store.current_version()
    report = IncrementalReport(version)
    if version is None:
        report.skipped = "no live version (run a full refresh first)"
        return report
    picked = store.stale_users(opts.min_staleness, opts.stale_first)
    report.candidates = len(picked)
    for _, n in picked:
        report.staleness_histogram[n] = report.staleness_histogram.get(n, 0) + 1
    if not picked:
        report.skipped = f"no user with staleness >= {opts.min_staleness}"
        return report
    builder = PromptBuilder(engine.tokenizer, sid, opts.history_cap)
    bar = tqdm(total=len(picked), unit="user", desc=f"incremental refresh of {version}", disable=not opts.progress,
               dynamic_ncols=True)  # fmt: skip
    t0 = time.perf_counter()
    try:
        for i in range(0, len(picked), opts.chunk):
            users = [u for u, _ in picked[i : i + opts.chunk]]
            # staleness first, then the history: an event landing between the two reads is in the history
            # but still counted afterwards, so the user is recomputed once more (never skipped)
            seen = store.staleness(users)
            histories = store.get_histories(users)
            todo = [u for u in users if histories[u]]
            report.no_history += len(users) - len(todo)
            if todo:
                prompts = builder.build((u, histories[u]) for u in todo)
                results = engine.think([ThinkRequest(u, ids, histories[u]) for u, ids in prompts])
                now = time.time()
                entries = {
                    r.user_id: ThinkEntry(r.reasoning, [(a, b, float(s)) for a, b, s in r.prefixes],
                                          len(histories[r.user_id]), list(histories[r.user_id][-HISTORY_TAIL:]),
                                          engine.model_id, now, list(r.items))  # fmt: skip
                    for r in results
                }
                report.computed += store.write_live_entries(version, entries, opts.ttl_s)
                store.settle_staleness({u: seen[u] for u in todo})
                report.staleness_seen += sum(seen[u] for u in todo)
            bar.update(len(users))
            if on_chunk is not None:
                on_chunk(i // opts.chunk, len(users))
            if opts.throttle_s:
                time.sleep(opts.throttle_s)
    finally:
        bar.close()
    report.seconds = time.perf_counter() - t0
    report.users_per_s = report.computed / report.seconds if report.seconds > 0 else 0.0
    log.info("incremental refresh of %s: %d stale users recomputed in %.1f s", version, report.computed,
             report.seconds)  # fmt: skip
    return report


def report_dict(report: IncrementalReport) -> dict[str, Any]:
    return asdict(report)
