"""Metrics shared by every quality number: Recall@K / NDCG@K under leave-one-out, and prefix recall.

Protocol: last item = test target, second to last = validation target, history
capped at the last `services.catalog.HISTORY_CAP`, ranking over the whole catalogue. A recommender is anything with
``recommend(examples, k) -> list[list[int]]`` (batched). This module holds the metrics, the paired
comparison, the batched ranking loop, the user subsets and the MostPopular baseline; it imports no model.
Prefix recall (`prefix_recall`) is the share of users whose target's (a, b) prefix is in a cached set.
Not here: the commands (every one is under ``python -m evaluation``), the recommenders (`model.onerec`,
`model.think.recommender`).
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Collection, Sequence
from typing import Any, Protocol

from tqdm import tqdm

from services.catalog import Dataset, Example

KS = (5, 10)
PrefixCodes = tuple[int, int]  # an item's first two codes (a, b), without a score


class Recommender(Protocol):
    def recommend(self, examples: Sequence[Example], k: int) -> list[list[int]]: ...


def recall_at_k(ranked: Sequence[int], target: int, k: int) -> float:
    """1 if the (single) target is in the top k, else 0."""
    return 1.0 if target in list(ranked[:k]) else 0.0


def ndcg_at_k(ranked: Sequence[int], target: int, k: int) -> float:
    """1 / log2(rank + 2) for the target's 0-based rank within the top k (one relevant item: IDCG = 1)."""
    top = list(ranked[:k])
    if target not in top:
        return 0.0
    return 1.0 / math.log2(top.index(target) + 2)


def score(ranked: Sequence[Sequence[int]], targets: Sequence[int], ks: Sequence[int] = KS) -> dict[str, float]:
    """Mean Recall@k and NDCG@k over users."""
    if len(ranked) != len(targets):
        raise ValueError(f"{len(ranked)} rankings for {len(targets)} targets")
    if not targets:
        raise ValueError("no users to evaluate")
    out: dict[str, float] = {}
    for k in ks:
        out[f"recall@{k}"] = sum(recall_at_k(r, t, k) for r, t in zip(ranked, targets, strict=True)) / len(targets)
        out[f"ndcg@{k}"] = sum(ndcg_at_k(r, t, k) for r, t in zip(ranked, targets, strict=True)) / len(targets)
    return {k: round(v, 6) for k, v in sorted(out.items())}


def paired_comparison(ranked_a: Sequence[Sequence[int]], ranked_b: Sequence[Sequence[int]], targets: Sequence[int],
                      k: int = 10, n_boot: int = 2000, seed: int = 0) -> dict[str, object]:
    """Is A better than B on the same users? Mean per-user difference of Recall@k and NDCG@k (A - B) with
    a 95% paired bootstrap interval (users resampled `n_boot` times), the users only A / only B ranks in
    its top k, and McNemar's exact two-sided p-value on those discordant users (Recall@k is a hit or not).
    An interval that contains 0 means the data cannot tell the two apart."""
    import numpy as np
    from scipy.stats import binomtest

    if not len(ranked_a) == len(ranked_b) == len(targets) or not targets:
        raise ValueError(f"paired comparison needs equal, non-empty lists: {len(ranked_a)}, {len(ranked_b)}, "
                         f"{len(targets)}")  # fmt: skip
    rec = np.array([[recall_at_k(r, t, k) for r, t in zip(rk, targets, strict=True)] for rk in (ranked_a, ranked_b)])
    ndcg = np.array([[ndcg_at_k(r, t, k) for r, t in zip(rk, targets, strict=True)] for rk in (ranked_a, ranked_b)])
    n = len(targets)
    diffs = np.stack([rec[0] - rec[1], ndcg[0] - ndcg[1]])  # (2, n)
    rng = np.random.default_rng(seed)
    boot = np.concatenate([diffs[:, rng.integers(0, n, (n, min(200, n_boot - s)))].mean(1)
                           for s in range(0, n_boot, 200)], axis=1)  # (2, n_boot), 200 resamples at a time
    lo, hi = np.percentile(boot, [2.5, 97.5], axis=1)
    only_a, only_b = int(((rec[0] == 1) & (rec[1] == 0)).sum()), int(((rec[0] == 0) & (rec[1] == 1)).sum())
    p = binomtest(only_a, only_a + only_b, 0.5).pvalue if only_a + only_b else 1.0
    return {
        f"recall@{k}_diff": round(float(diffs[0].mean()), 6),
        f"recall@{k}_diff_ci95": [round(float(lo[0]), 6), round(float(hi[0]), 6)],
        f"ndcg@{k}_diff": round(float(diffs[1].mean()), 6),
        f"ndcg@{k}_diff_ci95": [round(float(lo[1]), 6), round(float(hi[1]), 6)],
        f"hits@{k}_only_a": only_a, f"hits@{k}_only_b": only_b, f"mcnemar_p@{k}": round(float(p), 4),
        "users": n, "bootstrap": n_boot,
    }  # fmt: skip


def rank(rec: Recommender, examples: Sequence[Example], k: int = max(KS), batch_size: int = 256,
         progress: bool = True, desc: str = "eval") -> list[list[int]]:
    """Run `rec` over `examples` in batches: each user's top-k list."""
    ranked: list[list[int]] = []
    bar = tqdm(total=len(examples), desc=desc, disable=not progress, unit="user")
    for s in range(0, len(examples), batch_size):
        batch = examples[s : s + batch_size]
        out = rec.recommend(batch, k)
        if len(out) != len(batch):
            raise RuntimeError(f"recommender returned {len(out)} lists for {len(batch)} users")
        ranked.extend(out)
        bar.update(len(batch))
    bar.close()
    return ranked


def evaluate(rec: Recommender, examples: Sequence[Example], k: int = max(KS), batch_size: int = 256,
             progress: bool = True, desc: str = "eval") -> dict[str, float]:
    """Run `rec` over `examples` in batches and score the top-k lists."""
    return score(rank(rec, examples, k, batch_size, progress, desc), [e.target for e in examples])


class MostPopular:
    """Recommends the globally most interacted items seen before the evaluated split."""

    def __init__(self, sequences: dict[int, list[int]], holdout: int):
        counts: Counter[int] = Counter()
        for seq in sequences.values():
            counts.update(seq[: len(seq) - holdout])
        self.top = [i for i, _ in counts.most_common()]

    def recommend(self, examples: Sequence[Example], k: int) -> list[list[int]]:
        return [self.top[:k] for _ in examples]


def split_examples(ds: Dataset, split: str, limit: int | None = None) -> list[Example]:
    if split not in ("valid", "test"):
        raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
    ex = ds.splits.test if split == "test" else ds.splits.valid
    return ex[:limit] if limit else ex


def subset(examples: list[Example], sample: int | None, seed: int) -> list[Example]:
    """A fixed random subset of `sample` users (all when None or larger than the split)."""
    if not sample or sample >= len(examples):
        return examples
    idx = sorted(random.Random(seed).sample(range(len(examples)), sample))
    return [examples[i] for i in idx]


def prefix_hits(cached: Sequence[Collection[PrefixCodes]], targets: Sequence[PrefixCodes]) -> list[bool]:
    """Per user: is the target's (a, b) in the user's cached prefix set?"""
    if len(cached) != len(targets):
        raise ValueError(f"{len(cached)} prefix sets for {len(targets)} targets")
    return [tuple(t) in {tuple(p) for p in c} for c, t in zip(cached, targets, strict=True)]


def prefix_recall(cached: Sequence[Collection[PrefixCodes]], targets: Sequence[PrefixCodes]) -> dict[str, Any]:
    """Share of users whose target prefix is cached, with the per-user hits and the mean set size."""
    hits = prefix_hits(cached, targets)
    if not hits:
        raise ValueError("no users")
    return {"users": len(hits), "hits": sum(hits), "recall": round(sum(hits) / len(hits), 6),
            "mean_set_size": round(sum(len(set(map(tuple, c))) for c in cached) / len(hits), 2),
            "per_user": hits}
