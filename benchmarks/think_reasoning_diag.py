"""Diagnostic for the ablation: does the reasoning name the right category, and does it steer the item?

For a fixed random subset of test users it measures, per checkpoint:
- ``level_a@1``: the top-ranked item's first code equals the target's (direct or think mode, as evaluated);
- ``reason_label_acc`` (think mode): the category label after ``next:`` in the greedy reasoning equals
  the target's level-a label (labels from `model.think.align_data.category_labels`);
- ``item_follows_reason``: the top item's level-a label equals the label the reasoning named.

    python -m benchmarks.think_reasoning_diag artifacts/think/tiny-ia artifacts/think/tiny-act --users 500

Prints JSON; writes nothing under docs/results (it is evidence for docs/THINK.md, not a headline metric).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from model.metrics import subset
from model.think.align_data import category_labels, label_of
from model.think.recommender import ThinkRecommender
from services.catalog import load_dataset

_NEXT = re.compile(r"next:\s*([^.]+)\.")


def diagnose(folder: Path, data_dir: Path, users: int, seed: int) -> dict:
    ds = load_dataset(data_dir)
    ex = subset(ds.splits.test, users, seed)
    rec = ThinkRecommender.load(folder, beam=10)
    labels = category_labels(ds.catalog, rec.sid)
    ranked = rec.recommend(ex, 10)
    a_hit = named_ok = follows = named = 0
    for e, r in zip(ex, ranked, strict=True):
        tgt = rec.sid.codes_of(e.target)
        top = rec.sid.codes_of(r[0]) if r else None
        a_hit += int(top is not None and top[0] == tgt[0])
        if rec.think:
            m = _NEXT.search(rec.reasoning.get(e.user_id, ""))
            if m:
                named += 1
                said = m.group(1).strip()
                named_ok += int(said == label_of(labels, tgt))
                follows += int(top is not None and said == label_of(labels, top))
    n = len(ex)
    out = {"checkpoint": str(folder), "mode": "think" if rec.think else "direct", "users": n,
           "level_a@1": round(a_hit / n, 4)}
    if rec.think:
        out |= {"reason_names_label": round(named / n, 4), "reason_label_acc": round(named_ok / n, 4),
                "item_follows_reason": round(follows / max(named, 1), 4)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoints", nargs="+", type=Path, help="OneRec-Think folders")
    p.add_argument("--data-dir", type=Path, default=Path("data/beauty"), help="dataset folder")
    p.add_argument("--users", type=int, default=500, help="fixed random subset of test users")
    p.add_argument("--seed", type=int, default=0, help="subset seed")
    args = p.parse_args()
    for c in args.checkpoints:
        print(json.dumps(diagnose(c, args.data_dir, args.users, args.seed)))


if __name__ == "__main__":
    main()
