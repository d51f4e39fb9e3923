"""A OneRec-Think folder loads in vLLM (CPU build) and writes reasoning text + valid itemic tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
from think_fixtures import corpus, tiny_dataset, tiny_sid

from model.think.base_model import TinyBaseConfig, build_tiny_base

pytest.importorskip("vllm")


@pytest.mark.slow
def test_tiny_folder_generates_reasoning_and_items_in_vllm(tmp_path: Path) -> None:
    from evaluation.think import vllm_check

    ds, sid = tiny_dataset(), tiny_sid()
    folder = build_tiny_base(corpus(ds), sid, tmp_path / "tiny",
                             TinyBaseConfig(bpe_vocab=300, hidden=64, layers=1, heads=2, kv_heads=1, head_dim=32,
                                            intermediate=128))
    sid.save(folder / "sid")
    recs = vllm_check(folder, [ex.history for ex in ds.splits.test[:2]], max_think=8)
    assert len(recs) == 2
    for r in recs:
        assert r["item"] is not None and sid.has_item(r["item"])  # every level followed the trie
        assert len(r["codes"]) == sid.num_levels
        assert 1 <= r["reasoning_tokens"] <= 8
