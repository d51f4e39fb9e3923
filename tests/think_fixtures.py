"""Tiny hand-made data for the OneRec-Think tests: a catalogue, sequences and semantic IDs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from model.semantic_ids import SemanticIDConfig, SemanticIDs
from services.catalog import Catalog, Dataset, leave_one_out

WORDS = ["red lipstick matte", "nail polish coral", "face cream spf", "shampoo argan oil", "hair mask repair",
         "eye liner black", "lip gloss shine", "body lotion shea", "nail file glass", "face serum vitamin"]


def tiny_catalog(n_items: int = 24) -> Catalog:
    ids = list(range(1, n_items + 1))
    titles = {i: f"{WORDS[i % len(WORDS)]} {i}" for i in ids}
    return Catalog(ids, titles)


def tiny_sid(n_items: int = 24, codebook: int = 8) -> SemanticIDs:
    """3 levels x `codebook`: level a = item % 4 groups, b = item // 4 % codebook, c disambiguates."""
    ids = np.arange(1, n_items + 1)
    codes = np.stack([ids % 4, (ids // 4) % codebook, ids // (4 * codebook)], axis=1)
    return SemanticIDs(ids, codes, SemanticIDConfig(variant="text", levels=2, codebook_size=codebook))


def tiny_dataset(n_users: int = 12, n_items: int = 24, seed: int = 0) -> Dataset:
    """Users whose last two items (valid, test targets) are 'canary' items 21..24 seen nowhere else."""
    rng = np.random.default_rng(seed)
    cat = tiny_catalog(n_items)
    seqs: dict[int, list[int]] = {}
    for u in range(1, n_users + 1):
        n = int(rng.integers(3, 8))
        body = [int(x) for x in rng.integers(1, 21, size=n)]
        seqs[u] = body + [21 + (u % 2), 23 + (u % 2)]
    return Dataset(cat, seqs, leave_one_out(seqs))


def corpus(ds: Dataset) -> list[str]:
    return [ds.catalog.title(i) for i in ds.catalog.item_ids] + ["history: persona: likes item: title: bought"]


def write_dataset(ds: Dataset, folder: Path) -> None:
    """Write `ds` as sequences.txt + items.tsv in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = [f"{u} " + " ".join(map(str, s)) + "\n" for u, s in ds.sequences.items()]
    (folder / "sequences.txt").write_text("".join(lines))
    (folder / "items.tsv").write_text("item_id\ttitle\n" + "".join(f"{i}\t{ds.catalog.title(i)}\n"
                                                                 for i in ds.catalog.item_ids))


def run_killed_then_resumed(train: Callable[[list[str]], object], argv: list[str], out: Path,
                            monkeypatch: Any, kill_at_step: int = 7) -> dict:
    """Run `train(argv)` with a kill (KeyboardInterrupt) at optimizer step `kill_at_step`, then `argv + --resume`;
    returns the trainer state found after the kill (what the resume starts from)."""
    import pytest
    import torch

    real, calls = torch.nn.utils.clip_grad_norm_, []

    def crash(*a: Any, **kw: Any) -> Any:
        calls.append(1)
        if len(calls) == kill_at_step:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", crash)
    with pytest.raises(KeyboardInterrupt):
        train(argv)
    saved = torch.load(out / "trainer_state.pt", weights_only=False)
    state = dict(saved.get("state", saved))  # the align fit keeps its state under "state"; step loops at the top
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", real)
    train([*argv, "--resume"])
    return state
