"""Serving copy of a trained `OneRecModel`: the same math as its modules, in plain tensor calls.

The online tier decodes one or a few users per call, so its tensors are tiny and the cost is per call,
not per FLOP: on this project's CPU each `nn.Module` call adds ~13 µs, and `F.linear` on a 3-D input
is slower than `addmm` on 2-D rows with a pre-transposed weight. `FrozenOneRec` takes a snapshot of the
weights (take a new one after further training) and implements `encode(last_only=True)` and
`level_logits` with `F.layer_norm` / `addmm` / `F.gelu` / `scaled_dot_product_attention` directly:
about half the time of the module path, with results equal to float rounding (tests compare them).
The input embedding of every item (its code embeddings summed + its item-id embedding) is one
precomputed table row. Training and the module path stay in `model.onerec.modeling`.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.onerec.modeling import Block, OneRecModel

Linear = tuple[torch.Tensor, torch.Tensor]  # (weight transposed (in, out), bias)
Norm = tuple[torch.Tensor, torch.Tensor]  # (weight, bias)


def _lin(m: nn.Module) -> Linear:
    assert isinstance(m, nn.Linear) and m.bias is not None
    return m.weight.detach().T.contiguous(), m.bias.detach().clone()


def _norm(m: nn.Module) -> Norm:
    assert isinstance(m, nn.LayerNorm)
    return m.weight.detach().clone(), m.bias.detach().clone()


class FrozenOneRec:
    """Inference-only weights of a `model.onerec.modeling.OneRecModel`, copied when built (never trained)."""

    def __init__(self, model: OneRecModel) -> None:
        cfg = model.cfg
        self.d, self.heads_n, self.max_len = cfg.d_model, cfg.n_heads, cfg.max_len
        with torch.no_grad():
            table = model.code_emb(model.codes_table + model.level_offset).sum(1)  # (N + 1, D), row 0 = pad
            if model.item_emb is not None:
                table = table + model.item_emb.weight
            self.inputs = table.detach().contiguous()
            self.pos = model.pos_emb.weight.detach().clone()
            self.blocks = [
                (_norm(b.ln1), _lin(b.qkv), _lin(b.proj), _norm(b.ln2), _lin(b.ff[0]), _lin(b.ff[2]))
                for b in (cast(Block, m) for m in model.blocks)
            ]  # fmt: skip
            self.norm = _norm(model.norm)
            self.dec = model.dec_emb.weight.detach().clone()
            self.offset = model.level_offset.clone()
            heads = [cast(nn.Sequential, m) for m in model.heads]
            self.level_heads = [(_norm(h[0]), _lin(h[1]), _lin(h[3])) for h in heads]
            self.items = None if model.item_emb is None else model.item_emb.weight.detach().clone()
        self._masks: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _causal(self, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        got = self._masks.get(T)
        if got is None:
            got = self._masks[T] = (torch.ones(T, T, dtype=torch.bool).tril_(), torch.eye(T, dtype=torch.bool))
        return got

    def encode_last(self, rows: torch.Tensor) -> torch.Tensor:
        """rows (B, T) item rows + 1, left-padded with 0 -> last position's hidden state (B, D).

        Same as ``OneRecModel.encode(rows, last_only=True)[:, -1]`` in eval mode.
        """
        B, T = rows.shape
        D, H = self.d, self.heads_n
        x = F.embedding(rows, self.inputs) + self.pos[self.max_len - T :]
        # no padded row (one user's rows never are): plain causal attention, and the last block's single
        # query (the last position) may see every key, so it needs no mask at all
        mask: torch.Tensor | None = None
        if bool((rows[:, 0] == 0).any()):
            causal, eye = self._causal(T)
            mask = ((causal & (rows != 0)[:, None, :]) | eye)[:, None]  # (B, 1, T, T), True = may attend
        last = len(self.blocks) - 1
        for i, (ln1, qkv, proj, ln2, ff1, ff2) in enumerate(self.blocks):
            y = F.layer_norm(x, (D,), *ln1).view(B * T, D)
            q, k, v = torch.addmm(qkv[1], y, qkv[0]).view(B, T, 3, H, D // H).permute(2, 0, 3, 1, 4)
            if i == last:  # only the last position's output is needed from the final block
                q, x = q[:, :, -1:], x[:, -1:]
                mask = None if mask is None else mask[:, :, -1:]
                a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, 1, D/H)
            elif mask is None:
                a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:
                a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, T, D/H)
            Tq = a.shape[2]
            x = x + torch.addmm(proj[1], a.transpose(1, 2).reshape(B * Tq, D), proj[0]).view(B, Tq, D)
            y = F.layer_norm(x, (D,), *ln2).view(B * Tq, D)
            x = x + torch.addmm(ff2[1], F.gelu(torch.addmm(ff1[1], y, ff1[0])), ff2[0]).view(B, Tq, D)
        return F.layer_norm(x[:, -1], (D,), *self.norm)

    def level_logits(self, h: torch.Tensor, prev: torch.Tensor, level: int) -> torch.Tensor:
        """h (..., D), prev (..., level) codes of earlier levels -> logits (..., K); see `OneRecModel`."""
        z = h
        if level > 0:
            z = z + F.embedding(prev[..., :level] + self.offset[:level], self.dec).sum(-2)
        lead = z.shape[:-1]
        (nw, nb), (w1, b1), (w2, b2) = self.level_heads[level]
        z = F.layer_norm(z.reshape(-1, self.d), (self.d,), nw, nb)
        return torch.addmm(b2, F.gelu(torch.addmm(b1, z, w1)), w2).view(*lead, -1)

    def item_logits(self, h: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Unnormalised item-head logits (B, W, C) of catalogue rows `rows` (B, W, C) (-1: the padding row)
        for users h (B, D): one batched matrix-vector product per user."""
        assert self.items is not None
        B = rows.shape[0]
        return torch.bmm(self.items[rows.view(B, -1) + 1], h[:, :, None]).view(rows.shape)


class ModuleNet:
    """The same interface straight over the modules: the reference `FrozenOneRec` is checked and timed
    against (``OneRec.net = ModuleNet(model)`` decodes through the modules)."""

    def __init__(self, model: OneRecModel) -> None:
        self.model = model

    def encode_last(self, rows: torch.Tensor) -> torch.Tensor:
        return self.model.encode(rows, last_only=True)[:, -1]

    def level_logits(self, h: torch.Tensor, prev: torch.Tensor, level: int) -> torch.Tensor:
        return self.model.level_logits(h, prev, level)

    def item_logits(self, h: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return self.model.item_logits(h, rows)
