"""The one Think-Ahead policy: how a user's list is ranked, for serving and for evaluation alike.

Given a user's fresh history (already capped), the usable cached (a, b) prefixes of their think entry
(or None: no entry) and k, `rank_batch` decides, per user:
1. **consumed rule**: with `PolicyConfig.exclude_consumed`, items of the history are never listed;
2. **candidates**: with cached prefixes, complete levels c, d under them plus the online model's own
   top-`own_prefixes` (a, b) (`OneRec.complete`; the offline log-prob weighted by `prefix_weight`):
   source ``think-ahead``; with `item_weight` > 0 and items in the entry, the completion's whole beam is ranked
   again with the think model's item log-probs added (`with_item_scores`) before the top k are kept;
3. no entry, or nothing found under its prefixes: decode all levels (source ``online-only``), unless the
   model call failed in a way a second call cannot fix (the model answers None for such a user);
4. **fill rule**: a list still shorter than k is padded with the most popular items that are neither
   consumed nor listed (source ``fallback``; the whole list is ``fallback`` when the model gave nothing).

The API (`online_api.complete.Completer`) calls it with a batch of one through its micro-batcher and a
deadline; the evaluation (`evaluation.think_ahead`) calls it over whole batches of users with the model
in process. Both build `PolicyConfig` from the one `Settings` (`PolicyConfig.from_settings`), once, and pass that
object on: the API through its micro-batcher and model process to `OneRec.complete`, so a think-ahead quality
number is the served system's number. `Prefix` and `Scored` below are the shapes every layer imports from here.
Nothing here reads Redis or HTTP.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from services.config import Settings

THINK, ONLINE, FALLBACK = "think-ahead", "online-only", "fallback"
Prefix = tuple[int, int, float]  # (a, b, offline log-prob)
ItemScore = tuple[int, float]  # (item id, offline log-prob of the item)
Scored = list[tuple[int, float]]  # (item_id, score), best first


@dataclass(frozen=True)
class PolicyConfig:
    """Options of the think-ahead policy; no defaults of its own: they come from `Settings`."""

    beam: int  # beam width of the online decoding (at least k is used)
    prefix_weight: float  # weight of the offline (a, b) log-prob in the completion score
    own_prefixes: int  # also complete under the online model's own top-N (a, b); 0: cached prefixes only
    own_prefix_floor: float  # offline score of an own prefix: the weakest cached one + this
    exclude_consumed: bool  # never list an item of the user's history
    use_cached: bool = True  # False: ablation, users with an entry completed under own prefixes only
    item_weight: float = 0.0  # weight of the entry's item log-probs in the think-ahead ranking; 0: off

    def __post_init__(self) -> None:
        if self.beam < 1 or self.own_prefixes < 0 or self.prefix_weight < 0 or self.item_weight < 0:
            raise ValueError(f"PolicyConfig: beam >= 1, own_prefixes >= 0, prefix_weight >= 0, item_weight >= 0 "
                             f"expected, got {self.beam}, {self.own_prefixes}, {self.prefix_weight}, "
                             f"{self.item_weight}")
        if not self.use_cached and self.own_prefixes <= 0:
            raise ValueError("use_cached=False needs own_prefixes > 0 (there would be nothing to complete)")

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> PolicyConfig:
        """The served options (`ONEREC_BEAM`, `ONEREC_PREFIX_WEIGHT`, ...), with `overrides` on top."""
        cfg = cls(beam=settings.beam, prefix_weight=settings.prefix_weight, own_prefixes=settings.own_prefixes,
                  own_prefix_floor=settings.own_prefix_floor,
                  exclude_consumed=settings.consumed_rule().exclude, item_weight=settings.item_weight)
        return replace(cfg, **overrides)

    def beam_for(self, k: int) -> int:
        """The beam width a request for `k` items decodes with: `beam`, at least k."""
        return max(self.beam, k)

    def consumed(self, history: Sequence[int]) -> set[int]:
        """The consumed-item rule: what may not be listed for this history."""
        return set(history) if self.exclude_consumed else set()


def with_item_scores(scored: Scored, items: Sequence[ItemScore] | None, weight: float) -> Scored:
    """`scored` ranked again by score + `weight` x the offline item log-prob, best first (ties keep their order).
    An item missing from `items` (the think model's top-N only) gets the weakest stored log-prob: an upper bound
    of its own, and a constant, so such items keep their order among themselves. No items or weight 0: unchanged."""
    if weight <= 0 or not items:
        return scored
    lp: dict[int, float] = {}
    for it, v in items:
        lp.setdefault(it, v)
    floor = min(lp.values())
    return sorted(((it, s + weight * lp.get(it, floor)) for it, s in scored), key=lambda x: -x[1])


class Popularity:
    """Most-popular items (the fill rule and the fallback): log-share scores."""

    def __init__(self, sequences: Iterable[Sequence[int]], valid: set[int] | None = None, keep: int = 2000):
        counts: Counter[int] = Counter()
        for seq in sequences:
            counts.update(seq)
        total = sum(counts.values()) or 1
        ranked = [(i, c) for i, c in counts.most_common() if valid is None or i in valid]
        self.top = [(i, math.log(c / total)) for i, c in ranked[:keep]]

    def recommend(self, k: int, exclude: set[int] | frozenset[int] = frozenset(),
                  skip: set[int] | frozenset[int] = frozenset()) -> Scored:
        out: Scored = []
        for i, s in self.top:
            if i in exclude or i in skip:
                continue
            out.append((i, s))
            if len(out) == k:
                break
        return out


class PolicyModel(Protocol):
    """The model calls the policy makes, batched over users. A user's result is [] when nothing was found
    and None when the call failed in a way that a second model call would not fix (no time, no model)."""

    async def complete(self, histories: Sequence[Sequence[int]], prefixes: Sequence[Sequence[Prefix]], k: int,
                       exclude: Sequence[set[int]]) -> list[Scored | None]: ...

    async def full(self, histories: Sequence[Sequence[int]], k: int,
                   exclude: Sequence[set[int]]) -> list[Scored | None]: ...


@dataclass
class Ranked:
    """One user's answer: (item_id, score, source) best first, and the answer's source."""

    items: list[tuple[int, float, str]]
    source: str


async def rank_batch(cfg: PolicyConfig, model: PolicyModel | None, popularity: Popularity,
                     histories: Sequence[Sequence[int]], prefixes: Sequence[Sequence[Prefix] | None],
                     k: int, items: Sequence[Sequence[ItemScore] | None] | None = None) -> list[Ranked]:
    """The policy (module docstring) for a batch of users; `model` None: the model is not consulted. `items`: each
    user's offline item log-probs (the entry's; None or [] for none), used when `cfg.item_weight` > 0."""
    if len(prefixes) != len(histories):
        raise ValueError(f"prefixes: one entry per history expected, got {len(prefixes)} for {len(histories)}")
    if items is not None and len(items) != len(histories):
        raise ValueError(f"items: one entry per history expected, got {len(items)} for {len(histories)}")
    consumed = [cfg.consumed(h) for h in histories]
    out = [Ranked([], FALLBACK) for _ in histories]
    retry = [model is not None for _ in histories]
    if model is not None:
        think = [i for i, p in enumerate(prefixes) if p]
        if think:
            given = [list(prefixes[i] or []) if cfg.use_cached else [] for i in think]
            offline = [items[i] if items is not None and cfg.item_weight > 0 else None for i in think]
            n = cfg.beam_for(k) if any(offline) else k  # the item scores rank the whole beam, not only its top k
            done = await model.complete([histories[i] for i in think], given, n, [consumed[i] for i in think])
            for i, scored, its in zip(think, done, offline, strict=True):
                if scored:
                    scored = with_item_scores(scored, its, cfg.item_weight)
                    out[i] = Ranked([(it, s, THINK) for it, s in scored[:k]], THINK)
                retry[i] = scored is not None
        full = [i for i, r in enumerate(out) if not r.items and retry[i]]
        if full:
            done = await model.full([histories[i] for i in full], k, [consumed[i] for i in full])
            for i, scored in zip(full, done, strict=True):
                if scored:
                    out[i] = Ranked([(it, s, ONLINE) for it, s in scored[:k]], ONLINE)
    for i, r in enumerate(out):
        if len(r.items) < k:
            have = {it for it, _, _ in r.items}
            r.items += [(it, s, FALLBACK) for it, s in popularity.recommend(k - len(r.items), consumed[i], have)]
    return out
