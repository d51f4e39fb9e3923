"""Itemic tokens for a causal LM: add them to a tokenizer, find them again, size the embeddings for them.

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

Not here: the base-model builders (`model.think.base_model`), saving and loading folders
(`model.think.checkpoint`), prompt formats (`model.think.align_data`), training, decoding.
"""

from __future__ import annotations

import math
from typing import Any

from model.semantic_ids import ITEM_BEGIN, ITEM_END, SemanticIDs, all_code_tokens, item_id_tokens, level_token
from model.trie import TokenMap

THINK_BEGIN = "<think>"
THINK_END = "</think>"
EOS = "<|endoftext|>"
PAD = "<|pad|>"
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
    (N, D) sets the rows (e.g. `model.think.warm_start.onerec_item_init`); default: the scaled sum of the item's
    code-token rows. The tokens are ordinary vocabulary entries, so the folder loads in transformers and vLLM.
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
