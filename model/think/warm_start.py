"""Warm start of a think model's item tokens from a trained online OneRec checkpoint.

The online model's two biggest levers are item-ID embeddings in and a next-item head tied to them. A think
model with item tokens (`model.think.tokens.add_item_id_tokens`) has the same structure: one tied row per
item. This module turns the OneRec checkpoint's item table (``item_emb.weight[1:]``, (N, d), SID row order)
into initial rows for the think model's width D: a fixed random orthonormal map d -> D keeps every dot
product between items (so the popularity and co-purchase geometry the online model learned survives),
and one global scale brings the mean row norm to the think model's own scale.

Reads files only; it does not train. Refuses a checkpoint built on other codes than the given SIDs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from model.semantic_ids import SemanticIDs


def onerec_item_table(folder: Path | str, sid: SemanticIDs) -> torch.Tensor:
    """(N, d) item embeddings of a OneRec checkpoint folder, rows in `sid` order."""
    from safetensors.torch import load_file

    folder = Path(folder).resolve()
    weights = load_file(folder / "model.safetensors")
    if "item_emb.weight" not in weights:
        raise ValueError(f"{folder}: OneRec checkpoint without item embeddings (trained with --no-item-emb)")
    own = SemanticIDs.load(folder / "sid")
    if not (np.array_equal(own.item_ids, sid.item_ids) and np.array_equal(own.codes, sid.codes)):
        raise ValueError(f"{folder}: trained on other semantic IDs than the think model's; rebuild one of them")
    table = weights["item_emb.weight"][1:].float()  # row 0 is padding
    if table.shape[0] != len(sid):
        raise ValueError(f"{folder}: {table.shape[0]} item rows for {len(sid)} items")
    return table


def project_items(table: torch.Tensor, dim: int, target_norm: float, seed: int = 0) -> torch.Tensor:
    """(N, d) -> (N, dim) by a random orthonormal map (dot products kept), scaled to mean row norm `target_norm`."""
    n, d = table.shape
    g = torch.Generator().manual_seed(seed)
    if dim >= d:
        q, _ = torch.linalg.qr(torch.randn(dim, d, generator=g))  # (dim, d), orthonormal columns
        out = table @ q.T
    else:  # narrower think model: keep the top principal directions
        out = table @ torch.linalg.svd(table, full_matrices=False)[2][:dim].T
    scale = target_norm / float(out.norm(dim=1).mean().clamp(min=1e-8))
    return out * scale


def onerec_item_init(folder: Path | str, sid: SemanticIDs, model: object, seed: int = 0) -> torch.Tensor:
    """Initial item-token rows for `model` (an HF causal LM) from the OneRec checkpoint in `folder`."""
    emb = model.get_input_embeddings().weight.detach().float()  # type: ignore[attr-defined]
    target = float(emb.norm(dim=1).mean())  # the scale of the think model's own token rows
    return project_items(onerec_item_table(folder, sid), emb.shape[1], target, seed)
