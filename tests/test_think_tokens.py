"""Itemic token extension: layout, round trip through decode, resize, tiny base folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from think_fixtures import corpus, tiny_dataset, tiny_sid

from model.semantic_ids import ITEM_BEGIN, ITEM_END, all_code_tokens, item_string, parse_codes
from model.think.align_data import direct_prefix, generation_prefix, think_target
from model.think.base_model import TinyBaseConfig, build_tiny_base, train_bpe
from model.think.checkpoint import load_think
from model.think.tokens import THINK_BEGIN, THINK_END, ItemicTokenError, add_itemic_tokens, resize_for_items, token_map

TINY = TinyBaseConfig(bpe_vocab=300, hidden=32, layers=1, heads=2, kv_heads=1, head_dim=16, intermediate=64)


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ds = tiny_dataset()
    return build_tiny_base(corpus(ds), tiny_sid(), tmp_path_factory.mktemp("base") / "tiny", TINY)


def test_layout_contiguous_and_idempotent() -> None:
    tok = train_bpe(["red lipstick history: nail polish"] * 5, 280)
    tm = add_itemic_tokens(tok, 3, 8)
    vocab = tok.get_vocab()
    for i, t in enumerate(all_code_tokens(3, 8)):
        assert vocab[t] == tm.offset + i
    assert tm.item_begin == vocab[ITEM_BEGIN] and tm.item_end == vocab[ITEM_END]
    assert THINK_BEGIN in vocab and THINK_END in vocab
    n = len(tok)
    assert add_itemic_tokens(tok, 3, 8) == tm and len(tok) == n
    with pytest.raises(ItemicTokenError, match="expected"):
        token_map(tok, 3, 16)  # wrong codebook: <b_0> is not where a 16-code layout puts it


def test_round_trip_ids_survive_decode() -> None:
    tok = train_bpe(["red lipstick history: nail polish because"] * 5, 280)
    tm = add_itemic_tokens(tok, 3, 8)
    history = [(1, 2, 0), (3, 7, 1)]
    text = generation_prefix(history) + think_target("because red lipstick", (2, 5, 0))
    ids = tok(text, add_special_tokens=False)["input_ids"]
    for skip in (False, True):
        back = tok.decode(ids, skip_special_tokens=skip)
        assert back == text
        assert tok(back, add_special_tokens=False)["input_ids"] == ids
    assert parse_codes(text)[-1] == (2, 5, 0)
    codes = [tm.level_code(t) for t in ids if tm.is_code(t)]
    assert codes[-3:] == [(0, 2), (1, 5), (2, 0)]
    # the prefix tokenises to a prefix of the full text (it ends in an added token)
    pre = tok(direct_prefix(history), add_special_tokens=False)["input_ids"]
    full = tok(direct_prefix(history) + item_string((2, 5, 0))[len(ITEM_BEGIN):], add_special_tokens=False)
    assert full["input_ids"][: len(pre)] == pre


def test_tiny_base_folder_loads(base_folder: Path) -> None:
    meta = json.loads((base_folder / "itemic.json").read_text())
    assert meta["num_levels"] == 3 and meta["codebook_size"] == 8
    model, tok, tm = load_think(base_folder)
    rows = model.get_input_embeddings().weight.shape[0]
    assert model.config.vocab_size == rows and rows % 64 == 0 and rows >= len(tok)
    assert tm.offset + 3 * 8 <= len(tok)
    assert (base_folder / "generation_config.json").is_file()


def test_resize_keeps_config_consistent(base_folder: Path) -> None:
    model, tok, _ = load_think(base_folder)
    tok.add_tokens([f"<extra_{i}>" for i in range(70)])
    rows = resize_for_items(model, tok)
    assert rows == model.config.vocab_size == model.get_input_embeddings().weight.shape[0]
    assert rows >= len(tok) and rows % 64 == 0
    assert model.get_output_embeddings().weight.shape[0] == rows


def test_extend_any_local_base_model(tmp_path: Path) -> None:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from model.think.base_model import extend_base_model

    tok = train_bpe(["plain text of some other model <think> reasoning </think>"] * 5, 270)
    tok.add_tokens(["<think>", "</think>"])  # e.g. Qwen3 ships its own think markers
    cfg = Qwen3Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    Qwen3ForCausalLM(cfg).save_pretrained(tmp_path / "plain")
    tok.save_pretrained(tmp_path / "plain")
    think_ids = (tok.get_vocab()["<think>"], tok.get_vocab()["</think>"])
    out = extend_base_model(tmp_path / "plain", tiny_sid(), tmp_path / "ext")
    model, tok2, tm = load_think(out)
    assert (tok2.get_vocab()["<think>"], tok2.get_vocab()["</think>"]) == think_ids  # reused, not duplicated
    assert tm.offset >= len(tok) and model.config.vocab_size % 64 == 0
    with pytest.raises(FileNotFoundError, match="config.json"):
        extend_base_model(tmp_path / "nowhere", tiny_sid(), tmp_path / "x")
