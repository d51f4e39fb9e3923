"""Trie validity (property-based): every allowed path ends at a real item; views and token maps."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model.trie import CodeTrie, EmptyAllowedSetError, TokenMap, hf_prefix_allowed_tokens_fn

code_tables = st.lists(st.tuples(*[st.integers(0, 5)] * 3), min_size=1, max_size=40, unique=True)


def make(table: list[tuple[int, int, int]]) -> CodeTrie:
    return CodeTrie(np.array(table), np.arange(100, 100 + len(table)), codebook_size=6)


@given(code_tables, st.randoms(use_true_random=False))
@settings(max_examples=200, deadline=None)
def test_every_allowed_path_ends_at_a_real_item(table, rnd) -> None:
    trie = make(table)
    for _ in range(10):
        prefix: list[int] = []
        while len(prefix) < 3:
            prefix.append(rnd.choice(trie.allowed_next(prefix).tolist()))
        assert tuple(prefix) in set(table)
        assert trie.item(prefix) == 100 + table.index(tuple(prefix))


@given(code_tables)
@settings(max_examples=100, deadline=None)
def test_allowed_sets_are_exact(table) -> None:
    trie = make(table)
    assert set(trie.allowed_next([]).tolist()) == {t[0] for t in table}
    for a in {t[0] for t in table}:
        assert set(trie.allowed_next([a]).tolist()) == {t[1] for t in table if t[0] == a}


@given(code_tables, st.data())
@settings(max_examples=100, deadline=None)
def test_restrict_keeps_only_allowed_prefixes(table, data) -> None:
    trie = make(table)
    chosen = data.draw(st.lists(st.sampled_from([t[:2] for t in table]), min_size=1, max_size=5))
    sub = trie.restrict(chosen)
    assert {tuple(c[:2]) for c in sub.codes.tolist()} == set(chosen)
    assert len(sub) == sum(1 for t in table if t[:2] in set(chosen))


def test_exclude_and_empty_errors() -> None:
    trie = make([(0, 0, 0), (0, 0, 1), (1, 2, 3)])
    ex = trie.exclude([100])
    assert ex.allowed_next([0, 0]).tolist() == [1]
    with pytest.raises(EmptyAllowedSetError):
        trie.allowed_next([5])
    with pytest.raises(EmptyAllowedSetError):
        trie.exclude([100, 101, 102])
    with pytest.raises(EmptyAllowedSetError):
        trie.restrict([(4, 4)])


def test_level_mask() -> None:
    trie = make([(0, 0, 0), (0, 1, 1), (1, 2, 3)])
    m = trie.level_mask(np.array([[0], [1], [5]]))
    assert m[0].nonzero()[0].tolist() == [0, 1]
    assert m[1].nonzero()[0].tolist() == [2]
    assert not m[2].any()


def test_token_map_and_hf_adapter() -> None:
    trie = make([(0, 0, 0), (0, 1, 1), (1, 2, 3)])
    tm = TokenMap(offset=10, num_levels=3, codebook_size=6, item_begin=5, item_end=6)
    assert tm.token_id(1, 2) == 10 + 6 + 2 and tm.level_code(18) == (1, 2)
    fn = hf_prefix_allowed_tokens_fn(trie, tm)
    assert fn(0, torch.tensor([1, 2, 3])) == []  # free text
    assert fn(0, torch.tensor([1, 5])) == [10, 11]  # level a
    assert fn(0, torch.tensor([1, 5, 10])) == [16, 17]  # level b under a=0
    assert fn(0, torch.tensor([1, 5, 11, 18, 27])) == [6]  # complete -> item_end
    assert fn(0, torch.tensor([1, 5, 11, 18, 27, 6, 3])) == []
