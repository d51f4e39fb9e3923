"""The lightweight OneRec network (`OneRecModel`): a causal transformer trunk over items and a level-by-level
code decoder, plus building and saving it. Training lives in `model.onerec.train`, decoding in
`model.onerec.decoding`, the serving copy of the weights in `model.onerec.serving`.

A causal trunk reads the user's item sequence (each item = its code embeddings summed, plus an optional
item-id embedding) and, at every position, a small decoder predicts the next item's codes ``a, b, c, d``:
training learns from every position of a sequence in one pass.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from model.onerec.config import OneRecConfig
from model.semantic_ids import SemanticIDs


def fast_dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Inverted dropout from `rand_like` (about 2x faster than `bernoulli_` on these CPUs)."""
    if not training or p <= 0:
        return x
    return x * (torch.rand_like(x) >= p) * (1.0 / (1.0 - p))


class Block(nn.Module):
    """Pre-norm causal self-attention + GELU MLP; dropout on the residual branches only."""

    def __init__(self, d: int, heads: int, d_ff: int, dropout: float):
        super().__init__()
        self.heads, self.p = heads, dropout
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ff = nn.Sequential(nn.Linear(d, d_ff), nn.GELU(), nn.Linear(d_ff, d))

    def forward(self, x: torch.Tensor, mask: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """x (B, T, D), mask (B, 1, T, T) -> (B, T, D); with `last_only`, (B, 1, D) for the last query."""
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        if last_only:  # serving: only the last position's output is needed from the final block
            q, mask, x = q[:, :, -1:], mask[:, :, -1:], x[:, -1:]
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, Tq, D/H)
        x = x + fast_dropout(self.proj(a.transpose(1, 2).reshape(B, -1, D)), self.p, self.training)
        return x + fast_dropout(self.ff(self.ln2(x)), self.p, self.training)


class OneRecModel(nn.Module):
    """Causal trunk over items + per-level code decoder. Shapes: B users, T positions, D d_model."""

    codes_table: torch.Tensor
    level_offset: torch.Tensor

    def __init__(self, cfg: OneRecConfig, codes: torch.Tensor):
        super().__init__()
        self.cfg = cfg
        D, K, L = cfg.d_model, cfg.codebook_size, cfg.num_levels
        # row 0 of `codes_table` is padding; item row r lives at r + 1
        self.register_buffer("codes_table", torch.cat([torch.zeros(1, L, dtype=torch.long), codes.long()]), False)
        self.code_emb = nn.Embedding(L * K, D)
        self.item_emb = nn.Embedding(cfg.num_items + 1, D, padding_idx=0) if cfg.use_item_emb else None
        self.pos_emb = nn.Embedding(cfg.max_len, D)
        self.blocks = nn.ModuleList(Block(D, cfg.n_heads, cfg.d_ff, cfg.dropout) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(D)
        # decoder: level l sees h + sum_{j<l} dec_emb[j * K + code_j]
        self.dec_emb = nn.Embedding((L - 1) * K, D)
        self.heads = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(D), nn.Linear(D, D), nn.GELU(), nn.Linear(D, K))
            for _ in range(L)
        )
        self.register_buffer("level_offset", torch.arange(L) * K, False)
        if (cfg.item_loss_weight > 0 or cfg.item_score_weight > 0) and not cfg.use_item_emb:
            raise ValueError("the item head is tied to the item embeddings: it needs use_item_emb")
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear | nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def encode(self, rows: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """rows (B, T) item rows + 1, left-padded with 0 -> hidden states (B, T, D) (or (B, 1, D))."""
        B, T = rows.shape
        codes = self.codes_table[rows]  # (B, T, L)
        x = self.code_emb(codes + self.level_offset).sum(2)  # (B, T, D)
        if self.item_emb is not None:
            x = x + self.item_emb(rows)
        # positions count from the right end, so a short left-padded batch matches serving (T = max_len)
        x = x + self.pos_emb(torch.arange(self.cfg.max_len - T, self.cfg.max_len, device=rows.device))[None]
        # True = may attend: causal, non-pad keys; every position sees itself so that left-padded
        # rows never get an all-masked (NaN) attention row
        causal = torch.tril(torch.ones(T, T, dtype=torch.bool, device=rows.device))
        eye = torch.eye(T, dtype=torch.bool, device=rows.device)
        mask = ((causal[None] & (rows != 0)[:, None, :]) | eye)[:, None]  # (B, 1, T, T)
        x = fast_dropout(x, self.cfg.dropout, self.training)
        for i, block in enumerate(self.blocks):
            x = block(x, mask, last_only and i == len(self.blocks) - 1)
        return self.norm(x)

    def level_logits(self, h: torch.Tensor, prev: torch.Tensor, level: int) -> torch.Tensor:
        """h (..., D), prev (..., level) codes of earlier levels -> logits (..., K) for `level`."""
        z = h
        if level > 0:
            z = z + self.dec_emb(prev[..., :level] + self.level_offset[:level]).sum(-2)
        return self.heads[level](z)

    def item_logits(self, h: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Unnormalised item-head logits (B, W, C) of the catalogue rows `rows` (B, W, C) for users h (B, D);
        a row of -1 (no item) reads the padding embedding: callers mask those slots."""
        assert self.item_emb is not None
        return (self.item_emb.weight[rows + 1] * h[:, None, None]).sum(-1)

    def item_logprobs(self, h: torch.Tensor) -> torch.Tensor:
        """h (..., D) -> log-softmax over catalogue rows (..., N) of the tied item head."""
        assert self.item_emb is not None
        return torch.log_softmax(h @ self.item_emb.weight[1:].T, -1)

    def loss(self, rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean code cross-entropy over all non-pad positions (+ the weighted item-head cross-entropy).

        rows/targets (B, T) item rows + 1.
        """
        h = self.encode(rows)  # (B, T, D)
        keep = targets > 0
        h, tcodes = h[keep], self.codes_table[targets[keep]]  # (N, D), (N, L)
        total = h.new_zeros(())
        for level in range(self.cfg.num_levels):
            total = total + F.cross_entropy(self.level_logits(h, tcodes, level), tcodes[:, level])
        total = total / self.cfg.num_levels
        if self.cfg.item_loss_weight > 0:
            total = total + self.cfg.item_loss_weight * F.nll_loss(self.item_logprobs(h), targets[keep] - 1)
        return total


def save_checkpoint(model: OneRecModel, sid: SemanticIDs, folder: Path) -> None:
    """Checkpoint folder: model.safetensors + config.json + the code table it was trained with (sid/)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k not in ("codes_table", "level_offset")}
    save_file(state, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(asdict(model.cfg), indent=2))
    sid.save(folder / "sid")


def count_params(model: nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def build_model(cfg: OneRecConfig, sid: SemanticIDs, seed: int = 0) -> OneRecModel:
    torch.manual_seed(seed)
    cfg.num_items, cfg.num_levels, cfg.codebook_size = len(sid), sid.num_levels, sid.codebook_size
    return OneRecModel(cfg, torch.from_numpy(np.asarray(sid.codes)))
