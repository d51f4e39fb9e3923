"""``python -m evaluation prefix-recall``: does the (a, b) prefix set the offline tier caches contain the
target's prefix?

Think-Ahead can only serve items under the cached prefixes (plus, by the serving default, the online
model's own top prefixes), so the share of users whose target prefix is cached bounds what the
offline tier adds. The command measures it (`model.metrics.prefix_recall`) per test user for the
OneRec-Think model (`ThinkRecommender.top_prefixes`: its top-P prefixes from the constrained two-level
code beam, and from the item head's probability mass per prefix) and for the online OneRec's own top-P
(`OneRec.own_prefixes`, the rule of `OneRec.complete(own_prefixes=P)`), with the paired comparison of
`model.metrics`:

    python -m evaluation prefix-recall --checkpoint artifacts/think/seq-refit \
        --onerec artifacts/onerec/current --p 16,32,64 --sample 2000 --out-json docs/think/prefix_recall.json

`--stale` feeds the think model the history without its newest item (what the offline tier saw at
refresh time); the online model reads the fresh history, and with `--onerec-stale` also the staler one (the
same information as the think model: what staleness alone costs). `--checkpoint ''` skips the think model.
`--mix W` adds the ranking ``think_mix``: the think item head's prefix mass mixed with the online model's own (a, b)
distribution from the same staler history, ``W p_think + (1 - W) p_online`` (`online_ranked_prefixes`): what an offline
tier that also ran the online model at refresh time could cache. `--contrast B` adds ``think_contrast``: the head's
prefixes ranked by log p_think - B log p_online from the staler history (`online_ranked_prefixes`, the refresh's
`--contrast` rule). `--union-own N` also measures what the served completion can reach: each ranking's top-P joined
with the online model's own top-N from the fresh history (the serving default adds N = 32), paired against the online
model's own top-(P + N) (as many prefixes without the offline tier; the union counts a prefix both sets hold once,
so it may be smaller).
Not here: the offline engine, the metric.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from model.metrics import PrefixCodes, paired_comparison, prefix_recall, subset
from model.onerec import OneRec
from model.think.itemhead import rank_with_online
from model.think.recommender import ThinkRecommender
from services.catalog import load_dataset


def onerec_prefixes(onerec: OneRec, histories: Sequence[Sequence[int]], p_max: int, batch_size: int = 256
                    ) -> list[list[PrefixCodes]]:
    """`OneRec.own_prefixes` over all users, `batch_size` users at a time (bounded memory)."""
    out: list[list[PrefixCodes]] = []
    for s in range(0, len(histories), batch_size):
        out += onerec.own_prefixes(histories[s : s + batch_size], p_max)
    return out


def online_ranked_prefixes(rec: ThinkRecommender, onerec: OneRec, histories: Sequence[Sequence[int]], p_max: int,
                           weight: float = 0.5, contrast: float = 0.0, batch_size: int = 512
                           ) -> list[list[PrefixCodes]]:
    """Top-`p_max` (a, b) per user by the refresh's rule with the online model (`rank_with_online`): the think head's
    prefix mass mixed with the online model's p(a) p(b|a) at think weight `weight`, or with `contrast` > 0 ranked by
    log p_think - `contrast` log p_online; both from `histories`, `batch_size` users at a time (two (B, M) score
    matrices). A prefix whose stored score is -inf is dropped, as the refresh drops it."""
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"mix weight must be in [0, 1], got {weight}")
    out: list[list[PrefixCodes]] = []
    for s in range(0, len(histories), batch_size):
        chunk = histories[s : s + batch_size]
        pref, think = rec.prefix_logmass(chunk)
        rank, stored = rank_with_online(think, onerec.prefix_logprobs(chunk, pref), weight, contrast)
        idx = rank.topk(min(p_max, rank.shape[1]), dim=1).indices
        out += [[(int(pref[i][0]), int(pref[i][1])) for i, v in zip(row, val, strict=True) if v > -math.inf]
                for row, val in zip(idx.tolist(), stored.gather(1, idx).tolist(), strict=True)]
    return out


def union_sets(ranked: Sequence[Sequence[int]], own: Sequence[Sequence[int]], p: int, n: int) -> list[list[int]]:
    """Per user, the first `p` of `ranked` joined with the first `n` of `own` (flat prefix ids), own ones first,
    duplicates once."""
    return [list(dict.fromkeys([*o[:n], *r[:p]])) for r, o in zip(ranked, own, strict=True)]


def main(argv: list[str] | None = None) -> None:
    from services.config import get_settings

    s = get_settings()
    p = argparse.ArgumentParser(prog="python -m evaluation prefix-recall", description=__doc__.split("\n")[0])
    # str, not Path: Path('') is '.', and '' means "skip this model"
    p.add_argument("--checkpoint", default=str(s.resolved("think")), help="OneRec-Think folder ('' = skip)")
    p.add_argument("--onerec", default=str(s.resolved("onerec")), help="online OneRec checkpoint ('' = skip)")
    p.add_argument("--data-dir", type=Path, default=s.data_dir, help="dataset folder")
    p.add_argument("--split", choices=["valid", "test"], default="test", help="held-out item")
    p.add_argument("--p", default="16,32,64", help="comma list of cached set sizes P (served: T x m = 2 x 16)")
    p.add_argument("--mode", choices=["think", "direct", "auto"], default="auto", help="think model mode")
    p.add_argument("--stale", action="store_true", help="think model reads the history without its newest item")
    p.add_argument("--onerec-stale", action="store_true",
                   help="also the online model's own top-P from the staler history (what it would cache itself)")
    p.add_argument("--mix", type=float, default=None, metavar="W",
                   help="also the think head's prefix mass mixed with the online model's, both from the staler "
                        "history, at weight W for the think model (needs --checkpoint with an item head and --onerec)")
    p.add_argument("--contrast", type=float, default=None, metavar="B",
                   help="also the think head's prefixes ranked by log p_think - B log p_online, both from the staler "
                        "history (the refresh's --contrast; needs --checkpoint and --onerec)")
    p.add_argument("--union-own", type=int, default=None, metavar="N",
                   help="also each ranking's top-P joined with the online model's own top-N from the fresh history, "
                        "paired against the online model's own top-(P + N)")
    p.add_argument("--sample", type=int, default=None, help="fixed random subset of N users (default all)")
    p.add_argument("--seed", type=int, default=0, help="subset seed")
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument("--out-json", type=Path, default=None, help="write the summary here")
    p.add_argument("--results", action="store_true",
                   help="also write the dataset's results file think_prefix_recall.json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    ps = sorted(int(x) for x in args.p.split(","))
    ds = load_dataset(args.data_dir)
    ex = subset(ds.splits.test if args.split == "test" else ds.splits.valid, args.sample, args.seed)
    stale = [e.history[:-1] if len(e.history) > 1 else e.history for e in ex]
    sets: dict[str, list[list[PrefixCodes]]] = {}
    secs: dict[str, float] = {}
    rec = None
    if args.checkpoint:  # '' = the online model only (with --onerec-stale: the staleness cost alone)
        rec = ThinkRecommender.load(args.checkpoint, think={"think": True, "direct": False, "auto": None}[args.mode])
        t0 = time.perf_counter()
        sets |= {f"think_{k}": v for k, v in
                 rec.top_prefixes(stale if args.stale else [e.history for e in ex], max(ps)).items()}
        secs["think"] = round(time.perf_counter() - t0, 1)
    onerec = OneRec.load(args.onerec) if args.onerec else None
    if onerec is not None:
        t0 = time.perf_counter()
        sets["onerec"] = onerec_prefixes(onerec, [e.history for e in ex], max(ps) + (args.union_own or 0))
        secs["onerec"] = round(time.perf_counter() - t0, 1)
        if args.onerec_stale:
            sets["onerec_stale"] = onerec_prefixes(onerec, stale, max(ps))
    if args.mix is not None:
        if rec is None or onerec is None:
            raise SystemExit("--mix needs both --checkpoint and --onerec")
        if not 0.0 <= args.mix <= 1.0:
            raise SystemExit(f"--mix must be in [0, 1], got {args.mix}")
        t0 = time.perf_counter()
        sets["think_mix"] = online_ranked_prefixes(rec, onerec, stale if args.stale else [e.history for e in ex],
                                                   max(ps), weight=args.mix)
        secs["think_mix"] = round(time.perf_counter() - t0, 1)
    if args.contrast is not None:
        if rec is None or onerec is None:
            raise SystemExit("--contrast needs both --checkpoint and --onerec")
        if args.contrast < 0:
            raise SystemExit(f"--contrast must be >= 0, got {args.contrast}")
        t0 = time.perf_counter()
        sets["think_contrast"] = online_ranked_prefixes(rec, onerec, stale if args.stale else [e.history for e in ex],
                                                        max(ps), contrast=args.contrast)
        secs["think_contrast"] = round(time.perf_counter() - t0, 1)
    if args.union_own is not None and (onerec is None or args.union_own < 1):
        raise SystemExit("--union-own N needs --onerec and N >= 1")
    sid = rec.sid if rec is not None else onerec.sid if onerec is not None else None
    if sid is None:
        raise SystemExit("nothing to measure: give --checkpoint and/or --onerec")
    K = sid.codebook_size
    targets: list[PrefixCodes] = [(int(sid.codes_of(e.target)[0]), int(sid.codes_of(e.target)[1])) for e in ex]
    flat = [a * K + b for a, b in targets]
    doc: dict[str, Any] = {"checkpoint": str(args.checkpoint), "onerec": str(args.onerec), "split": args.split,
                           "users": len(ex), "sample": args.sample, "stale": args.stale,
                           "think_mode": None if rec is None else "think" if rec.think else "direct",
                           "mix": args.mix, "contrast": args.contrast, "union_own": args.union_own,
                           "seconds": secs, "recall": {},
                           "paired": {}}
    for P in ps:
        for name, v in sets.items():
            doc["recall"][f"{name}@{P}"] = {k: x for k, x in prefix_recall([c[:P] for c in v], targets).items()
                                            if k != "per_user"}
        if "onerec" in sets:
            for name in (n for n in sets if n != "onerec"):
                ranked_a = [[a * K + b for a, b in c[:P]] for c in sets[name]]
                ranked_b = [[a * K + b for a, b in c[:P]] for c in sets["onerec"]]
                pc = paired_comparison(ranked_a, ranked_b, flat, k=P)
                doc["paired"][f"{name}_vs_onerec@{P}"] = {k: v for k, v in pc.items() if not k.startswith("ndcg")}
        if args.union_own:
            doc.setdefault("union", {})
            N = args.union_own
            own = [[a * K + b for a, b in c] for c in sets["onerec"]]
            for name in (n for n in sets if n != "onerec"):
                joined = union_sets([[a * K + b for a, b in c] for c in sets[name]], own, P, N)
                pc = paired_comparison(joined, [o[: P + N] for o in own], flat, k=P + N)
                doc["union"][f"{name}+own{N}_vs_onerec@{P + N}"] = {k: v for k, v in pc.items()
                                                                    if not k.startswith("ndcg")}
    print(json.dumps(doc, indent=2))
    if args.out_json:
        args.out_json.parent.mkdir(parents=True, exist_ok=True)
        args.out_json.write_text(json.dumps(doc, indent=2) + "\n")
    if args.results:
        from services.catalog import dataset_name
        from services.results import write_result

        write_result("think_prefix_recall", result_metrics(doc), note=result_note(doc),
                     dataset=dataset_name(args.data_dir))


def result_metrics(doc: dict[str, Any]) -> dict[str, Any]:
    """The results-file metrics of a summary: recall per ranking and P, each think ranking minus the online model's
    own top-P (paired, 95% bootstrap interval), and with `--union-own` each union minus the own top-(P + N)."""
    out: dict[str, Any] = {"users": doc["users"]}
    for key, r in doc["recall"].items():
        name, p = key.rsplit("@", 1)
        out[f"{name}_recall@{p}"] = r["recall"]
    for key, pc in doc["paired"].items():
        name, p = key.rsplit("@", 1)
        out[f"{name}_diff@{p}"] = pc[f"recall@{p}_diff"]
        out[f"{name}_diff_ci95@{p}"] = pc[f"recall@{p}_diff_ci95"]
    for key, pc in doc.get("union", {}).items():  # --union-own: cached + own top-N vs own top-(P + N)
        name, p = key.rsplit("@", 1)
        out[f"{name}_diff@{p}"] = pc[f"recall@{p}_diff"]
        out[f"{name}_diff_ci95@{p}"] = pc[f"recall@{p}_diff_ci95"]
    return out


def result_note(doc: dict[str, Any]) -> str:
    stale = "think model reads the history without its newest item (the refresh's view); " if doc["stale"] else ""
    return (f"split={doc['split']}, {doc['users']} users, think mode {doc['think_mode']}, {stale}online model: own "
            f"top-P from the fresh history (the served rule); think={Path(doc['checkpoint']).name}, "
            f"onerec={Path(doc['onerec']).name}")


if __name__ == "__main__":
    main()
