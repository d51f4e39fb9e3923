"""Training rows of the think stages: tokenised (ids, prompt length) pairs, length-grouped batches and their
padded tensors. Shared by the stage loops (`model.think.train`) and the epoch recipe (`model.think.fit`)."""

from __future__ import annotations

import random
from typing import Any

import torch

from model.think import align_data as T


def tokenize(samples: list[T.Sample], tok: Any, max_len: int) -> list[tuple[list[int], int]]:
    """(ids, n_prompt) per sample; prompt and target are tokenised separately (as at inference)."""
    prompts = tok([s.prompt for s in samples], add_special_tokens=False)["input_ids"]
    targets = tok([s.target for s in samples], add_special_tokens=False)["input_ids"]
    out = []
    for p, t in zip(prompts, targets, strict=True):
        t = t[:max_len]
        p = p[-(max_len - len(t)) :] if max_len > len(t) else []
        out.append((p + t, len(p)))
    return out


def batches(rows: list[tuple[list[int], int]], batch_size: int, seed: int) -> list[list[int]]:
    """Index batches of similar lengths (sorted within shuffled pools of 50 batches), in shuffled order."""
    rng = random.Random(seed)
    order = list(range(len(rows)))
    rng.shuffle(order)
    pool = batch_size * 50
    out: list[list[int]] = []
    for s in range(0, len(order), pool):
        chunk = sorted(order[s : s + pool], key=lambda i: len(rows[i][0]))
        out += [chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size)]
    rng.shuffle(out)
    return out


def collate(rows: list[tuple[list[int], int]], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, attention mask and labels (-100 on prompt and padding)."""
    width = max(len(r[0]) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    att = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (r, n_prompt) in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        att[i, : len(r)] = 1
        labels[i, n_prompt : len(r)] = torch.tensor(r[n_prompt:])
    return ids, att, labels
