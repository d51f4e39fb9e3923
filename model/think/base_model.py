"""Base models for OneRec-Think: the tiny Qwen3 built here, or any local HF causal LM, with itemic tokens.

- ``TinyBaseConfig`` + ``build_tiny_base(texts, sid, out_dir, cfg) -> Path``: byte-level BPE trained on
  `texts`, a random-init ``Qwen3ForCausalLM``, itemic tokens added (`model.think.tokens`), saved as a
  OneRec-Think folder (`model.think.checkpoint`);
- ``extend_base_model(path, sid, out_dir)``: the same for any local HF causal LM (``--base-model PATH``).
Not here: the token layout itself (`model.think.tokens`), training (the ``base`` stage: `model.think.stages`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from model.semantic_ids import SemanticIDs
from model.think.checkpoint import save_think
from model.think.tokens import EOS, PAD, add_itemic_tokens, resize_for_items


@dataclass
class TinyBaseConfig:
    """A small Qwen3-architecture model trained from scratch (defaults: ~3M parameters)."""

    bpe_vocab: int = 2048
    hidden: int = 256
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 64
    intermediate: int = 512
    max_positions: int = 1024
    rope_theta: float = 10000.0
    seed: int = 0


def train_bpe(texts: list[str], vocab_size: int) -> Any:
    """Byte-level BPE (HF `tokenizers`) trained on `texts`, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, PAD], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD, model_max_length=4096)


def build_tiny_base(texts: list[str], sid: SemanticIDs, out_dir: Path | str, cfg: TinyBaseConfig | None = None) -> Path:
    """Train the BPE, build a random-init Qwen3ForCausalLM with itemic tokens, save it; returns `out_dir`."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = cfg or TinyBaseConfig()
    torch.manual_seed(cfg.seed)
    tokenizer = train_bpe(texts, cfg.bpe_vocab)
    tokmap = add_itemic_tokens(tokenizer, sid.num_levels, sid.codebook_size)
    vocab = int(math.ceil(len(tokenizer) / 64) * 64)
    config = Qwen3Config(
        vocab_size=vocab, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_dim, max_position_embeddings=cfg.max_positions,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=True, bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, dtype="float32",
    )
    model = Qwen3ForCausalLM(config)
    resize_for_items(model, tokenizer)
    out = Path(out_dir)
    save_think(model, tokenizer, tokmap, out, extra={"base_model": "tiny-qwen3", "tiny_config": asdict(cfg)})
    return out


def extend_base_model(base: Path | str, sid: SemanticIDs, out_dir: Path | str) -> Path:
    """Add itemic tokens to any local HF causal LM folder (``--base-model PATH``) and save it to `out_dir`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = Path(base)
    if not (base / "config.json").is_file():
        raise FileNotFoundError(f"--base-model {base}: no config.json (need a local HF causal LM folder)")
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokmap = add_itemic_tokens(tokenizer, sid.num_levels, sid.codebook_size)
    resize_for_items(model, tokenizer)
    out = Path(out_dir)
    save_think(model, tokenizer, tokmap, out, extra={"base_model": str(base)})
    return out
