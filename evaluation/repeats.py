"""``python -m evaluation repeats``: the measurement behind the consumed-item rule (``--record`` chooses it).

The rule is `Settings.exclude_consumed` (``ONEREC_EXCLUDE_CONSUMED``): ``true`` / ``false`` force it; ``auto``
(the default) takes the rule this command recorded for the dataset's artifacts (`choose`, on validation).

Some catalogues have repeat consumption (a user buys an item again): the target of a leave-one-out case is
then already in the user's history. With ``exclude_consumed`` on, the served list never holds a history
item, so it can never hit such a target, but its ten slots all go to new items; off, history items compete
for the slots. This command evaluates the lightweight OneRec *as served* both ways (the one policy,
`model.policy.rank_batch`, through `evaluation.think_ahead.ThinkAheadRecommender` with no think entries:
the online-only path of ``POST /v1/recommend``) on one split, with the share of repeat targets, the
metrics on repeat and on new targets, and a paired comparison (a = exclude, b = allow), then the rule
validation favours (`choose`). ``--record`` (``--split valid`` only) writes that choice to
``artifacts_dir/consumed_rule.json``, which ``auto`` serves from then on; the test split is for reporting.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from evaluation.think_ahead import ThinkAheadRecommender, train_popularity
from model.metrics import paired_comparison, rank, score, split_examples
from model.onerec import OneRec
from model.policy import PolicyConfig
from services.catalog import Example, dataset_name, exit_if_invalid, load_dataset
from services.config import get_settings, record_consumed_rule
from services.results import write_result
from services.store import ThinkEntry


def no_entries(examples: Sequence[Example]) -> list[ThinkEntry | None]:
    """Entry source of the online-only path: no user has a think entry."""
    return [None for _ in examples]


def is_repeat(e: Example) -> bool:
    """The target is already in the (capped) history the model sees."""
    return e.target in e.history


def subset_score(ranked: list[list[int]], examples: Sequence[Example], keep: list[bool]) -> dict[str, float] | None:
    pairs = [(r, e.target) for r, e, k in zip(ranked, examples, keep, strict=True) if k]
    return score([r for r, _ in pairs], [t for _, t in pairs]) if pairs else None


def measure(onerec: OneRec, examples: Sequence[Example], sequences: dict[int, list[int]], split: str,
            beam: int | None = None) -> dict[str, object]:
    """Metrics of the served online-only path with the consumed rule on and off (see the module docstring)."""
    s = get_settings()
    popularity = train_popularity(sequences, split, {int(i) for i in onerec.sid.item_ids})
    targets = [e.target for e in examples]
    repeats = [is_repeat(e) for e in examples]
    out: dict[str, object] = {"users": len(examples), "repeat_targets": sum(repeats),
                              "repeat_share": round(sum(repeats) / max(1, len(examples)), 4)}
    ranked: dict[bool, list[list[int]]] = {}
    for exclude in (True, False):
        overrides = {"exclude_consumed": exclude} | ({"beam": beam} if beam else {})
        policy = PolicyConfig.from_settings(s, **overrides)
        rec = ThinkAheadRecommender(onerec, no_entries, policy, popularity)
        ranked[exclude] = rank(rec, examples, desc=f"onerec as served, exclude_consumed={exclude}")
        name = "exclude" if exclude else "allow"
        out[name] = score(ranked[exclude], targets)
        out[f"{name}_repeat_targets"] = subset_score(ranked[exclude], examples, repeats)
        out[f"{name}_new_targets"] = subset_score(ranked[exclude], examples, [not r for r in repeats])
    out["exclude_vs_allow"] = paired_comparison(ranked[True], ranked[False], targets)
    return out


def table(metrics: dict[str, object], split: str) -> str:
    """The measurement as a few aligned lines (all users, repeat targets, new targets)."""
    rows = [f"consumed-item rule on {split}: {metrics['users']} users, {metrics['repeat_targets']} repeat targets "
            f"({float(metrics['repeat_share']):.1%})",  # type: ignore[arg-type]
            f"  {'':16s} {'exclude R@10':>12s} {'keep R@10':>10s} {'exclude N@10':>12s} {'keep N@10':>10s}"]
    for label, suffix in (("all users", ""), ("repeat targets", "_repeat_targets"), ("new targets", "_new_targets")):
        ex, al = metrics[f"exclude{suffix}"], metrics[f"allow{suffix}"]
        if isinstance(ex, dict) and isinstance(al, dict):
            rows.append(f"  {label:16s} {ex['recall@10']:12.4f} {al['recall@10']:10.4f} {ex['ndcg@10']:12.4f} "
                        f"{al['ndcg@10']:10.4f}")
    return "\n".join(rows)


def choose(metrics: dict[str, object]) -> tuple[bool, str]:
    """(exclude consumed items?, why) from `measure`'s metrics: the rule with the higher Recall@10, then NDCG@10;
    a tie excludes (the list then holds only new items, which is never worse when nothing repeats)."""
    ex, al = metrics["exclude"], metrics["allow"]
    assert isinstance(ex, dict) and isinstance(al, dict)
    key = (ex["recall@10"], ex["ndcg@10"]) >= (al["recall@10"], al["ndcg@10"])
    reason = (f"R@10 exclude {ex['recall@10']:.4f} vs keep {al['recall@10']:.4f} (N@10 {ex['ndcg@10']:.4f} vs "
              f"{al['ndcg@10']:.4f}) on {metrics['users']} users, {float(metrics['repeat_share']):.1%} repeat targets")  # type: ignore[arg-type]
    return key, reason


def main(argv: list[str] | None = None) -> None:
    s = get_settings()
    p = argparse.ArgumentParser(prog="python -m evaluation repeats", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", type=Path, default=None, help="OneRec folder (default: the dataset's current)")
    p.add_argument("--split", choices=["valid", "test"], default="valid", help="valid to choose, test to report")
    p.add_argument("--beam", type=int, default=None, help="beam width (default: the served ONEREC_BEAM)")
    p.add_argument("--limit", type=int, default=None, help="first N users only")
    p.add_argument("--results", action="store_true", help="write the dataset's results file repeats_<split>.json")
    p.add_argument("--record", action="store_true",
                   help="--split valid: record the favoured rule in the artifacts (consumed_rule.json), served when "
                        "ONEREC_EXCLUDE_CONSUMED=auto (the default)")
    p.add_argument("--json", action="store_true", help="print the measurement as JSON (default: a short table)")
    args = p.parse_args(argv)
    if args.record and args.split != "valid":
        p.error("--record chooses the rule on validation: use it with --split valid")
    exit_if_invalid(s.data_dir)
    ds = load_dataset(s.data_dir)
    checkpoint = args.checkpoint or s.resolved("onerec")
    metrics = measure(OneRec.load(checkpoint), split_examples(ds, args.split, args.limit), ds.sequences, args.split,
                      args.beam)
    exclude, reason = choose(metrics)
    metrics["favoured"] = "exclude" if exclude else "keep"
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        print(table(metrics, args.split))
    verdict = "exclude consumed items (true)" if exclude else "keep consumed items (false)"
    print(f"{args.split} favours: {verdict}: {reason}")
    if args.record:
        path = record_consumed_rule(s, exclude, reason, metrics, checkpoint)
        forced = "" if s.exclude_consumed == "auto" else (
            f" (not now: ONEREC_EXCLUDE_CONSUMED={str(s.exclude_consumed).lower()} forces the rule)")
        print(f"recorded in {path}; served with ONEREC_EXCLUDE_CONSUMED=auto, the default{forced}")
    elif args.split == "valid":
        print("`--record` makes it the served rule (ONEREC_EXCLUDE_CONSUMED=auto)")
    if args.results and args.limit is None:
        write_result(f"repeats_{args.split}", metrics, dataset=dataset_name(s.data_dir),
                     note=f"checkpoint={checkpoint.resolve().name}; OneRec as served (online-only path), consumed "
                          "rule on (exclude) vs off (allow); repeat = target already in the history")


if __name__ == "__main__":
    main()
