"""Choose the think-ahead completion settings on the validation split (never on test).

The served policy's completion has four knobs (`model.policy.PolicyConfig`, `OneRec.complete`): how
many of the lightweight model's own top (a, b) prefixes join the cached ones (``own_prefixes``), the
weight of the offline prefix log-prob (``prefix_weight``), the offline score given to own prefixes
(``own_floor``) and the weight of the entries' item log-probs (``item_weight``; entries written with
``refresh --items N``). This module scores a
grid of them on validation users whose entries an offline refresh wrote from the history one
interaction staler than the validation history (``refresh --holdout 3``), next to the lightweight
model alone, and writes every row plus the best setting to a JSON file. Test numbers then come from
`python -m evaluation think-ahead` with the chosen setting and the ``--holdout 2`` entries.

The OneRec checkpoint must not have seen the validation targets: use the selection run (trained on
the train part), not the ``--refit`` one (train + valid), whose validation numbers are inflated; the
module refuses a checkpoint whose ``train_args.json`` says ``refit``.

    python -m offline_worker refresh --holdout 3 --namespace val3
    python -m evaluation.tune --checkpoint artifacts/onerec/text_cf-item-cos20 --namespace val3
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from evaluation.think_ahead import ThinkAheadRecommender, require_staler, train_popularity
from model.onerec import OneRec, OneRecRecommender
from model.policy import PolicyConfig
from services.catalog import Example
from services.store import ThinkEntry


class CachedSource:
    """Entries fetched once per user id (the grid reads the same users many times)."""

    def __init__(self, entries: dict[int, ThinkEntry | None]):
        self.entries = entries

    def __call__(self, examples: Sequence[Example]) -> list[ThinkEntry | None]:
        return [self.entries.get(e.user_id) for e in examples]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def grid(own: Sequence[int], weights: Sequence[float], floors: Sequence[float],
         item_weights: Sequence[float] = (0.0,)) -> list[tuple[int, float, float, float]]:
    """Distinct settings (own, prefix weight, floor, item weight): the floor only matters with own prefixes and a
    non-zero prefix weight."""
    out: list[tuple[int, float, float, float]] = []
    for n, w, f, iw in itertools.product(own, weights, floors, item_weights):
        f = f if n > 0 and w != 0 else 0.0
        if (n, w, f, iw) not in out:
            out.append((n, w, f, iw))
    return out


def main(argv: list[str] | None = None) -> None:
    """``python -m evaluation.tune``: grid over the completion knobs on validation users."""
    from model.metrics import paired_comparison, rank, score, split_examples
    from services.catalog import load_dataset
    from services.config import get_settings
    from services.store import ThinkStore
    from services.store.connect import connect

    s = get_settings()
    p = argparse.ArgumentParser(prog="python -m evaluation.tune", description=main.__doc__)
    p.add_argument("--checkpoint", type=Path, default=None, help="OneRec folder (default: artifacts/onerec/current)")
    p.add_argument("--redis-url", default=s.redis_url, help="Redis holding the --holdout 3 entries")
    p.add_argument("--namespace", default=s.namespace, help="key namespace of those entries")
    p.add_argument("--version", default=None, help="think version (default: the live one)")
    p.add_argument("--limit", type=int, default=None, help="first N validation users only")
    p.add_argument("--beam", type=int, default=s.beam, help="beam width (default: the served ONEREC_BEAM)")
    p.add_argument("--own", type=_ints, default=[0, 16, 20, 32], help="own-prefix counts, comma separated")
    p.add_argument("--weights", type=_floats, default=[0.0, 0.1, 0.25, 0.5, 1.0], help="prefix weights")
    p.add_argument("--floors", type=_floats, default=[0.0], help="own-prefix floors")
    p.add_argument("--item-weights", type=_floats, default=[0.0],
                   help="weights of the entries' item log-probs (entries from refresh --items N)")
    p.add_argument("--out", type=Path, default=Path("docs/think/think_ahead_tuning.json"))
    args = p.parse_args(argv)

    ds = load_dataset(s.data_dir)
    examples = split_examples(ds, "valid", args.limit)
    store = ThinkStore(connect(args.redis_url), args.namespace)
    version = args.version or store.current_version()
    if version is None:
        raise SystemExit(f"no live think version in namespace {args.namespace!r}")
    entries = {e.user_id: store.get_entry(version, e.user_id) for e in examples}
    require_staler(ds.sequences, examples, [entries[e.user_id] for e in examples], "valid")
    coverage = sum(1 for en in entries.values() if en is not None and en.prefixes) / len(examples)
    checkpoint = args.checkpoint or s.resolved("onerec")
    train_args = Path(checkpoint) / "train_args.json"
    if train_args.is_file() and str(json.loads(train_args.read_text()).get("refit", "")).lower() == "true":
        raise SystemExit(f"{checkpoint} was refit on train + valid: its validation numbers are inflated; "
                         "pass the selection checkpoint (trained on the train part) with --checkpoint")
    onerec = OneRec.load(checkpoint)
    source = CachedSource(entries)
    rows: list[dict[str, object]] = []
    targets = [e.target for e in examples]
    ranked_base = rank(OneRecRecommender(onerec, args.beam), examples, desc="onerec")
    base = score(ranked_base, targets)
    ranked: list[list[list[int]]] = []
    popularity = train_popularity(ds.sequences, "valid", {int(i) for i in onerec.sid.item_ids})
    with_items = sum(1 for en in entries.values() if en is not None and en.items)
    if any(args.item_weights) and not with_items:
        raise SystemExit(f"--item-weights: no entry of version {version} holds items (refresh with --items N)")
    for n, w, f, iw in grid(args.own, args.weights, args.floors, args.item_weights):
        t0 = time.perf_counter()
        # the served policy (consumed-item rule and fill included) with this grid point's completion knobs
        policy = PolicyConfig.from_settings(s, beam=args.beam, prefix_weight=w, own_prefixes=n, own_prefix_floor=f,
                                            item_weight=iw)
        ranked.append(rank(ThinkAheadRecommender(onerec, source, policy, popularity), examples,
                           desc=f"own={n} w={w} floor={f} item={iw}"))  # fmt: skip
        rows.append({"own_prefixes": n, "prefix_weight": w, "own_floor": f, "item_weight": iw,
                     "metrics": score(ranked[-1], targets),
                     "vs_onerec": paired_comparison(ranked[-1], ranked_base, targets),
                     "seconds": round(time.perf_counter() - t0, 1)})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    i_best = max(range(len(rows)), key=lambda i: (rows[i]["metrics"]["recall@10"], rows[i]["metrics"]["ndcg@10"]))  # type: ignore[index]
    best = rows[i_best]
    # how sure is the choice? every other setting against the best on the same users (a = best)
    for i, r in enumerate(rows):
        if i != i_best:
            r["best_vs_this"] = paired_comparison(ranked[i_best], ranked[i], targets)
    cmd = " ".join(["python -m evaluation.tune", *(argv if argv is not None else sys.argv[1:])])
    out = {"split": "valid", "users": len(examples), "version": version, "coverage": round(coverage, 4),
           "entries_with_items": with_items,
           "beam": args.beam, "onerec": base, "rows": rows, "best": best,
           "command": cmd}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({"onerec": base, "best": best}, indent=2))


if __name__ == "__main__":
    main()
