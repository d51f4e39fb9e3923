"""Recall@K / NDCG@K on hand-checked cases, and the MostPopular baseline."""

import math

import pytest

from model.metrics import MostPopular, evaluate, ndcg_at_k, paired_comparison, recall_at_k, score
from services.catalog import Example


def test_recall_and_ndcg_by_hand() -> None:
    ranked = [10, 20, 30, 40, 50, 60]
    assert recall_at_k(ranked, 10, 5) == 1.0
    assert recall_at_k(ranked, 60, 5) == 0.0
    assert recall_at_k(ranked, 60, 10) == 1.0
    assert ndcg_at_k(ranked, 10, 5) == 1.0
    assert ndcg_at_k(ranked, 30, 5) == pytest.approx(1 / math.log2(4))  # rank 3 -> 0.5
    assert ndcg_at_k(ranked, 60, 5) == 0.0
    assert ndcg_at_k(ranked, 99, 10) == 0.0


def test_score_averages_over_users() -> None:
    m = score([[1, 2], [3, 4], [5, 6], [7, 8]], [2, 9, 5, 9], ks=(1, 2))
    assert m["recall@1"] == 0.25  # only user 3 has the target first
    assert m["recall@2"] == 0.5
    assert m["ndcg@2"] == pytest.approx((1 / math.log2(3) + 1.0) / 4, abs=1e-6)


def test_score_rejects_mismatch() -> None:
    with pytest.raises(ValueError, match="rankings"):
        score([[1]], [1, 2])


def test_mostpop_uses_only_history_before_the_split() -> None:
    seqs = {1: [1, 2, 3, 9], 2: [1, 2, 9, 9], 3: [1, 4, 5, 9]}
    mp = MostPopular(seqs, holdout=1)  # test: counts seq[:-1]
    assert mp.top[0] == 1  # 9 appears 4 times in total but only once before the test items
    ex = [Example(u, s[:-1], s[-1]) for u, s in seqs.items()]
    m = evaluate(mp, ex, k=10, progress=False)
    assert m["recall@10"] == 1.0 and m["recall@5"] == 1.0  # 9 is among 5 distinct items


def test_paired_comparison_tells_a_real_gain_from_a_tie() -> None:
    targets = list(range(400))
    hit = [[t] for t in targets]
    miss = [[t + 1000] for t in targets]
    # A ranks every target first, B only every other one: a clear gain, B never hits where A misses
    b = [hit[i] if i % 2 else miss[i] for i in range(400)]
    gain = paired_comparison(hit, b, targets, k=10, n_boot=400)
    assert gain["recall@10_diff"] == 0.5 and gain["hits@10_only_a"] == 200 and gain["hits@10_only_b"] == 0
    lo, hi = gain["recall@10_diff_ci95"]  # type: ignore[misc]
    assert 0.4 < lo <= 0.5 <= hi < 0.6
    assert gain["mcnemar_p@10"] < 1e-6
    # the same hit rate on different users: no difference the data can show
    c = [miss[i] if i % 2 else hit[i] for i in range(400)]
    tie = paired_comparison(b, c, targets, k=10, n_boot=400)
    assert tie["recall@10_diff"] == 0.0 and tie["mcnemar_p@10"] == 1.0
    lo, hi = tie["recall@10_diff_ci95"]  # type: ignore[misc]
    assert lo < 0 < hi
    # NDCG counts the rank: A's target first vs B's target second
    second = [[t + 1000, t] for t in targets]
    assert paired_comparison(hit, second, targets)["ndcg@10_diff"] == pytest.approx(1 - 1 / math.log2(3), abs=1e-6)
    with pytest.raises(ValueError, match="equal"):
        paired_comparison(hit, b[:3], targets)
