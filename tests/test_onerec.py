"""Lightweight OneRec: learns a deterministic pattern, decodes only real items, honours prefix sets."""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model.onerec import DeadlineExceeded, OneRec, OneRecConfig, build_model
from model.onerec.serving import ModuleNet
from model.onerec.train import train_epoch
from model.policy import PolicyConfig
from model.semantic_ids import SemanticIDConfig, SemanticIDs, disambiguate
from model.training import lr_lambda

N_ITEMS = 40


def plain(beam: int, own_prefixes: int = 0) -> PolicyConfig:
    """Completion options of these tests: the plain sum of model and offline log-probs; own_prefixes=0: cached
    prefixes only."""
    return PolicyConfig(beam=beam, prefix_weight=1.0, own_prefixes=own_prefixes, own_prefix_floor=0.0,
                        exclude_consumed=False)


def tiny_sid() -> SemanticIDs:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 4, size=(N_ITEMS, 2))
    codes = disambiguate(base, codebook_size=16)  # (N, 3), codebook 16
    return SemanticIDs(np.arange(1, N_ITEMS + 1), codes, SemanticIDConfig("text", levels=2, codebook_size=16))


def successor_seqs(rng: random.Random, n: int = 200) -> list[list[int]]:
    """Sequences following 'next item = item + 1 (mod N)' (item rows + 1 == item ids here)."""
    out = []
    for _ in range(n):
        start, length = rng.randrange(N_ITEMS), rng.randint(4, 10)
        out.append([(start + j) % N_ITEMS + 1 for j in range(length)])
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[OneRec, Path]:
    """A tiny model trained for a few seconds on 'next item = item + 1 (mod N)'."""
    torch.set_num_threads(1)
    sid = tiny_sid()
    rng = random.Random(0)
    seqs = successor_seqs(rng)
    model = build_model(OneRecConfig(d_model=32, n_layers=1, n_heads=2, d_ff=64, dropout=0.0, max_len=12), sid)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = None
    for _ in range(40):
        losses = train_epoch(model, opt, seqs, 32, rng, progress=False)
        first = first if first is not None else float(np.mean(losses))
    assert float(np.mean(losses)) < first / 4
    folder = tmp_path_factory.mktemp("onerec")
    OneRec(model, sid).save(folder)
    return OneRec.load(folder), folder


def test_learns_the_successor_pattern(trained: tuple[OneRec, Path]) -> None:
    onerec, _ = trained
    hist = [[5, 6, 7], [20, 21, 22, 23], [39, 40]]
    out = onerec.decode_full(hist, k=1, beam=5)
    assert [r[0][0] for r in out] == [8, 24, 1]


def test_complete_respects_prefixes_and_rescores(trained: tuple[OneRec, Path]) -> None:
    onerec, _ = trained
    sid = onerec.sid
    want = sid.codes_of(8)
    other = next(c for c in map(tuple, sid.codes.tolist()) if c[:2] != want[:2])
    out = onerec.complete([[5, 6, 7]], [[(other[0], other[1], 0.0), (want[0], want[1], -1.0)]], k=3, policy=plain(5))
    assert out[0][0][0] == 8  # the fresh history wins over the offline score
    allowed = {other[:2], want[:2]}
    assert all(sid.codes_of(i)[:2] in allowed for i, _ in out[0])


def test_exclusion_and_deadline(trained: tuple[OneRec, Path]) -> None:
    onerec, _ = trained
    out = onerec.decode_full([[5, 6, 7]], k=3, beam=5, exclude=[{8}])
    assert 8 not in [i for i, _ in out[0]] and len(out[0]) == 3
    with pytest.raises(DeadlineExceeded):
        onerec.decode_full([[5, 6, 7]], k=3, beam=5, deadline=0.0)


def test_history_rows_from_the_lookup_table_equal_the_dict_path(trained: tuple[OneRec, Path]) -> None:
    """`_rows` reads item rows from a numpy lookup table; the dict it replaced gives the same rows and counts
    for unknown, negative and huge ids (one beyond int64 included)."""
    onerec, _ = trained
    hists = [[999, 5, 6, 7], [], [-3, 1, 2**40, 2], [3, 2**70, 4]]
    before = onerec.unknown_items
    fast = onerec._rows(hists)
    fast_unknown = onerec.unknown_items - before
    lut, onerec._row_lut = onerec._row_lut, None
    try:
        assert lut is not None
        slow = onerec._rows(hists)
    finally:
        onerec._row_lut = lut
    assert torch.equal(fast, slow) and fast_unknown == onerec.unknown_items - before - fast_unknown == 4


def test_unknown_history_items_are_dropped_and_counted(trained: tuple[OneRec, Path]) -> None:
    onerec, _ = trained
    before = onerec.unknown_items
    out = onerec.decode_full([[999, 5, 6, 7], []], k=2, beam=4)
    assert onerec.unknown_items == before + 1
    assert len(out[0]) == 2 and len(out[1]) == 2


@given(st.lists(st.lists(st.integers(1, N_ITEMS), max_size=12), min_size=1, max_size=4),
       st.integers(1, 8), st.data())
@settings(max_examples=30, deadline=None)
def test_every_returned_item_is_valid(trained, histories, k, data) -> None:
    onerec, _ = trained
    sid = onerec.sid
    for row in onerec.decode_full(histories, k=k, beam=8):
        assert len(row) == k and all(sid.has_item(i) for i, _ in row)
        assert len({i for i, _ in row}) == k
    prefixes = [data.draw(st.lists(st.sampled_from([tuple(c[:2]) for c in sid.codes.tolist()]), min_size=1,
                                   max_size=5)) for _ in histories]
    plists = [[(a, b, -0.5) for a, b in p] for p in prefixes]
    for row, allowed in zip(onerec.complete(histories, plists, k=k, policy=plain(8)), prefixes, strict=True):
        assert all(sid.has_item(i) and sid.codes_of(i)[:2] in set(allowed) for i, _ in row)
        # as many items as exist under the allowed prefixes, up to k
        avail = sum(1 for c in sid.codes.tolist() if tuple(c[:2]) in set(allowed))
        assert len(row) == min(k, avail)


def _exact_scores(onerec: OneRec, history: list[int], exclude: set[int]) -> dict[int, float]:
    """Every item's decode score by brute force: per level, log-softmax over the codes that lead to some
    item under the prefix (no beam, no child tables), summed, plus the item head at the last level."""
    sid, K = onerec.sid, onerec.K
    codes = [tuple(c) for c in sid.codes.tolist()]
    h = onerec._last_hidden([history])[0]
    out: dict[int, float] = {}
    with torch.no_grad():
        for row, c in enumerate(codes):
            item = int(sid.item_ids[row])
            if item in exclude:
                continue
            total = 0.0
            for level in range(len(c)):
                valid = {d[level] for r, d in enumerate(codes) if d[:level] == c[:level]
                         and (level < len(c) - 1 or int(sid.item_ids[r]) not in exclude)}
                logits = onerec.net.level_logits(h, torch.tensor(c[:level], dtype=torch.long), level)
                mask = torch.full((K,), -math.inf)
                mask[sorted(valid)] = 0.0
                total += float(torch.log_softmax(logits + mask, -1)[c[level]])
            if onerec.cfg.item_score_weight > 0:
                total += onerec.cfg.item_score_weight * float(onerec.model.item_emb.weight[row + 1] @ h)
            out[item] = total
    return out


def test_exhaustive_beam_finds_the_exact_top_items(trained: tuple[OneRec, Path]) -> None:
    """With a beam wider than the catalogue nothing is pruned, so decode_full must return exactly the
    brute-force top-k (and complete the top-k under its prefixes): checks the sparse child slots, the
    renormalisation over valid codes, the exclusion and the item head against a slow direct computation."""
    onerec, _ = trained
    for history, exclude in (([5, 6, 7], {8, 9}), ([20, 21], set()), ([], {1})):
        exact = _exact_scores(onerec, history, exclude)
        want = sorted(exact.items(), key=lambda kv: -kv[1])[:6]
        got = onerec.decode_full([history], k=6, beam=N_ITEMS * 4, exclude=[exclude])[0]
        assert [i for i, _ in got] == [i for i, _ in want]
        assert np.allclose([s for _, s in got], [s for _, s in want], atol=1e-4)
        prefixes = sorted({tuple(onerec.sid.codes_of(i)[:2]) for i, _ in want[3:]})
        allowed = [(a, b, 0.0) for a, b in prefixes]
        under = sorted(((i, s) for i, s in exact.items() if tuple(onerec.sid.codes_of(i)[:2]) in set(prefixes)),
                       key=lambda kv: -kv[1])[:3]
        got = onerec.complete([history], [allowed], k=3, policy=plain(N_ITEMS * 4), exclude=[exclude])[0]
        assert [i for i, _ in got] == [i for i, _ in under]


def test_last_only_matches_full_encode(trained: tuple[OneRec, Path]) -> None:
    onerec, _ = trained
    rows = onerec._rows([[5, 6, 7, 8], [1, 2]])
    with torch.no_grad():
        full = onerec.model.encode(rows)[:, -1]
        last = onerec.model.encode(rows, last_only=True)[:, -1]
    assert torch.allclose(full, last, atol=1e-5)


def test_frozen_serving_copy_matches_the_modules() -> None:
    """The plain-tensor serving path (`model.onerec.serving`) computes what the modules compute: random
    weights everywhere (biases and norms too), two layers, left-padded users of different lengths."""
    torch.manual_seed(3)
    sid = tiny_sid()
    cfg = OneRecConfig(d_model=32, n_layers=2, n_heads=4, d_ff=48, dropout=0.3, max_len=12, item_score_weight=1.0)
    model = build_model(cfg, sid)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    onerec = OneRec(model, sid)  # eval mode: no dropout
    rows = onerec._rows([[5, 6, 7, 8, 9, 10, 11], [1, 2], [3]])
    with torch.no_grad():
        want = model.encode(rows, last_only=True)[:, -1]
        got = onerec.net.encode_last(rows)
        assert torch.allclose(got, want, atol=1e-5)
        h = want[:, None].expand(3, 5, -1)
        prev = torch.randint(0, sid.codebook_size, (3, 5, sid.num_levels))
        for level in range(sid.num_levels):
            assert torch.allclose(onerec.net.level_logits(h, prev, level), model.level_logits(h, prev, level),
                                  atol=1e-5)
        leaves = torch.randint(-1, len(sid), (3, 5, 4))  # -1: no leaf (the padding row)
        assert torch.allclose(onerec.net.item_logits(want, leaves), model.item_logits(want, leaves), atol=1e-5)
        # rows without padding take the mask-free causal path: one user, and a batch of equal lengths
        for same in (rows[:1], onerec._rows([[5, 6, 7], [8, 9, 10]])):
            assert torch.allclose(onerec.net.encode_last(same), model.encode(same, last_only=True)[:, -1], atol=1e-5)
    hists = [[5, 6, 7, 8, 9, 10, 11], [1, 2], [3]]
    prefixes = [[(int(c[0]), int(c[1]), -1.0) for c in sid.codes[:6].tolist()]] * 3
    fast = (onerec.decode_full(hists, 5, 10), onerec.complete(hists, prefixes, 5, plain(10, 4)))
    frozen, onerec.net = onerec.net, ModuleNet(model)
    slow = (onerec.decode_full(hists, 5, 10), onerec.complete(hists, prefixes, 5, plain(10, 4)))
    onerec.net = frozen
    for f, m in zip(fast, slow, strict=True):
        assert [[i for i, _ in r] for r in f] == [[i for i, _ in r] for r in m]
        assert np.allclose([s for r in f for _, s in r], [s for r in m for _, s in r], atol=1e-4)
    # the item head's path too: an exhaustive beam equals the brute-force ranking
    exact = _exact_scores(onerec, [5, 6, 7], {9})
    got = onerec.decode_full([[5, 6, 7]], k=5, beam=N_ITEMS * 4, exclude=[{9}])[0]
    assert [i for i, _ in got] == [i for i, _ in sorted(exact.items(), key=lambda kv: -kv[1])[:5]]
    # a snapshot: training the model further does not change the copy
    before = onerec.net.encode_last(rows)
    with torch.no_grad():
        model.norm.bias.add_(1.0)
    assert torch.equal(onerec.net.encode_last(rows), before)


def test_item_head_learns_the_pattern_and_reranks_only_valid_items(tmp_path: Path) -> None:
    """The tied next-item head learns the successor alone; decoding with it keeps the trie's guarantees."""
    torch.set_num_threads(1)
    sid = tiny_sid()
    rng = random.Random(1)
    seqs = successor_seqs(rng)
    cfg = OneRecConfig(d_model=32, n_layers=1, n_heads=2, d_ff=64, dropout=0.0, max_len=12,
                       item_loss_weight=1.0, item_score_weight=1.0)
    model = build_model(cfg, sid)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(40):
        train_epoch(model, opt, seqs, 32, rng, progress=False)
    OneRec(model, sid).save(tmp_path)
    onerec = OneRec.load(tmp_path)
    assert onerec.cfg.item_score_weight == 1.0
    hist = [[5, 6, 7], [20, 21, 22, 23], [39, 40]]
    with torch.no_grad():
        item_lp = onerec.model.item_logprobs(onerec._last_hidden(hist))
    assert [onerec.sid.item_ids[r] for r in item_lp.argmax(1).tolist()] == [8, 24, 1]
    assert [r[0][0] for r in onerec.decode_full(hist, k=1, beam=5)] == [8, 24, 1]
    a, b = sid.codes_of(30)[:2]
    done = onerec.complete([[5, 6, 7]], [[(a, b, 0.0)]], k=3, policy=plain(5))[0]
    assert done and all(tuple(sid.codes_of(i)[:2]) == (a, b) for i, _ in done)


def test_item_head_needs_item_embeddings() -> None:
    with pytest.raises(ValueError, match="use_item_emb"):
        build_model(OneRecConfig(use_item_emb=False, item_loss_weight=1.0), tiny_sid())


def test_lr_schedule_warms_up_then_decays() -> None:
    f = lr_lambda("cosine", warmup_steps=10, total_steps=110, min_ratio=0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.55) and f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    assert lr_lambda("constant", 0, 100, 0.1)(50) == 1.0


def test_complete_with_own_prefixes_adds_the_models_choice(trained: tuple[OneRec, Path]) -> None:
    """Cached prefixes that miss the fresh history's answer: own prefixes recover it; strict mode does not."""
    onerec, _ = trained
    a, b = onerec.sid.codes_of(30)[:2]
    strict = onerec.complete([[5, 6, 7]], [[(a, b, 0.0)]], k=3, policy=plain(5))[0]
    assert all(tuple(onerec.sid.codes_of(i)[:2]) == (a, b) for i, _ in strict)
    assert 8 not in [i for i, _ in strict] or tuple(onerec.sid.codes_of(8)[:2]) == (a, b)
    mixed = onerec.complete([[5, 6, 7]], [[(a, b, 0.0)]], k=3, policy=plain(5, 4))[0]
    assert mixed[0][0] == 8
    # no cached prefix at all: own prefixes alone still answer
    assert onerec.complete([[5, 6, 7]], [[]], k=1, policy=plain(5, 4))[0][0][0] == 8


def test_own_prefixes_are_the_prefixes_complete_adds(trained: tuple[OneRec, Path]) -> None:
    """`own_prefixes` (what prefix recall measures) is the set `complete(own_prefixes=n)` completes under."""
    onerec, _ = trained
    hists = [[5, 6, 7], [1, 2], [30]]
    own = onerec.own_prefixes(hists, 4)
    valid = {tuple(int(x) for x in c[:2]) for c in onerec.sid.codes}
    assert len(own) == 3
    for o in own:
        assert o and len(o) == len(set(o)) <= 4 and set(o) <= valid
    served = onerec.complete(hists, [[], [], []], k=5, policy=plain(20, 4))
    for o, items in zip(own, served, strict=True):
        assert items and {tuple(onerec.sid.codes_of(i)[:2]) for i, _ in items} <= set(o)
    # more pairs than there are level-a codes: the a-beam is capped at K, the pairs are not
    wide = onerec.own_prefixes(hists[:1], onerec.K + 3)[0]
    assert len(wide) == min(onerec.K + 3, len(valid)) and set(wide) <= valid
    with pytest.raises(ValueError, match="n must be"):
        onerec.own_prefixes(hists, 0)
