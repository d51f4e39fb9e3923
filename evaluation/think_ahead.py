"""Evaluation mode ``think-ahead``: offline prefixes from a staler history, online completion with the fresh one.

The deployment situation: the offline tier computed a user's `ThinkEntry` before the user's latest
interaction; the online tier completes levels c, d under the entry's (a, b) prefixes with the history that
includes it. `ThinkAheadRecommender` implements the harness's `Recommender` protocol given an *entry
source* (any callable mapping examples to entries computed from ``history[:-1]``, see `staler`) by calling
the one served policy, `model.policy.rank_batch`, with the served `PolicyConfig`: the same candidates,
consumed-item rule and fill rule as ``POST /v1/recommend``. Numbers "as served" use the served settings;
the protocol's plain numbers (consumed items allowed) are reported beside them where they differ.

Sources provided here: `StoreSource` (entries an offline refresh wrote to Redis for the staler histories)
and `OneRecPrefixSource` (prefixes from the lightweight model's own beam on the staler history: a cheap
stand-in used by tests and as a sanity baseline). The OneRec-Think source belongs to the offline worker.
This module never imports vLLM or the API; it reads Redis only through `services.store`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from model.onerec import OneRec
from model.policy import THINK, PolicyConfig, Popularity, Prefix, Scored, rank_batch
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


def train_popularity(sequences: dict[int, list[int]], split: str, valid: set[int] | None = None) -> Popularity:
    """The fill rule's popular items, counted without the evaluated targets (test: all but the last item
    of each sequence; valid: all but the last two). Serving counts every known interaction."""
    holdout = 1 if split == "test" else 2
    return Popularity((s[:-holdout] for s in sequences.values()), valid)


class InProcessModel:
    """`model.policy.PolicyModel` over an in-process `OneRec` (no deadline: evaluation waits for every call)."""

    def __init__(self, onerec: OneRec, policy: PolicyConfig) -> None:
        self.onerec, self.policy = onerec, policy

    async def complete(self, histories: Sequence[Sequence[int]], prefixes: Sequence[Sequence[Prefix]], k: int,
                       exclude: Sequence[set[int]]) -> list[Scored | None]:
        return list(self.onerec.complete(histories, prefixes, k, self.policy, exclude=list(exclude)))

    async def full(self, histories: Sequence[Sequence[int]], k: int,
                   exclude: Sequence[set[int]]) -> list[Scored | None]:
        return list(self.onerec.decode_full(histories, k, self.policy.beam_for(k), exclude=list(exclude)))


class ThinkAheadRecommender:
    """`Recommender` that ranks through the served policy (`model.policy.rank_batch`): complete under the
    stale entry's usable prefixes with the fresh history, decode all levels without an entry, pad with
    popular items; `policy` says beam, weights and the consumed-item rule."""

    def __init__(self, onerec: OneRec, source: EntrySource, policy: PolicyConfig, popularity: Popularity):
        self.onerec = onerec
        self.source = source
        self.policy = policy
        self.popularity = popularity
        self.model = InProcessModel(onerec, policy)
        # the (a, b) that exist in the trie: serving drops an entry's other prefixes the same way
        self.valid = frozenset(map(tuple, onerec.trie.codes[:, :2].tolist()))
        self.with_entry = 0
        self.without_entry = 0
        self.items = 0  # items the completion listed (source think-ahead)
        self.items_cached = 0  # ... of them under one of the entry's cached (a, b) prefixes
        self.sources: dict[str, int] = {}  # answers by source (think-ahead, online-only, fallback)

    @property
    def cached_share(self) -> float:
        """Share of the completed items that sit under a cached prefix (what the offline reasoning chose)."""
        return self.items_cached / self.items if self.items else 0.0

    def usable(self, entry: ThinkEntry | None) -> list[Prefix] | None:
        if entry is None:
            return None
        return [(a, b, lp) for a, b, lp in entry.prefixes if (a, b) in self.valid] or None

    def recommend(self, examples: Sequence[Example], k: int) -> list[list[int]]:
        entries = self.source(examples)
        if len(entries) != len(examples):
            raise RuntimeError(f"entry source returned {len(entries)} entries for {len(examples)} users")
        prefixes = [self.usable(en) for en in entries]
        histories = [e.history for e in examples]
        items = [en.items if en is not None else None for en in entries]
        ranked = asyncio.run(rank_batch(self.policy, self.model, self.popularity, histories, prefixes, k, items))
        out: list[list[int]] = []
        for r, pre in zip(ranked, prefixes, strict=True):
            out.append([it for it, _, _ in r.items])
            self.sources[r.source] = self.sources.get(r.source, 0) + 1
            if pre is None:
                self.without_entry += 1
                continue
            self.with_entry += 1
            cached = {(a, b) for a, b, _ in pre}
            completed = [it for it, _, src in r.items if src == THINK]
            self.items += len(completed)
            self.items_cached += sum(tuple(self.onerec.sid.codes_of(it)[:2]) in cached for it in completed)
        return out


def main(argv: list[str] | None = None) -> None:
    """``python -m evaluation think-ahead``: Recall/NDCG of ``onerec`` and served ``think-ahead`` (+ ``think`` from
    a JSON), as served and under the protocol's plain rule where they differ."""
    import argparse
    import json
    from pathlib import Path

    from model.metrics import evaluate, paired_comparison, rank, score, split_examples
    from model.onerec import OneRecRecommender
    from services.catalog import load_dataset
    from services.config import get_settings
    from services.results import write_result
    from services.store.connect import connect

    s = get_settings()
    p = argparse.ArgumentParser(prog="python -m evaluation think-ahead", description=main.__doc__)
    p.add_argument("--checkpoint", type=Path, default=None, help="OneRec folder (default: artifacts/onerec/current)")
    p.add_argument("--source", choices=["redis", "onerec-beam"], default="redis",
                   help="redis: entries an offline refresh wrote for the staler histories (--version); "
                        "onerec-beam: prefixes from the lightweight model's own beam (sanity baseline)")
    p.add_argument("--version", default=None, help="think version in Redis (default: the live one)")
    p.add_argument("--redis-url", default=s.redis_url, help="Redis holding the entries")
    p.add_argument("--namespace", default=s.namespace, help="key namespace")
    p.add_argument("--think-json", type=Path, default=None,
                   help="output of `python -m evaluation think run --out-json` on the same users (think row)")
    p.add_argument("--split", choices=["valid", "test"], default="test")
    p.add_argument("--limit", type=int, default=None, help="first N users only")
    p.add_argument("--beam", type=int, default=s.beam, help="beam width (>= 10; default: the served ONEREC_BEAM)")
    p.add_argument("--prefix-weight", type=float, default=s.prefix_weight, help="weight of the offline prefix log-prob")
    p.add_argument("--own-prefixes", type=int, default=s.own_prefixes,
                   help="also complete under the lightweight model's own top-N prefixes (0: cached prefixes only; "
                        "with N > 0 the strict variant is reported too, as think_ahead_strict)")
    p.add_argument("--own-floor", type=float, default=s.own_prefix_floor, help="offline score offset of own prefixes")
    p.add_argument("--item-weight", type=float, default=s.item_weight,
                   help="weight of the entries' item log-probs in the think-ahead ranking (default ONEREC_ITEM_WEIGHT)")
    p.add_argument("--item-weights", type=lambda t: [float(x) for x in t.split(",") if x], default=[], metavar="W[,W]",
                   help="also serve with these item weights, each paired with think-ahead (a diagnostic on this split)")
    p.add_argument("--own-only", type=lambda t: [int(x) for x in t.split(",") if x], default=[], metavar="N[,N]",
                   help="also the online model alone completing under its own top-N prefixes (no cached ones), paired "
                        "with think-ahead: e.g. 64 = as many prefixes as cached + own, without the offline tier")
    p.add_argument("--wide-beams", type=lambda t: [int(x) for x in t.split(",") if x], default=[],
                   help="also report the lightweight model alone at these beam widths (e.g. 40,64)")
    p.add_argument("--against", default=None, metavar="NAMESPACE[:VERSION]",
                   help="also serve the entries of another refresh (e.g. direct vs grounded think mode; default "
                        "version: its live one) and compare paired: think_ahead_vs_against (a = --namespace)")
    p.add_argument("--results", action="store_true", help="write the dataset's results file "
                   "think_ahead_quality.json (docs/results/[<dataset>/] bundled data, <artifacts>/results/ else)")
    args = p.parse_args(argv)
    if args.think_json is not None and not args.think_json.is_file():  # an input, read at the end: check it first
        p.error(f"--think-json {args.think_json}: no such file (the output of `python -m evaluation think run "
                "--out-json`)")
    if any(n < 1 for n in args.own_only):
        p.error(f"--own-only: prefix counts >= 1 expected, got {args.own_only}")
    if args.item_weight < 0 or any(w < 0 for w in args.item_weights):
        p.error("--item-weight/--item-weights: weights >= 0 expected")

    ds = load_dataset(s.data_dir)
    examples = split_examples(ds, args.split, args.limit)
    onerec = OneRec.load(args.checkpoint or s.resolved("onerec"))
    source: EntrySource
    if args.source == "redis":
        source = StoreSource(ThinkStore(connect(args.redis_url), args.namespace), args.version)
        # entries must come from the history one interaction staler than the evaluated one:
        # test -> `refresh --holdout 2`, valid -> `--holdout 3`
        require_staler(ds.sequences, examples, source(examples), args.split)
    else:
        source = OneRecPrefixSource(onerec)
    # the served policy (Settings), with the flags' overrides; "protocol": the same with consumed items allowed
    def policy(**overrides: Any) -> PolicyConfig:
        return PolicyConfig.from_settings(s, **{"beam": args.beam, "prefix_weight": args.prefix_weight,
                                                "own_prefixes": args.own_prefixes, "own_prefix_floor": args.own_floor,
                                                "item_weight": args.item_weight, **overrides})

    served = policy()
    plain = policy(exclude_consumed=False)
    popularity = train_popularity(ds.sequences, args.split, {int(i) for i in onerec.sid.item_ids})

    def run(policy: PolicyConfig, src: EntrySource, desc: str) -> tuple[ThinkAheadRecommender, list[list[int]]]:
        rec = ThinkAheadRecommender(onerec, src, policy, popularity)
        return rec, rank(rec, examples, desc=desc)

    def no_entries(ex: Sequence[Example]) -> list[ThinkEntry | None]:
        return [None for _ in ex]

    targets = [e.target for e in examples]
    ranked_onerec = rank(OneRecRecommender(onerec, args.beam), examples, desc="onerec (protocol)")
    metrics: dict[str, object] = {"onerec": score(ranked_onerec, targets)}
    rec, ranked_ta = run(served, source, "think-ahead (as served)")
    metrics["think_ahead"] = score(ranked_ta, targets)
    metrics["exclude_consumed"] = served.exclude_consumed
    if served.exclude_consumed:
        # as served, lists never hold an item of the history: compare with onerec served the same way
        _, ranked_onerec_served = run(served, no_entries, "onerec (as served)")
        metrics["onerec_as_served"] = score(ranked_onerec_served, targets)
        metrics["think_ahead_vs_onerec_as_served"] = paired_comparison(ranked_ta, ranked_onerec_served, targets)
        _, ranked_plain = run(plain, source, "think-ahead (protocol: consumed items allowed)")
        metrics["think_ahead_protocol"] = score(ranked_plain, targets)
        metrics["think_ahead_protocol_vs_onerec"] = paired_comparison(ranked_plain, ranked_onerec, targets)
    else:
        # the bar is think-ahead >= onerec: is a difference there at all? (a = think-ahead, b = onerec)
        metrics["think_ahead_vs_onerec"] = paired_comparison(ranked_ta, ranked_onerec, targets)
    if args.own_prefixes > 0:
        strict = policy(own_prefixes=0)
        _, ranked_strict = run(strict, source, "think-ahead (cached prefixes only)")
        metrics["think_ahead_strict"] = score(ranked_strict, targets)
        # the bar "cached-only >= online-only", paired (a = cached prefixes only, b = online-only by the same rule)
        metrics["think_ahead_strict_vs_onerec" + ("_as_served" if served.exclude_consumed else "")] = paired_comparison(
            ranked_strict, ranked_onerec_served if served.exclude_consumed else ranked_onerec, targets)
        # ablation: what the cached prefixes add over the online model's own ones (a = think-ahead, b = own only)
        own_only = policy(use_cached=False)  # the item scores stay: this isolates the cached prefixes
        _, ranked_own = run(own_only, source, "own prefixes only (ablation)")
        metrics["own_prefixes_only"] = score(ranked_own, targets)
        metrics["think_ahead_vs_own_prefixes_only"] = paired_comparison(ranked_ta, ranked_own, targets)
    for n in args.own_only:  # the offline tier's slots given to the online model instead (same completion work)
        wider = policy(own_prefixes=n, use_cached=False, item_weight=0.0)  # nothing of the offline tier
        _, ranked_wide = run(wider, source, f"own top-{n} prefixes only")
        metrics[f"own_prefixes_only_{n}"] = score(ranked_wide, targets)
        metrics[f"think_ahead_vs_own_prefixes_only_{n}"] = paired_comparison(ranked_ta, ranked_wide, targets)
    for w in args.item_weights:  # the weight of the offline item scores (a = this weight, b = think-ahead as served)
        _, ranked_w = run(policy(item_weight=w), source, f"think-ahead, item weight {w:g}")
        metrics[f"think_ahead_item_weight_{w:g}"] = score(ranked_w, targets)
        metrics[f"think_ahead_item_weight_{w:g}_vs_think_ahead"] = paired_comparison(ranked_w, ranked_ta, targets)
        if served.exclude_consumed:
            metrics[f"think_ahead_item_weight_{w:g}_vs_onerec_as_served"] = paired_comparison(
                ranked_w, ranked_onerec_served, targets)
    if args.against:  # the same served policy over another refresh's entries of the same users
        namespace, _, version = args.against.partition(":")
        other = StoreSource(ThinkStore(connect(args.redis_url), namespace), version or None)
        require_staler(ds.sequences, examples, other(examples), args.split)
        _, ranked_other = run(served, other, f"think-ahead ({args.against})")
        metrics["against"] = {"source": args.against, **score(ranked_other, targets)}
        metrics["think_ahead_vs_against"] = paired_comparison(ranked_ta, ranked_other, targets)
    for wide in args.wide_beams:  # the lightweight model alone with a wider beam (a reference, not a mode)
        metrics[f"onerec_beam{wide}"] = evaluate(OneRecRecommender(onerec, wide), examples, desc=f"onerec beam {wide}")
    metrics["think_ahead_coverage"] = round(rec.with_entry / max(1, rec.with_entry + rec.without_entry), 4)
    # how much of the think-ahead answer the offline reasoning chose (1.0 in the strict variant)
    metrics["think_ahead_cached_item_share"] = round(rec.cached_share, 4)
    metrics["think_ahead_sources"] = dict(rec.sources)
    if args.think_json is not None:
        metrics["think"] = json.loads(args.think_json.read_text())["metrics"]
    print(json.dumps(metrics, indent=2))
    if args.results and args.limit is None:
        note = (f"split={args.split}, beam={args.beam}, source={args.source}, prefix_weight={args.prefix_weight}, "
                f"item_weight={args.item_weight}, "
                f"own_prefixes={args.own_prefixes}, own_floor={args.own_floor}, "
                f"exclude_consumed={served.exclude_consumed} (think_ahead and onerec_as_served: as served; "
                "onerec and think_ahead_protocol: the protocol's plain rule)")
        write_result("think_ahead_quality", metrics, note=note)


if __name__ == "__main__":
    main()
