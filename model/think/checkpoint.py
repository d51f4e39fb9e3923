"""OneRec-Think folders: save and load an HF causal LM with itemic tokens, and its ``itemic.json``.

Every folder is a plain HF folder (loadable by vLLM) plus ``itemic.json``: the code layout
(``num_levels``, ``codebook_size``, ``offset``, marker ids) and the stage history written by training.
``save_think(model, tokenizer, tokmap, folder)`` / ``load_think(folder) -> (model, tokenizer, TokenMap)``;
``read_itemic(folder)``; ``load_tokenizer(folder)`` (left padding); the serving mode chosen on validation
(``record_mode`` writes it, ``chosen_mode`` reads it back for the same weights only).
Not here: the token layout (`model.think.tokens`), building a base model (`model.think.base_model`), the item
head's own file (`model.think.itemhead`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from model.think.tokens import ItemicTokenError, special_ids, token_map
from model.trie import TokenMap

ITEMIC_JSON = "itemic.json"
MODE_KEY = "served_mode"  # itemic.json: the offline mode chosen on validation (`evaluation think choose-mode`)
CHOSEN_MODES = ("think", "direct")  # what a validation choice may record (no "auto")


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
                                "`python -m model.think base`)")
    return json.loads(path.read_text())


def chosen_mode(meta: dict) -> str | None:
    """The mode (think | direct) chosen on validation for these weights, or None: none chosen, or the record
    belongs to earlier weights (a later stage copied the folder and trained on: its stage count differs)."""
    rec = meta.get(MODE_KEY)
    if not isinstance(rec, dict) or rec.get("mode") not in CHOSEN_MODES:
        return None
    return str(rec["mode"]) if rec.get("stages") == len(meta.get("stages", [])) else None


def record_mode(folder: Path | str, record: dict) -> dict:
    """Store a validation choice (``record["mode"]`` think | direct, plus its evidence) in ``itemic.json``, stamped
    with the folder's stage count so a later stage's copy does not inherit it; written atomically."""
    if record.get("mode") not in CHOSEN_MODES:
        raise ValueError(f"record_mode: mode must be one of {CHOSEN_MODES}, got {record.get('mode')!r}")
    path = Path(folder) / ITEMIC_JSON
    meta = read_itemic(folder)
    meta[MODE_KEY] = {**record, "stages": len(meta.get("stages", []))}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    tmp.replace(path)
    return meta


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
