"""The Think-Ahead decision of one recommend request, within a latency budget.

Per request (deadline = arrival + budget_ms):
1. read the live version, the user's think entry and stored history in one Redis round trip (bounded by
   the Redis timeout and the remaining budget; a breaker skips Redis for a moment after a failure);
2. merge the stored history, events still queued locally and the request's own recent items; drop
   item ids unknown to the catalogue (counted);
3. ``think-ahead``: complete levels c, d under the entry's (a, b) prefixes with the fresh history;
   ``online-only``: no usable entry, decode all levels; ``fallback``: popular items minus consumed ones
   when the budget runs out, the model fails or is overloaded, or Redis failed and nothing is known
   about the user (``degraded`` is then true). A dependency failure never becomes an exception here.

Not here: HTTP shapes (`schemas.py`), threads (`batching.py`), Redis keys (`services.store`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from redis.exceptions import RedisError

from model.onerec import DeadlineExceeded
from model.policy import FALLBACK, THINK, PolicyConfig, Popularity, Prefix, Ranked, Scored, rank_batch
from model.trie import CodeTrie, EmptyAllowedSetError
from online_api.batching import BelowExpected, Kind, MicroBatcher, ModelUnavailable, Overloaded
from online_api.events import PendingEvents
from online_api.metrics import Metrics
from services.config import Settings
from services.store import AsyncThinkReader, FetchResult, ThinkEntry

log = logging.getLogger(__name__)

_MIN_MODEL_S = 0.001  # do not start the model with less budget than this
# after these, a second model call would not help (no time, no capacity, no model)
_NO_RETRY = {"deadline", "below_expected", "overloaded", "model_not_ready", "model_down", "model_error"}


# --------------------------------------------------------------------------- pure helpers


def merge_history(stored: Sequence[int], recent: Sequence[int], cap: int) -> list[int]:
    """`stored` followed by `recent`, skipping the longest head of `recent` that repeats `stored`'s tail.

    Clients may send either only new items or their whole recent history; both give the same result.
    """
    n = min(len(stored), len(recent))
    overlap = 0
    for j in range(n, 0, -1):
        if list(stored[len(stored) - j :]) == list(recent[:j]):
            overlap = j
            break
    merged = list(stored) + list(recent[overlap:])
    return merged[-cap:] if cap > 0 else merged


def entry_lag(entry: ThinkEntry, history: Sequence[int]) -> int | None:
    """Interactions appended since `entry` was computed: items after the last match of its history tail."""
    tail = list(entry.history_tail)
    if not tail:
        return len(history) if entry.history_len == 0 else None
    for end in range(len(history), len(tail) - 1, -1):
        if list(history[end - len(tail) : end]) == tail:
            return len(history) - end
    return None


class RedisBreaker:
    """After `threshold` failures in a row, skip Redis for `backoff_s` (a hung Redis must not cost every
    request a timeout). One late answer is more often the process's own busy event loop than Redis, and
    opening on it would send every request of the next `backoff_s` to the fallback."""

    def __init__(self, backoff_s: float, threshold: int = 1) -> None:
        if threshold < 1:
            raise ValueError(f"threshold must be >= 1, got {threshold}")
        self.backoff_s = backoff_s
        self.threshold = threshold
        self._open_until = 0.0
        self._failures = 0  # in a row

    def allow(self) -> bool:
        return time.monotonic() >= self._open_until

    def failed(self) -> None:
        self._failures += 1
        if self._failures >= self.threshold:
            self._open_until = time.monotonic() + self.backoff_s

    def succeeded(self) -> None:
        self._failures = 0
        self._open_until = 0.0


@dataclass
class Answer:
    """Result of one recommend call (the route turns it into `RecommendResponse`)."""

    items: list[tuple[int, float, str]]  # (item_id, score, source)
    source: str
    degraded: bool
    reasoning: str | None = None
    version: str | None = None
    unknown_items: int = 0
    reasons: list[str] = field(default_factory=list)  # why it fell back, if it did
    cached: frozenset[tuple[int, int]] = frozenset()  # (a, b) of the entry's usable cached prefixes


# --------------------------------------------------------------------------- the completer


class Completer:
    """Think-ahead / online-only / fallback logic shared by every request of the app."""

    def __init__(self, settings: Settings, policy: PolicyConfig, reader: AsyncThinkReader, known_items: set[int],
                 trie: CodeTrie | None,
                 batcher: MicroBatcher | None, popularity: Popularity, metrics: Metrics,
                 pending: PendingEvents, breaker: RedisBreaker) -> None:
        self.s = settings
        self.reader = reader
        self.known = known_items
        self.trie = trie
        self.batcher = batcher
        self.popularity = popularity
        self.m = metrics
        self.pending = pending
        self.breaker = breaker
        self.policy = policy  # built once by the app (`AppState.policy`); every model call carries it
        self._prefixes_of: CodeTrie | None = None  # the trie `_prefix_set` was built from
        self._prefix_set: frozenset[tuple[int, ...]] = frozenset()

    # ---- Redis
    async def fetch(self, user: int, deadline: float) -> tuple[FetchResult | None, str | None]:
        """The one round trip, or (None, reason) when Redis is skipped, fails or is slower than the budget."""
        if not self.breaker.allow():
            return None, "redis_breaker"
        timeout = min(self.s.redis_timeout_ms / 1000.0, deadline - time.perf_counter())
        if timeout <= 0:
            return None, "deadline"
        t0 = time.perf_counter()
        try:
            async with asyncio.timeout(timeout):
                res = await self.reader.fetch(user, history_max=self.s.history_max)
        except TimeoutError:
            reason = "redis_timeout"
        except (RedisError, OSError) as e:
            log.debug("redis fetch failed: %r", e)
            reason = "redis_error"
        else:
            self.breaker.succeeded()
            self.m.redis_latency.labels("fetch").observe(time.perf_counter() - t0)
            if res.corrupt:
                self.m.corrupt.inc()
            return res, None
        self.breaker.failed()
        self.m.redis_errors.labels("fetch").inc()
        return None, reason

    # ---- the request
    async def recommend(self, user: int, k: int, recent: Sequence[int] | None, budget_ms: float) -> Answer:
        deadline = time.perf_counter() + budget_ms / 1000.0
        fetched, why = await self.fetch(user, deadline)
        reasons = [why] if why else []
        stored = fetched.history if fetched is not None else []
        # unknown ids are dropped before the cap, so that a burst of them cannot push the real history out
        raw = merge_history(list(stored) + self.pending.get(user), recent or [], 0)
        known = [i for i in raw if i in self.known]
        unknown = len(raw) - len(known)
        history = known[-self.s.history_max :]
        if unknown:
            self.m.unknown_items.inc(unknown)
        entry = fetched.entry if fetched is not None else None
        prefixes = self._usable_prefixes(entry) if entry is not None else []
        if fetched is not None:
            lookup = "hit" if prefixes else "unusable" if entry else "corrupt" if fetched.corrupt else "miss"
            self.m.think_lookups.labels(lookup).inc()

        # the one policy (`model.policy`); with Redis down and nothing sent, nothing is known about the user:
        # popular items at once, without the model
        model = _BatcherModel(self, deadline, reasons) if fetched is not None or history else None
        items = [entry.items if entry is not None and prefixes else None]
        ranked: Ranked = (await rank_batch(self.policy, model, self.popularity, [history], [prefixes or None], k,
                                           items))[0]
        for r in reasons:
            self.m.fallbacks.labels(r).inc()
        source = ranked.source
        reasoning = entry.reasoning if entry is not None and source == THINK else None
        degraded = fetched is None or source == FALLBACK
        version = fetched.version if fetched is not None else None
        cached = frozenset((a, b) for a, b, _ in prefixes) if source == THINK else frozenset()
        return Answer(ranked.items, source, degraded, reasoning, version, unknown, reasons, cached)

    def _usable_prefixes(self, entry: ThinkEntry) -> list[Prefix]:
        """The entry's prefixes that exist in the trie (a foreign or outdated entry may hold others)."""
        valid = self._valid_prefixes()
        return [(a, b, lp) for a, b, lp in entry.prefixes if (a, b) in valid]

    def _valid_prefixes(self) -> frozenset[tuple[int, ...]]:
        """Every (a, b) of the current trie, built once per trie: one set lookup per prefix and request."""
        trie = self.trie
        if trie is None:
            return frozenset()
        if self._prefixes_of is not trie:
            self._prefix_set = frozenset(map(tuple, trie.codes[:, :2].tolist()))
            self._prefixes_of = trie
        return self._prefix_set

    async def _model(self, kind: Kind, history: Sequence[int], k: int, deadline: float, consumed: set[int],
                     prefixes: Sequence[Prefix] | None, reasons: list[str]) -> Scored:
        """One model call through the batcher; [] (and a reason appended) on any failure."""
        if self.batcher is None:
            reasons.append("model_not_ready")
            return []
        if deadline - time.perf_counter() < _MIN_MODEL_S:
            reasons.append("deadline")
            return []
        try:
            given = list(prefixes) if prefixes is not None else None
            return await self.batcher.submit(kind, list(history), k, deadline, self.policy, prefixes=given,
                                             exclude=consumed)
        except BelowExpected:  # failed before the model: its recent batches took longer than the budget left
            reasons.append("below_expected")
        except DeadlineExceeded:
            reasons.append("deadline")
        except Overloaded:
            reasons.append("overloaded")
        except ModelUnavailable:  # the model's process died or restarts
            reasons.append("model_down")
        except EmptyAllowedSetError:
            reasons.append("empty_allowed_set")
        except Exception:  # noqa: BLE001 - a model bug must not become a 5xx
            log.exception("model %s failed", kind)
            reasons.append("model_error")
        return []


class _BatcherModel:
    """`model.policy.PolicyModel` for one request: each call goes through the micro-batcher with the request's
    deadline; failures append their reason, and a user whose reasons rule out a second call gets None."""

    def __init__(self, completer: Completer, deadline: float, reasons: list[str]) -> None:
        self.c, self.deadline, self.reasons = completer, deadline, reasons

    def _final(self) -> bool:
        return bool(set(self.reasons) & _NO_RETRY)

    async def complete(self, histories: Sequence[Sequence[int]], prefixes: Sequence[Sequence[Prefix]], k: int,
                       exclude: Sequence[set[int]]) -> list[Scored | None]:
        (history,), (given,), (consumed,) = histories, prefixes, exclude
        scored = await self.c._model("complete", history, k, self.deadline, consumed, given, self.reasons)
        return [scored if scored or not self._final() else None]

    async def full(self, histories: Sequence[Sequence[int]], k: int,
                   exclude: Sequence[set[int]]) -> list[Scored | None]:
        if self._final():  # e.g. the Redis read already used up the budget
            return [None]
        (history,), (consumed,) = histories, exclude
        return [await self.c._model("full", history, k, self.deadline, consumed, None, self.reasons)]
