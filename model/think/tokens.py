"""Itemic tokens for a causal LM: extend a tokenizer + model, build the tiny default base, load a folder.

Public API (other modules import these names):

- ``THINK_BEGIN = "<think>"``, ``THINK_END = "</think>"``; item markers come from `model.semantic_ids`
  (``ITEM_BEGIN = "<|item_begin|>"``, ``ITEM_END = "<|item_end|>"``).
- ``add_itemic_tokens(tokenizer, num_levels, codebook_size) -> TokenMap``: adds the two item markers, the
  two think markers and every code token, level-major and contiguous (``<a_0>..<a_255>, <b_0>..``), as
  added tokens. They are *not* special tokens, so ``decode(..., skip_special_tokens=True)`` and vLLM's
  ``.text`` keep them; still, read token ids where you can (``TokenMap.level_code``).
- ``token_map(tokenizer, num_levels, codebook_size) -> TokenMap`` for an already extended tokenizer
  (raises `ItemicTokenError` if the code tokens are missing or not contiguous).
- ``add_item_id_tokens(model, tokenizer, tokmap, sid, init=None) -> TokenMap``: one item-level token per
  catalogue item (tied rows = the item head), for think models that read items like the online OneRec.
- ``resize_for_items(model, tokenizer, pad_to_multiple_of=64)``: resize embeddings (padded) and keep
  ``config.vocab_size`` equal to the embedding rows so vLLM loads the folder.
- ``TinyBaseConfig`` + ``build_tiny_base(texts, sid, out_dir, cfg) -> Path``: byte-level BPE trained on
  `texts`, a random-init ``Qwen3ForCausalLM``, itemic tokens added, saved as an HF folder.
- ``extend_base_model(path, sid, out_dir)``: same for any local HF causal LM (``--base-model PATH``).
- ``save_think(model, tokenizer, tokmap, folder)`` / ``load_think(folder) -> (model, tokenizer, TokenMap)``:
  every folder carries ``itemic.json`` with ``num_levels`` and ``codebook_size``.

Not here: prompt formats (`model.think.tasks`), training loops (`model.think.train`), decoding.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from model.semantic_ids import ITEM_BEGIN, ITEM_END, SemanticIDs, all_code_tokens, item_id_tokens, level_token
from model.trie import TokenMap

THINK_BEGIN = "<think>"
THINK_END = "</think>"
EOS = "<|endoftext|>"
PAD = "<|pad|>"
ITEMIC_JSON = "itemic.json"
MARKERS = (ITEM_BEGIN, ITEM_END, THINK_BEGIN, THINK_END)


class ItemicTokenError(ValueError):
    """The tokenizer does not hold the itemic tokens in the expected, contiguous layout."""


def _added(content: str) -> Any:
    from tokenizers import AddedToken

    # normalized=False: matched verbatim; special=False: survive skip_special_tokens in decode / vLLM
    return AddedToken(content, special=False, normalized=False, single_word=False, lstrip=False, rstrip=False)


def add_itemic_tokens(tokenizer: Any, num_levels: int, codebook_size: int) -> TokenMap:
    """Add markers and all code tokens (level-major, contiguous) to `tokenizer`; return their `TokenMap`.

    Idempotent on a tokenizer that already holds exactly this layout. Markers that already exist
    (e.g. Qwen3's own ``<think>``) are reused.
    """
    if num_levels < 1 or codebook_size < 1:
        raise ValueError(f"num_levels and codebook_size must be >= 1, got {num_levels}, {codebook_size}")
    vocab = tokenizer.get_vocab()
    codes = all_code_tokens(num_levels, codebook_size)
    present = [t for t in codes if t in vocab]
    if present and len(present) == len(codes):
        return token_map(tokenizer, num_levels, codebook_size)
    if present:
        raise ItemicTokenError(
            f"tokenizer already holds {len(present)} of {len(codes)} code tokens (e.g. {present[0]})")
    missing = [m for m in MARKERS if m not in vocab]
    if missing:
        tokenizer.add_tokens([_added(m) for m in missing])
    tokenizer.add_tokens([_added(t) for t in codes])
    return token_map(tokenizer, num_levels, codebook_size)


def token_map(tokenizer: Any, num_levels: int, codebook_size: int, item_offset: int | None = None,
              num_items: int = 0) -> TokenMap:
    """`TokenMap` of a tokenizer extended by `add_itemic_tokens` (and `add_item_id_tokens` when `item_offset` is
    given); checks contiguity of every code token."""
    vocab = tokenizer.get_vocab()
    for m in (ITEM_BEGIN, ITEM_END):
        if m not in vocab:
            raise ItemicTokenError(f"tokenizer has no {m!r}; run add_itemic_tokens first")
    first = level_token(0, 0)
    if first not in vocab:
        raise ItemicTokenError(f"tokenizer has no {first!r}; run add_itemic_tokens first")
    offset = int(vocab[first])
    for lv in range(num_levels):
        for c in range(codebook_size):
            tok = level_token(lv, c)
            want = offset + lv * codebook_size + c
            if vocab.get(tok) != want:
                raise ItemicTokenError(
                    f"code token {tok!r} has id {vocab.get(tok)}, expected {want} (offset {offset}, level-major layout "
                    f"with num_levels={num_levels}, codebook_size={codebook_size})"
                )
    if item_offset is not None and (num_items <= 0 or len(tokenizer) < item_offset + num_items):
        raise ItemicTokenError(f"item tokens at {item_offset} (+{num_items}) are not in a tokenizer "
                               f"of {len(tokenizer)}")
    return TokenMap(offset, num_levels, codebook_size, int(vocab[ITEM_BEGIN]), int(vocab[ITEM_END]),
                    item_offset, num_items if item_offset is not None else 0)


def add_item_id_tokens(model: Any, tokenizer: Any, tokmap: TokenMap, sid: SemanticIDs,
                       init: Any = None) -> TokenMap:
    """Give the model one item-level token per catalogue item (`model.semantic_ids.item_id_token`, SID row order,
    contiguous) and return the extended `TokenMap`.

    With tied word embeddings (the tiny base) each item token's input row is also its output row, so the LM
    head restricted to these rows is the item head (`model.think.itemhead.TiedItemHead`): the item a history
    position reads and the item the answer position scores share one vector, as in the online OneRec. `init`
    (N, D) sets the rows (e.g. `onerec_item_init`); default: the scaled sum of the item's code-token rows.
    The tokens are ordinary vocabulary entries, so the folder loads in transformers and vLLM unchanged.
    """
    import torch

    if tokmap.has_items:
        raise ItemicTokenError("the tokenizer already holds item tokens")
    if not getattr(model.config, "tie_word_embeddings", False):
        raise ItemicTokenError("item tokens need tied word embeddings (input row = item-head row)")
    names = item_id_tokens(sid)
    vocab = tokenizer.get_vocab()
    clash = [t for t in names[:5] if t in vocab]
    if clash:
        raise ItemicTokenError(f"tokenizer already has {clash[0]!r}")
    start = len(tokenizer)
    tokenizer.add_tokens([_added(t) for t in names])
    got = tokenizer.convert_tokens_to_ids([names[0], names[-1]])
    if got != [start, start + len(names) - 1]:
        raise ItemicTokenError(f"item tokens not contiguous from {start}: got {got}")
    resize_for_items(model, tokenizer)
    emb = model.get_input_embeddings().weight
    with torch.no_grad():
        if init is None:
            from model.think.itemhead import code_token_ids

            ids = code_token_ids(tokmap, sid)  # (N, L)
            init = emb[ids].sum(1) / ids.shape[1] ** 0.5
        init = torch.as_tensor(init, dtype=emb.dtype)
        if tuple(init.shape) != (len(names), emb.shape[1]):
            raise ValueError(f"item token init: expected shape {(len(names), emb.shape[1])}, got {tuple(init.shape)}")
        emb[start : start + len(names)] = init.to(emb.device)
    return TokenMap(tokmap.offset, tokmap.num_levels, tokmap.codebook_size, tokmap.item_begin, tokmap.item_end,
                    start, len(names))


def special_ids(tokenizer: Any) -> dict[str, int]:
    """Ids of the markers (item_begin, item_end, think_begin, think_end)."""
    vocab = tokenizer.get_vocab()
    return {"item_begin": vocab[ITEM_BEGIN], "item_end": vocab[ITEM_END],
            "think_begin": vocab[THINK_BEGIN], "think_end": vocab[THINK_END]}


def resize_for_items(model: Any, tokenizer: Any, pad_to_multiple_of: int = 64) -> int:
    """Resize input/output embeddings to ``len(tokenizer)`` padded up; returns the new vocab size.

    ``config.vocab_size`` is set to the embedding rows (what vLLM reads to build its own tables).
    """
    need = len(tokenizer)
    current = model.get_input_embeddings().weight.shape[0]
    target = int(math.ceil(need / pad_to_multiple_of) * pad_to_multiple_of)
    if current != target:
        model.resize_token_embeddings(target, mean_resizing=current < 10_000)  # covariance is costly on big vocabs
    rows = int(model.get_input_embeddings().weight.shape[0])
    model.config.vocab_size = rows
    text_cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    text_cfg.vocab_size = rows
    return rows


# --------------------------------------------------------------------------------------------
# the tiny default base


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


# --------------------------------------------------------------------------------------------
# folders


def save_think(model: Any, tokenizer: Any, tokmap: TokenMap, folder: Path | str, extra: dict | None = None) -> Path:
    """Save model + tokenizer + generation_config + ``itemic.json`` (merged with any existing extra keys)."""
    from transformers import GenerationConfig

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    ids = special_ids(tokenizer)
    eos = tokenizer.eos_token_id
    gen = GenerationConfig(
        eos_token_id=[eos, ids["item_end"]], pad_token_id=tokenizer.pad_token_id, bos_token_id=eos,
        do_sample=False, max_new_tokens=64,
    )
    gen.save_pretrained(folder)
    meta_path = folder / ITEMIC_JSON
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    meta.update(extra or {})
    meta.update({"num_levels": tokmap.num_levels, "codebook_size": tokmap.codebook_size, "offset": tokmap.offset,
                 "item_begin": tokmap.item_begin, "item_end": tokmap.item_end,
                 "think_begin": ids["think_begin"], "think_end": ids["think_end"],
                 "item_offset": tokmap.item_offset, "num_items": tokmap.num_items})
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    return folder


def read_itemic(folder: Path | str) -> dict:
    path = Path(folder) / ITEMIC_JSON
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing: {folder} is not a OneRec-Think folder (build one with "
                                "`python -m model.think.train base`)")
    return json.loads(path.read_text())


def load_tokenizer(folder: Path | str) -> tuple[Any, TokenMap]:
    from transformers import AutoTokenizer

    meta = read_itemic(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.padding_side = "left"
    item_offset = meta.get("item_offset")
    return tokenizer, token_map(tokenizer, int(meta["num_levels"]), int(meta["codebook_size"]),
                                None if item_offset is None else int(item_offset), int(meta.get("num_items") or 0))


def load_think(folder: Path | str, dtype: Any = None) -> tuple[Any, Any, TokenMap]:
    """(model in eval mode, tokenizer with left padding, TokenMap) of a saved OneRec-Think folder."""
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer, tokmap = load_tokenizer(folder)
    model: Any = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype or torch.float32)
    model.eval()
    rows = int(model.get_input_embeddings().weight.shape[0])
    if rows < len(tokenizer):
        raise ItemicTokenError(f"{folder}: model has {rows} embedding rows for {len(tokenizer)} tokens")
    return model, tokenizer, tokmap
