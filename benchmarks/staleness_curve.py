"""The staleness curve: think-ahead quality when the cached entry missed 0, 1, 2, 3, 5 interactions.

Test split of a dataset (Beauty by default), on a fixed subset: the first ``--users`` users (by id) whose
sequence has at least ``--min-len`` items (long enough for the stalest entry to keep a history). An entry
``s`` interactions stale for the test target is computed from ``sequence[:-(2 + s)]``, i.e. by

    python -m offline_worker --namespace NS_s{s} refresh --holdout {2 + s} --data SUBSET ...

one namespace per staleness (``--prefix NS_`` here). The online tier always completes with the fresh
history ``sequence[:-1]``, through the served policy (`evaluation.think_ahead.ThinkAheadRecommender`).
Reported per staleness: Recall/NDCG@10, and paired comparisons (bootstrap CI, McNemar) against the fresh
entry (s = 0) and against online-only (no entry). The default threshold of the incremental refresh is
derived from it (`derive_threshold`). Writes docs/results/staleness.json and docs/staleness.svg.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from evaluation.think_ahead import StoreSource, ThinkAheadRecommender, train_popularity
from model.metrics import paired_comparison, rank, score, split_examples
from model.onerec import OneRec
from model.policy import PolicyConfig
from services.catalog import Example, dataset_name, load_dataset
from services.config import get_settings
from services.results import write_result
from services.store import ThinkEntry, ThinkStore
from services.store.connect import connect

ROOT = Path(__file__).resolve().parent.parent
STALENESS = (0, 1, 2, 3, 5)


def subset(sequences: dict[int, list[int]], users: int, min_len: int) -> list[int]:
    return [u for u in sorted(sequences) if len(sequences[u]) >= min_len][:users]


def derive_threshold(curve: dict[int, dict[str, Any]]) -> tuple[int, str]:
    """The smallest staleness whose entries are measurably worse than fresh ones (paired NDCG@10 or
    Recall@10 interval below 0); else the smallest one that lost half of the fresh entry's gain over
    online-only; else the stalest measured. Returns (threshold, the rule that fired)."""
    fresh_gain = curve[0]["gain_over_online_only_ndcg@10"]
    for s in sorted(curve):
        if s == 0:
            continue
        vs = curve[s]["vs_fresh"]
        if vs["ndcg@10_diff_ci95"][1] < 0 or vs["recall@10_diff_ci95"][1] < 0:
            return s, f"first staleness measurably worse than a fresh entry (s={s})"
    for s in sorted(curve):
        if s and fresh_gain > 0 and curve[s]["gain_over_online_only_ndcg@10"] <= fresh_gain / 2:
            return s, f"first staleness that lost half the fresh gain over online-only (s={s})"
    return max(curve), "no measured staleness is worse than fresh: the stalest measured"


def svg(curve: dict[int, dict[str, Any]], online: dict[str, float], threshold: int, title: str) -> str:
    """A small line chart: R@10 and N@10 against staleness, online-only as dashed lines."""
    w, h, left, right, top, bottom = 560, 320, 60, 150, 40, 50
    xs = sorted(curve)
    vals = [curve[s][m] for s in xs for m in ("recall@10", "ndcg@10")] + [online["recall@10"], online["ndcg@10"]]
    lo, hi = min(vals) * 0.9, max(vals) * 1.05

    def px(s: float) -> float:
        return left + (s - xs[0]) / (xs[-1] - xs[0]) * (w - left - right)

    def py(v: float) -> float:
        return top + (hi - v) / (hi - lo) * (h - top - bottom)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" '
           f'font-size="12"><rect width="{w}" height="{h}" fill="white"/>',
           f'<text x="{left}" y="20" font-size="14">{title}</text>',
           f'<line x1="{left}" y1="{h - bottom}" x2="{w - right}" y2="{h - bottom}" stroke="black"/>',
           f'<line x1="{left}" y1="{top}" x2="{left}" y2="{h - bottom}" stroke="black"/>']  # fmt: skip
    for s in xs:
        out.append(f'<text x="{px(s):.1f}" y="{h - bottom + 16}" text-anchor="middle">{s}</text>')
    out.append(f'<text x="{(left + w - right) / 2:.0f}" y="{h - 10}" text-anchor="middle">'
               "interactions the cached entry has not seen</text>")
    for i in range(5):
        v = lo + (hi - lo) * i / 4
        out.append(f'<text x="{left - 6}" y="{py(v) + 4:.1f}" text-anchor="end">{v:.3f}</text>')
        out.append(f'<line x1="{left}" y1="{py(v):.1f}" x2="{w - right}" y2="{py(v):.1f}" stroke="#eee"/>')
    out.append(f'<line x1="{px(threshold):.1f}" y1="{top}" x2="{px(threshold):.1f}" y2="{h - bottom}" '
               f'stroke="#999" stroke-dasharray="2,3"/><text x="{px(threshold) + 4:.1f}" y="{top + 12}" '
               f'fill="#666">default threshold</text>')
    for i, (metric, color) in enumerate((("recall@10", "#1f77b4"), ("ndcg@10", "#d62728"))):
        pts = " ".join(f"{px(s):.1f},{py(curve[s][metric]):.1f}" for s in xs)
        out.append(f'<polyline points="{pts}" fill="none" stroke="{color}" stroke-width="2"/>')
        out += [f'<circle cx="{px(s):.1f}" cy="{py(curve[s][metric]):.1f}" r="3" fill="{color}"/>' for s in xs]
        y = py(online[metric])
        out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{w - right}" y2="{y:.1f}" stroke="{color}" '
                   'stroke-dasharray="6,4"/>')
        out.append(f'<text x="{w - right + 8}" y="{top + 20 + 36 * i}" fill="{color}">think-ahead {metric}</text>')
        out.append(f'<text x="{w - right + 8}" y="{top + 36 + 36 * i}" fill="{color}">- - online-only</text>')
    return "\n".join(out + ["</svg>"]) + "\n"


def main(argv: list[str] | None = None) -> None:
    s = get_settings()
    p = argparse.ArgumentParser(prog="python -m benchmarks.staleness_curve", description=__doc__.split("\n\n")[0])
    p.add_argument("--redis-url", required=True, help="Redis holding one namespace per staleness")
    p.add_argument("--prefix", required=True, help="namespaces are PREFIX + 's0', 's1', ...")
    p.add_argument("--checkpoint", type=Path, default=None, help="OneRec folder (default: artifacts/onerec/current)")
    p.add_argument("--data-dir", type=Path, default=s.data_dir, help="full dataset folder")
    p.add_argument("--users", type=int, default=1500, help="first N users (by id) with a long enough sequence")
    p.add_argument("--min-len", type=int, default=10, help="minimum sequence length of the subset")
    p.add_argument("--think-model", default="", help="the think model's name (recorded only)")
    p.add_argument("--no-results", action="store_true", help="print only")
    args = p.parse_args(argv)

    ds = load_dataset(args.data_dir)
    keep = set(subset(ds.sequences, args.users, args.min_len))
    examples = [e for e in split_examples(ds, "test") if e.user_id in keep]
    targets = [e.target for e in examples]
    onerec = OneRec.load(args.checkpoint or s.resolved("onerec"))
    policy = PolicyConfig.from_settings(s)
    popularity = train_popularity(ds.sequences, "test", {int(i) for i in onerec.sid.item_ids})
    client = connect(args.redis_url)

    def no_entries(ex: Sequence[Example]) -> list[ThinkEntry | None]:
        return [None for _ in ex]

    online_ranked = rank(ThinkAheadRecommender(onerec, no_entries, policy, popularity), examples, desc="online-only")
    online = score(online_ranked, targets)
    ranked: dict[int, list[list[int]]] = {}
    curve: dict[int, dict[str, Any]] = {}
    for st in STALENESS:
        source = StoreSource(ThinkStore(client, f"{args.prefix}s{st}"))
        entries = source(examples)
        wrong = [(e.user_id, en.history_len) for e, en in zip(examples, entries, strict=True)
                 if en is None or en.history_len != len(ds.sequences[e.user_id]) - 2 - st]  # fmt: skip
        if wrong:
            raise SystemExit(f"s={st}: {len(wrong)} entries missing or not {st} interactions stale, e.g. {wrong[:3]}; "
                             f"run `refresh --holdout {2 + st}` into namespace {args.prefix}s{st}")
        ranked[st] = rank(ThinkAheadRecommender(onerec, source, policy, popularity), examples, desc=f"stale {st}")
        m: dict[str, Any] = {k: v for k, v in score(ranked[st], targets).items() if k.endswith("@10")}
        m["gain_over_online_only_ndcg@10"] = round(m["ndcg@10"] - online["ndcg@10"], 6)
        m["vs_online_only"] = paired_comparison(ranked[st], online_ranked, targets)
        if st:
            m["vs_fresh"] = paired_comparison(ranked[st], ranked[0], targets)
        curve[st] = m
    threshold, rule = derive_threshold(curve)
    metrics: dict[str, Any] = {f"stale_{st}": curve[st] for st in STALENESS}
    metrics.update({"online_only": {k: v for k, v in online.items() if k.endswith("@10")}, "users": len(examples),
                    "default_min_staleness": threshold, "threshold_rule": rule})  # fmt: skip
    print(json.dumps(metrics, indent=2))
    if args.no_results:
        return
    note = (f"test split; users: the first {args.users} {dataset_name(args.data_dir)} users (by id) with "
            f">= {args.min_len} interactions; "
            f"entries s stale = `refresh --holdout 2+s` with think model {args.think_model or '?'}; served policy; "
            "paired: a = stale entry, b = fresh entry / online-only")
    write_result("staleness", metrics, note=note)
    title = f"Think-ahead vs staleness ({dataset_name(args.data_dir)} test, {len(examples)} users)"
    (ROOT / "docs" / "staleness.svg").write_text(svg(curve, online, threshold, title))


if __name__ == "__main__":
    main()
