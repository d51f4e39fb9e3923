"""Prefix recall: does the (a, b) prefix set the offline tier caches contain the target's prefix?

Think-Ahead can only serve items under the cached prefixes (plus, by the serving default, the online
model's own top prefixes), so the share of users whose target prefix is cached bounds what the
offline tier adds. `prefix_hits` / `prefix_recall` are the pure metric; the command measures it per
test user for the OneRec-Think model (its top-P prefixes from the constrained two-level code beam,
and from the item head's probability mass per prefix) and for the online OneRec's own top-P (the
same rule as `OneRec.complete(own_prefixes=P)`), with the paired comparison of `model.evaluate`:

    python -m model.think.prefix_recall --checkpoint artifacts/think/seq-refit \
        --onerec artifacts/onerec/current --p 16,32,64 --sample 2000 --out-json docs/think/prefix_recall.json

`--stale` feeds the think model the history without its newest item (what the offline tier saw at
refresh time); the online model always reads the fresh history. Not here: the offline engine.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import torch

Prefix = tuple[int, int]


def prefix_hits(cached: Sequence[Collection[Prefix]], targets: Sequence[Prefix]) -> list[bool]:
    """Per user: is the target's (a, b) in the user's cached prefix set?"""
    if len(cached) != len(targets):
        raise ValueError(f"{len(cached)} prefix sets for {len(targets)} targets")
    return [tuple(t) in {tuple(p) for p in c} for c, t in zip(cached, targets, strict=True)]


def prefix_recall(cached: Sequence[Collection[Prefix]], targets: Sequence[Prefix]) -> dict[str, Any]:
    """Share of users whose target prefix is cached, with the per-user hits and the mean set size."""
    hits = prefix_hits(cached, targets)
    if not hits:
        raise ValueError("no users")
    return {"users": len(hits), "hits": sum(hits), "recall": round(sum(hits) / len(hits), 6),
            "mean_set_size": round(sum(len(set(map(tuple, c))) for c in cached) / len(hits), 2),
            "per_user": hits}


# --------------------------------------------------------------------------------------------
# top-P prefixes of each model


@torch.no_grad()
def think_prefixes(rec: Any, histories: Sequence[Sequence[int]], p_max: int, batch_size: int = 64
                   ) -> dict[str, list[list[Prefix]]]:
    """Top-`p_max` (a, b) per user, best first: ``codes`` (two-level constrained beam, log p(a) + log p(b|a))
    and, when the folder has an item head, ``item_head`` (log of the head's probability mass per prefix)."""
    from model.think.itemhead import prefix_scores

    dec = rec.decoder
    out: dict[str, list[list[Prefix]]] = {"codes": [[] for _ in histories]}
    if dec.item_head is not None:
        out["item_head"] = [[] for _ in histories]
    order = sorted(range(len(histories)), key=lambda i: len(histories[i]))
    for s in range(0, len(order), batch_size):
        chunk = order[s : s + batch_size]
        b = dec.prefill(dec.encode_prefixes([rec.prefix(histories[i]) for i in chunk], rec.max_len))
        if rec.think:
            dec.reason(b, rec.max_think)
            dec.close_think(b)
        hidden = b.hidden
        beams = dec.beam_codes(b, p_max, levels=2)
        for j, i in enumerate(chunk):
            out["codes"][i] = [(int(c[0]), int(c[1])) for c, sc in zip(beams.codes[j], beams.scores[j], strict=True)
                               if math.isfinite(float(sc))]
        if dec.item_head is not None and hidden is not None:
            pref, sc = prefix_scores(dec.item_head.logits(hidden), rec.sid)
            top = sc.topk(min(p_max, sc.shape[1]), dim=1).indices.tolist()
            for j, i in enumerate(chunk):
                out["item_head"][i] = [(int(pref[x][0]), int(pref[x][1])) for x in top[j]]
    return out


@torch.no_grad()
def onerec_prefixes(onerec: Any, histories: Sequence[Sequence[int]], p_max: int, batch_size: int = 256
                    ) -> list[list[Prefix]]:
    """The online OneRec's own top-`p_max` (a, b) per user: top-P level-a codes, then the best P pairs by
    log p(a) + log p(b|a) over the trie (the rule of `OneRec.complete(own_prefixes=P)`)."""
    K = onerec.K
    out: list[list[Prefix]] = []
    for s in range(0, len(histories), batch_size):
        hist = histories[s : s + batch_size]
        h = onerec._last_hidden(hist)  # (B, D)
        B = h.shape[0]
        la = onerec.net.level_logits(h, h.new_zeros(B, 0, dtype=torch.long), 0)  # (B, K)
        la = torch.log_softmax(la.masked_fill(onerec.child[0][0] < 0, -math.inf), -1)
        n = min(p_max, K)
        top_a, a = la.topk(n, dim=1)  # (B, n)
        lb = onerec.net.level_logits(h[:, None].expand(B, n, -1).reshape(B * n, -1), a.reshape(-1, 1), 1)
        node = onerec.child[0][0][a.reshape(-1)]  # (B*n,) level-b node of each a
        lb = torch.log_softmax(lb.masked_fill(onerec.child[1][node.clamp(min=0)] < 0, -math.inf), -1)
        total = (top_a.reshape(-1, 1) + lb).reshape(B, n * K).nan_to_num(nan=-math.inf)
        sc, idx = total.topk(min(p_max, n * K), dim=1)
        a_l, idx_l, sc_l = a.tolist(), idx.tolist(), sc.tolist()
        out += [[(a_l[u][x // K], x % K) for x, v in zip(idx_l[u], sc_l[u], strict=True) if v > -math.inf]
                for u in range(B)]
    return out


def main(argv: list[str] | None = None) -> None:
    from model.evaluate import paired_comparison
    from model.think.evaluate import ThinkRecommender, subset
    from services.catalog import load_dataset
    from services.config import get_settings

    s = get_settings()
    p = argparse.ArgumentParser(prog="python -m model.think.prefix_recall", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", type=Path, default=s.resolved("think"), help="OneRec-Think folder")
    p.add_argument("--onerec", type=Path, default=s.resolved("onerec"), help="online OneRec checkpoint ('' = skip)")
    p.add_argument("--data-dir", type=Path, default=s.data_dir, help="dataset folder")
    p.add_argument("--split", choices=["valid", "test"], default="test", help="held-out item")
    p.add_argument("--p", default="16,32,64", help="comma list of cached set sizes P (served: T x m = 2 x 16)")
    p.add_argument("--mode", choices=["think", "direct", "auto"], default="auto", help="think model mode")
    p.add_argument("--stale", action="store_true", help="think model reads the history without its newest item")
    p.add_argument("--sample", type=int, default=None, help="fixed random subset of N users (default all)")
    p.add_argument("--seed", type=int, default=0, help="subset seed")
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument("--out-json", type=Path, default=None, help="write the summary here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    ps = sorted(int(x) for x in args.p.split(","))
    ds = load_dataset(args.data_dir)
    ex = subset(ds.splits.test if args.split == "test" else ds.splits.valid, args.sample, args.seed)
    rec = ThinkRecommender.load(args.checkpoint, think={"think": True, "direct": False, "auto": None}[args.mode])
    K = rec.sid.codebook_size
    targets: list[Prefix] = [(int(rec.sid.codes_of(e.target)[0]), int(rec.sid.codes_of(e.target)[1])) for e in ex]
    t0 = time.perf_counter()
    hists = [e.history[:-1] if args.stale and len(e.history) > 1 else e.history for e in ex]
    sets = {f"think_{k}": v for k, v in think_prefixes(rec, hists, max(ps)).items()}
    secs = {"think": round(time.perf_counter() - t0, 1)}
    if str(args.onerec):
        from model.onerec import OneRec

        t0 = time.perf_counter()
        sets["onerec"] = onerec_prefixes(OneRec.load(args.onerec), [e.history for e in ex], max(ps))
        secs["onerec"] = round(time.perf_counter() - t0, 1)
    flat = [a * K + b for a, b in targets]
    doc: dict[str, Any] = {"checkpoint": str(args.checkpoint), "onerec": str(args.onerec), "split": args.split,
                           "users": len(ex), "sample": args.sample, "stale": args.stale,
                           "think_mode": "think" if rec.think else "direct", "seconds": secs, "recall": {},
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
    print(json.dumps(doc, indent=2))
    if args.out_json:
        args.out_json.parent.mkdir(parents=True, exist_ok=True)
        args.out_json.write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
