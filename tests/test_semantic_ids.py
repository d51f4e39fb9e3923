"""Semantic IDs: uniqueness after disambiguation, token strings, CF vectors from training data only."""

from pathlib import Path

import numpy as np
import pytest

from model.semantic_ids import (
    SemanticIDConfig,
    SemanticIDs,
    collaborative_embeddings,
    collision_count,
    disambiguate,
    item_string,
    parse_codes,
    reference_codes,
    residual_kmeans,
)
from services.catalog import load_items


def test_disambiguation_makes_codes_unique() -> None:
    codes = np.array([[1, 2, 3], [1, 2, 3], [1, 2, 4], [1, 2, 3]])
    out = disambiguate(codes, codebook_size=8)
    assert collision_count(codes) == 2 and collision_count(out) == 0
    assert out[:, -1].tolist() == [0, 1, 0, 2]


def test_disambiguation_overflow_is_an_error() -> None:
    with pytest.raises(ValueError, match="share prefix"):
        disambiguate(np.zeros((5, 2), dtype=np.int64), codebook_size=4)


def test_residual_kmeans_on_clustered_points() -> None:
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(4, 8)) * 10
    x = np.concatenate([c + rng.normal(size=(25, 8)) * 0.01 for c in centers])
    codes, cents = residual_kmeans(x, levels=2, k=4, iters=20, seed=0)
    assert codes.shape == (100, 2) and len(cents) == 2
    # the first level recovers the four clusters exactly
    for g in range(4):
        assert len(set(codes[g * 25 : (g + 1) * 25, 0].tolist())) == 1
    assert len(set(codes[:, 0].tolist())) == 4


def test_item_string_round_trip() -> None:
    s = item_string((3, 250, 0, 7))
    assert s == "<|item_begin|><a_3><b_250><c_0><d_7><|item_end|>"
    assert parse_codes("think " + s + " and " + item_string((1, 2, 3, 4))) == [(3, 250, 0, 7), (1, 2, 3, 4)]
    assert parse_codes("<|item_begin|><b_1><a_2><|item_end|>") == []  # wrong level order


def test_collaborative_vectors_use_given_sequences_only() -> None:
    train = {1: [1, 2, 1, 2, 1, 2], 2: [3, 4, 3, 4, 3, 4]}
    v = collaborative_embeddings([1, 2, 3, 4, 5], train, dim=2, window=2)
    assert v.shape == (5, 2)
    assert np.allclose(v[4], 0)  # item 5 never appears in training
    assert v[0] @ v[1] > v[0] @ v[2]  # co-occurring items are closer


def test_save_load_round_trip(tmp_path: Path) -> None:
    codes = disambiguate(np.array([[0, 1], [0, 1], [2, 3]]), 4)
    sid = SemanticIDs(np.array([10, 11, 12]), codes, SemanticIDConfig("text", levels=2, codebook_size=4))
    sid.save(tmp_path)
    back = SemanticIDs.load(tmp_path)
    assert back.codes_of(11) == (0, 1, 1) and back.item_of((2, 3, 0)) == 12
    assert back.config.codebook_size == 4


def test_reference_assignment_on_beauty_is_made_unique() -> None:
    cat = load_items(Path(__file__).resolve().parent.parent / "data" / "beauty" / "items.tsv")
    codes, before = reference_codes(cat, 256)
    assert before == 13  # 24 items share 11 codes (data README): 13 of them must move
    assert collision_count(codes) == 0 and codes.shape == (12101, 4)
