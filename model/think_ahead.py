"""Evaluation mode ``think-ahead``: offline prefixes from a staler history, online completion with the fresh one.

The deployment situation (DESIGN.md section 4): the offline tier computed a user's `ThinkEntry` before the
user's latest interaction; the online tier completes levels c, d under the entry's (a, b) prefixes with the
history that includes it. `ThinkAheadRecommender` implements the harness's `Recommender` protocol given an
*entry source*: any callable mapping examples to entries computed from ``history[:-1]`` (see `staler`).

Sources provided here: `StoreSource` (entries an offline refresh wrote to Redis for the staler histories)
and `OneRecPrefixSource` (prefixes from the lightweight model's own beam on the staler history: a cheap
stand-in used by tests and as a sanity baseline). The OneRec-Think source belongs to the offline worker.
This module never imports vLLM or the API.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from model.onerec import OneRec
from services.catalog import Example
from services.store import ThinkEntry, ThinkStore

EntrySource = Callable[[Sequence[Example]], list[ThinkEntry | None]]


def staler(examples: Sequence[Example]) -> list[Example]:
    """The same users one interaction earlier: history[:-1], target = the dropped item."""
    out = []
    for e in examples:
        if not e.history:
            raise ValueError(f"user {e.user_id}: empty history cannot be made staler")
        out.append(Example(e.user_id, e.history[:-1], e.history[-1]))
    return out


def require_staler(sequences: dict[int, list[int]], examples: Sequence[Example],
                   entries: Sequence[ThinkEntry | None], split: str) -> None:
    """Exit unless every entry was computed from the history one interaction staler than the evaluated
    one: test (target = last item) needs `refresh --holdout 2`, valid (second to last) `--holdout 3`."""
    holdout = 2 if split == "test" else 3
    wrong = [en for e, en in zip(examples, entries, strict=True)
             if en is not None and en.history_len != len(sequences[e.user_id]) - holdout]
    if wrong:
        raise SystemExit(f"{len(wrong)} entries were not computed from the staler history (history_len "
                         f"{wrong[0].history_len}); for the {split} split run `refresh --holdout {holdout}`")


@dataclass
class StoreSource:
    """Entries of `version` (default: the live one) in a think store, written for the staler histories."""

    store: ThinkStore
    version: str | None = None

    def __call__(self, examples: Sequence[Example]) -> list[ThinkEntry | None]:
        version = self.version or self.store.current_version()
        if version is None:
            raise RuntimeError("StoreSource: no live think version in the store")
        return [self.store.get_entry(version, e.user_id) for e in examples]


@dataclass
class OneRecPrefixSource:
    """Top (a, b) prefixes of the lightweight model's beam over the staler history (logsumexp per prefix)."""

    onerec: OneRec
    prefixes: int = 32
    beam: int = 64

    def __call__(self, examples: Sequence[Example]) -> list[ThinkEntry | None]:
        stale = staler(examples)
        beams = self.onerec.decode_full([e.history for e in stale], self.beam, self.beam)
        out: list[ThinkEntry | None] = []
        for e, scored in zip(stale, beams, strict=True):
            mass: dict[tuple[int, int], float] = {}
            for item, s in scored:
                a, b = self.onerec.sid.codes_of(item)[:2]
                mass[(a, b)] = float(np.logaddexp(mass[(a, b)], s)) if (a, b) in mass else s
            top = sorted(mass.items(), key=lambda kv: -kv[1])[: self.prefixes]
            out.append(ThinkEntry("", [(a, b, lp) for (a, b), lp in top], len(e.history), e.history[-5:],
                                  "onerec-beam", time.time()))
        return out


class ThinkAheadRecommender:
    """`Recommender`: complete under stale-entry prefixes with the fresh history; full decode without entry.

    Lists shorter than k (few items under the prefixes) are filled from the full decode, so every user is
    ranked over the whole catalogue as the protocol requires.
    """

    def __init__(self, onerec: OneRec, source: EntrySource, beam: int = 20, prefix_weight: float = 1.0,
                 own_prefixes: int = 0, own_floor: float = 0.0, use_cached: bool = True):
        if not use_cached and own_prefixes <= 0:
            raise ValueError("use_cached=False needs own_prefixes > 0 (there would be nothing to complete)")
        self.onerec = onerec
        self.source = source
        self.beam = beam
        self.prefix_weight = prefix_weight
        self.own_prefixes, self.own_floor = own_prefixes, own_floor
        self.use_cached = use_cached  # False: ablation, the same users completed under own prefixes only
        self.with_entry = 0
        self.without_entry = 0
        self.items = 0  # completed items (users with an entry)
        self.items_cached = 0  # ... of them under one of the entry's cached (a, b) prefixes

    @property
    def cached_share(self) -> float:
        """Share of the completed items that sit under a cached prefix (what the offline reasoning chose)."""
        return self.items_cached / self.items if self.items else 0.0

    def recommend(self, examples: Sequence[Example], k: int) -> list[list[int]]:
        beam = max(self.beam, k)
        entries = self.source(examples)
        if len(entries) != len(examples):
            raise RuntimeError(f"entry source returned {len(entries)} entries for {len(examples)} users")
        idx = [i for i, en in enumerate(entries) if en is not None and en.prefixes]
        self.with_entry += len(idx)
        self.without_entry += len(examples) - len(idx)
        out: list[list[int]] = [[] for _ in examples]
        if idx:
            done = self.onerec.complete(
                [examples[i].history for i in idx],
                [entries[i].prefixes if self.use_cached else [] for i in idx],  # type: ignore[union-attr]
                k, beam, prefix_weight=self.prefix_weight, own_prefixes=self.own_prefixes, own_floor=self.own_floor,
            )  # fmt: skip
            for i, scored in zip(idx, done, strict=True):
                out[i] = [item for item, _ in scored]
                cached = {(a, b) for a, b, _ in entries[i].prefixes}  # type: ignore[union-attr]
                self.items += len(out[i])
                self.items_cached += sum(tuple(self.onerec.sid.codes_of(it)[:2]) in cached for it in out[i])
        short = [i for i, r in enumerate(out) if len(r) < k]
        if short:
            full = self.onerec.decode_full([examples[i].history for i in short], k, beam)
            for i, scored in zip(short, full, strict=True):
                have = set(out[i])
                out[i] += [item for item, _ in scored if item not in have][: k - len(out[i])]
        return out


def main(argv: list[str] | None = None) -> None:
    """``python -m model.think_ahead``: Recall/NDCG of ``onerec`` and ``think-ahead`` (+ ``think`` from a JSON)."""
    import argparse
    import json
    from pathlib import Path

    import redis

    from model.evaluate import evaluate, paired_comparison, rank, score, split_examples
    from services.catalog import load_dataset
    from services.config import get_settings
    from services.results import write_result

    s = get_settings()
    p = argparse.ArgumentParser(prog="python -m model.think_ahead", description=main.__doc__)
    p.add_argument("--checkpoint", type=Path, default=None, help="OneRec folder (default: artifacts/onerec/current)")
    p.add_argument("--source", choices=["redis", "onerec-beam"], default="redis",
                   help="redis: entries an offline refresh wrote for the staler histories (--version); "
                        "onerec-beam: prefixes from the lightweight model's own beam (sanity baseline)")
    p.add_argument("--version", default=None, help="think version in Redis (default: the live one)")
    p.add_argument("--redis-url", default=s.redis_url, help="Redis holding the entries")
    p.add_argument("--namespace", default=s.namespace, help="key namespace")
    p.add_argument("--think-json", type=Path, default=None,
                   help="output of `python -m model.think.evaluate run --out-json` on the same users (think row)")
    p.add_argument("--split", choices=["valid", "test"], default="test")
    p.add_argument("--limit", type=int, default=None, help="first N users only")
    p.add_argument("--beam", type=int, default=20, help="beam width (>= 10)")
    p.add_argument("--prefix-weight", type=float, default=s.prefix_weight, help="weight of the offline prefix log-prob")
    p.add_argument("--own-prefixes", type=int, default=s.own_prefixes,
                   help="also complete under the lightweight model's own top-N prefixes (0: cached prefixes only; "
                        "with N > 0 the strict variant is reported too, as think_ahead_strict)")
    p.add_argument("--own-floor", type=float, default=s.own_prefix_floor, help="offline score offset of own prefixes")
    p.add_argument("--wide-beams", type=lambda t: [int(x) for x in t.split(",") if x], default=[],
                   help="also report the lightweight model alone at these beam widths (e.g. 40,64)")
    p.add_argument("--results", action="store_true", help="write docs/results/think_ahead_quality.json")
    args = p.parse_args(argv)

    ds = load_dataset(s.data_dir)
    examples = split_examples(ds, args.split, args.limit)
    onerec = OneRec.load(args.checkpoint or s.resolved("onerec"))
    source: EntrySource
    if args.source == "redis":
        source = StoreSource(ThinkStore(redis.Redis.from_url(args.redis_url), args.namespace), args.version)
        # entries must come from the history one interaction staler than the evaluated one:
        # test -> `refresh --holdout 2`, valid -> `--holdout 3`
        require_staler(ds.sequences, examples, source(examples), args.split)
    else:
        source = OneRecPrefixSource(onerec)
    from model.onerec import OneRecRecommender

    targets = [e.target for e in examples]
    ranked_onerec = rank(OneRecRecommender(onerec, args.beam), examples, desc="onerec")
    metrics: dict[str, object] = {"onerec": score(ranked_onerec, targets)}
    rec = ThinkAheadRecommender(onerec, source, args.beam, args.prefix_weight, args.own_prefixes, args.own_floor)
    ranked_ta = rank(rec, examples, desc="think-ahead")
    metrics["think_ahead"] = score(ranked_ta, targets)
    # the bar is think-ahead >= onerec: is a difference there at all? (a = think-ahead, b = onerec)
    metrics["think_ahead_vs_onerec"] = paired_comparison(ranked_ta, ranked_onerec, targets)
    if args.own_prefixes > 0:
        strict = ThinkAheadRecommender(onerec, source, args.beam, args.prefix_weight)
        metrics["think_ahead_strict"] = evaluate(strict, examples, desc="think-ahead (cached prefixes only)")
        # ablation: what the cached prefixes add over the online model's own ones (a = think-ahead, b = own only)
        own = ThinkAheadRecommender(onerec, source, args.beam, args.prefix_weight, args.own_prefixes, args.own_floor,
                                    use_cached=False)  # fmt: skip
        ranked_own = rank(own, examples, desc="own prefixes only (ablation)")
        metrics["own_prefixes_only"] = score(ranked_own, targets)
        metrics["think_ahead_vs_own_prefixes_only"] = paired_comparison(ranked_ta, ranked_own, targets)
    for wide in args.wide_beams:  # the lightweight model alone with a wider beam (a reference, not a mode)
        metrics[f"onerec_beam{wide}"] = evaluate(OneRecRecommender(onerec, wide), examples, desc=f"onerec beam {wide}")
    metrics["think_ahead_coverage"] = round(rec.with_entry / max(1, rec.with_entry + rec.without_entry), 4)
    # how much of the think-ahead answer the offline reasoning chose (1.0 in the strict variant)
    metrics["think_ahead_cached_item_share"] = round(rec.cached_share, 4)
    if args.think_json is not None:
        metrics["think"] = json.loads(args.think_json.read_text())["metrics"]
    print(json.dumps(metrics, indent=2))
    if args.results and args.limit is None:
        note = (f"split={args.split}, beam={args.beam}, source={args.source}, prefix_weight={args.prefix_weight}, "
                f"own_prefixes={args.own_prefixes}, own_floor={args.own_floor}")
        write_result("think_ahead_quality", metrics, note=note)


if __name__ == "__main__":
    main()
