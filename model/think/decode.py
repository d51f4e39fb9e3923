"""Batched decoding for OneRec-Think with a KV cache: reasoning text, then a trie-constrained beam over codes.

`encode_prefixes` left-pads a batch of prompt strings; `Decoder.prefill` runs them once; `reason` writes
the free text (greedy or sampled, code tokens masked out) until ``</think>``; `beam_codes` forces
``</think><|item_begin|>`` (think mode) or starts right after ``<|item_begin|>`` (direct mode) and runs a
beam of width W over the code levels, masked by `CodeTrie.level_mask`. Everything is batched over users
(rows) and beams; finished rows keep stepping with masked-out pad tokens so the cache stays rectangular.
Not here: prompt text (`model.think.align_data`), training, vLLM (the offline worker owns its engine).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from model.semantic_ids import ITEM_BEGIN
from model.think.tokens import THINK_BEGIN, THINK_END
from model.trie import CodeTrie, TokenMap


@dataclass
class Batch:
    """Left-padded prompts: ids (B, T), mask (B, T); the decoding state after `prefill`."""

    ids: torch.Tensor
    mask: torch.Tensor
    cache: Any = None
    logits: torch.Tensor | None = None  # (B, V) next-token logits
    hidden: torch.Tensor | None = None  # (B, D) final (normed) hidden state of the last token


@dataclass
class BeamResult:
    codes: np.ndarray  # (B, W, L) code tuples, best first
    scores: np.ndarray  # (B, W) summed log-probabilities (-inf where no valid path)
    items: list[list[int]]  # per row, item ids of the valid beams, best first


def left_pad(rows: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) token ids left-padded with `pad`, and the (B, L) attention mask (1 = real token)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(list(r), dtype=torch.long)
        mask[i, width - len(r) :] = 1
    return ids, mask


def final_hidden(model: Any, rows: Sequence[Sequence[int]], pad: int, bf16: bool = False) -> torch.Tensor:
    """(B, D) final (normed) hidden state at the last token of each row: the rows left-padded with `pad`,
    positions counted from 0 per row, one forward of the trunk (no LM head, no cache); `bf16`: autocast on CPU."""
    dev = model.get_input_embeddings().weight.device
    ids, mask = left_pad(rows, pad)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16 and dev.type == "cpu"):
        out = model.base_model(input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev))
    return out.last_hidden_state[:, -1]


class Decoder:
    """Decoding helpers around one causal LM + tokenizer with itemic tokens.

    With an `item_head` (`model.think.itemhead.ItemHead`, rows in `trie` item order) the leaves of a
    full-depth beam are re-ranked by ``code log-probs + item_head.cfg.score_weight * item logit``.
    """

    def __init__(self, model: Any, tokenizer: Any, tokmap: TokenMap, trie: CodeTrie, item_head: Any = None):
        if trie.num_levels != tokmap.num_levels or trie.codebook_size != tokmap.codebook_size:
            raise ValueError(f"trie ({trie.num_levels}x{trie.codebook_size}) does not match the token map "
                             f"({tokmap.num_levels}x{tokmap.codebook_size})")
        self.model = model
        self.tok = tokenizer
        self.tm = tokmap
        self.trie = trie
        vocab = tokenizer.get_vocab()
        self.think_begin = int(vocab[THINK_BEGIN])
        self.think_end = int(vocab[THINK_END])
        self.item_begin = int(vocab[ITEM_BEGIN])
        self.pad = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
        rows = int(model.get_input_embeddings().weight.shape[0])
        # free text may use ordinary tokens and </think>; never codes, markers, pad or padded rows
        allowed = torch.zeros(rows, dtype=torch.bool)
        allowed[: len(tokenizer)] = True
        allowed[tokmap.offset : tokmap.offset + tokmap.num_levels * tokmap.codebook_size] = False
        if tokmap.has_items:  # item tokens are read after history items, never written as text
            allowed[int(tokmap.item_offset or 0) : int(tokmap.item_offset or 0) + tokmap.num_items] = False
        for t in (self.think_begin, self.item_begin, int(tokmap.item_end or 0), self.pad):
            allowed[t] = False
        if tokenizer.eos_token_id is not None:
            allowed[tokenizer.eos_token_id] = False
        allowed[self.think_end] = True
        self.device = next(model.parameters()).device
        self.text_mask = allowed.to(self.device)
        self.item_head = item_head.to(self.device) if item_head is not None else None
        self.row_of_item = {int(i): r for r, i in enumerate(trie.item_ids)} if item_head is not None else {}

    # ------------------------------------------------------------------ basics

    def encode_prefixes(self, texts: list[str], max_len: int | None = None) -> Batch:
        """Left-padded token ids; overlong prompts keep their last `max_len` tokens."""
        rows = [self.tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        if max_len is not None:
            rows = [r[-max_len:] for r in rows]
        ids, mask = left_pad(rows, self.pad)
        return Batch(ids.to(self.device), mask.to(self.device))

    def _forward(self, b: Batch, new_ids: torch.Tensor, new_mask: torch.Tensor) -> None:
        """Append (B, n) tokens to the cache; sets the last token's logits (B, V) and hidden state (B, D)."""
        from transformers import DynamicCache

        full_mask = new_mask if b.cache is None else torch.cat([b.mask, new_mask], dim=1)
        pos = (full_mask.cumsum(-1) - 1).clamp(min=0)[:, -new_ids.shape[1] :]
        if b.cache is None:
            b.cache = DynamicCache()
        # trunk + LM head separately: the head runs on the last position only, and the final (normed)
        # hidden state is what the item head reads
        out = self.model.base_model(input_ids=new_ids, attention_mask=full_mask, position_ids=pos,
                                    past_key_values=b.cache, use_cache=True)
        b.cache = out.past_key_values
        b.mask = full_mask
        b.hidden = out.last_hidden_state[:, -1]
        b.logits = self.model.get_output_embeddings()(b.hidden).float()

    @torch.no_grad()
    def prefill(self, b: Batch) -> Batch:
        ids, mask = b.ids, b.mask
        b.mask = torch.zeros((ids.shape[0], 0), dtype=torch.long, device=self.device)
        b.cache = None
        self._forward(b, ids, mask)
        return b

    @torch.no_grad()
    def feed(self, b: Batch, ids: torch.Tensor, mask: torch.Tensor | None = None) -> Batch:
        """Append forced tokens (B, n) to every row."""
        mask = torch.ones_like(ids) if mask is None else mask
        self._forward(b, ids, mask)
        return b

    # ------------------------------------------------------------------ reasoning

    @torch.no_grad()
    def reason(self, b: Batch, max_new: int, temperature: float = 0.0, top_k: int = 0,
               generator: torch.Generator | None = None) -> list[list[int]]:
        """Free text after ``<think>`` until ``</think>`` (not fed) or `max_new` tokens; returns the ids per row.

        Afterwards the cache holds prompt + reasoning; call `close_think` to append ``</think><|item_begin|>``.
        """
        assert b.logits is not None, "prefill first"
        n = b.logits.shape[0]
        out: list[list[int]] = [[] for _ in range(n)]
        done = torch.zeros(n, dtype=torch.bool, device=self.device)
        neg = torch.tensor(float("-inf"), device=self.device)
        for _ in range(max_new):
            logits = torch.where(self.text_mask[: b.logits.shape[1]], b.logits, neg)
            if temperature > 0:
                logits = logits / temperature
                if top_k > 0:
                    kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
                    logits = torch.where(logits < kth, neg, logits)
                nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator).squeeze(1)
            else:
                nxt = logits.argmax(-1)
            stop = nxt == self.think_end
            done = done | stop
            if bool(done.all()):
                break
            nxt_l = nxt.tolist()
            for i in torch.nonzero(~done).flatten().tolist():
                out[i].append(int(nxt_l[i]))
            feed = torch.where(done, torch.full_like(nxt, self.pad), nxt)
            self.feed(b, feed[:, None], (~done).long()[:, None])
        return out

    def close_think(self, b: Batch) -> Batch:
        n = b.ids.shape[0]
        return self.feed(b, torch.tensor([[self.think_end, self.item_begin]] * n, dtype=torch.long,
                                         device=self.device))

    # ------------------------------------------------------------------ constrained beam

    @torch.no_grad()
    def beam_codes(self, b: Batch, width: int, trie: CodeTrie | None = None, levels: int | None = None
                   ) -> BeamResult:
        """Beam over the first `levels` code levels (default all) from the current logits (which predict level a).

        A partial beam (``levels < num_levels``, e.g. 2 for the (a, b) prefixes of the offline tier) returns
        no items. A full beam with an item head returns its leaves re-ranked (see the class docstring).
        """
        assert b.logits is not None, "prefill first"
        trie = trie or self.trie
        tm = self.tm
        n, k = b.logits.shape[0], tm.codebook_size
        levels = tm.num_levels if levels is None else levels
        if not 1 <= levels <= tm.num_levels:
            raise ValueError(f"levels must be in 1..{tm.num_levels}, got {levels}")
        dev = self.device
        neg = torch.tensor(float("-inf"), device=dev)

        def level_logp(logits: torch.Tensor, level: int, prefixes: np.ndarray) -> torch.Tensor:
            logp = torch.log_softmax(logits.float(), -1)
            lo = tm.offset + level * k
            part = logp[:, lo : lo + k]  # (rows, K)
            allowed = torch.from_numpy(trie.level_mask(prefixes)).to(dev)
            return torch.where(allowed, part, neg)

        lp0 = level_logp(b.logits, 0, np.zeros((n, 0), dtype=np.int64))  # (B, K)
        w = min(width, k)
        scores, codes0 = lp0.topk(w, dim=-1)  # (B, W)
        paths = codes0[:, :, None]  # (B, W, 1)
        if width > k:  # more beams than codes at level a: pad with dead beams
            pad = width - k
            scores = torch.cat([scores, torch.full((n, pad), float("-inf"), device=dev)], 1)
            paths = torch.cat([paths, torch.zeros((n, pad, 1), dtype=torch.long, device=dev)], 1)
        W = paths.shape[1]
        # The prompt cache stays at B rows: at level l the W beams' paths (l tokens each) are packed into one
        # (B, W*l) block after the prompt; a 4D mask lets each beam see the prompt and its own path only.
        # Costs W*l query tokens per level but no copy of the prompt cache per beam.
        t0 = b.mask.shape[1]
        next_pos = b.mask.sum(-1, keepdim=True)  # (B, 1) position of the first code token
        for level in range(1, levels):
            lv_off = tm.offset + torch.arange(level, device=dev) * k  # (l,) token id of code 0 at each level
            toks = (paths + lv_off).reshape(n, W * level)  # (B, W*l)
            idx = torch.arange(level, device=dev)
            pos = (next_pos + idx.repeat(W)[None, :])  # (B, W*l)
            beam_of = torch.arange(W, device=dev).repeat_interleave(level)  # (W*l,)
            own = (beam_of[:, None] == beam_of[None, :]) & (idx.repeat(W)[None, :] <= idx.repeat(W)[:, None])
            mask4 = torch.cat([b.mask.bool()[:, None, None, :].expand(n, 1, W * level, t0),
                               own[None, None].expand(n, 1, W * level, W * level)], dim=-1)
            out = self.model(input_ids=toks, attention_mask=mask4, position_ids=pos, past_key_values=b.cache,
                             use_cache=True)
            b.cache = out.past_key_values
            b.cache.crop(-(W * level))  # drop the packed paths again: the cache is back to t0 tokens
            # (B, W, V): logits after each beam's last token
            last = out.logits[:, torch.arange(W, device=dev) * level + level - 1]
            lp = level_logp(last.reshape(n * W, -1), level, paths.reshape(n * W, -1).cpu().numpy())  # (B*W, K)
            cand = (scores.reshape(-1, 1) + lp).reshape(n, W * k)  # (B, W*K)
            scores, flat = cand.topk(W, dim=-1)  # (B, W)
            src, code = flat // k, flat % k
            paths = torch.cat([paths.gather(1, src[:, :, None].expand(-1, -1, level)), code[:, :, None]], 2)
        codes_np = paths.cpu().numpy()
        scores_np = scores.float().cpu().numpy()
        items: list[list[int]] = []
        if levels < tm.num_levels:
            return BeamResult(codes_np, scores_np, [[] for _ in range(n)])
        if self.item_head is not None and b.hidden is not None:
            from model.think.itemhead import rerank

            leaf = np.array([[self._leaf_row(trie, c, s) for c, s in zip(codes_np[r], scores_np[r], strict=True)]
                             for r in range(n)])  # (B, W) catalogue row of each leaf, -1 = none
            order, scores_np = rerank(self.item_head.logits(b.hidden), leaf, scores_np,
                                      self.item_head.cfg.score_weight)
            codes_np = np.take_along_axis(codes_np, order[:, :, None], 1)
        for r in range(n):
            row = []
            for j in range(W):
                if np.isfinite(scores_np[r, j]):
                    item = trie.item(codes_np[r, j])
                    if item is not None:
                        row.append(item)
            items.append(row)
        return BeamResult(codes_np, scores_np, items)

    def _leaf_row(self, trie: CodeTrie, codes: np.ndarray, score: float) -> int:
        item = trie.item([int(c) for c in codes]) if np.isfinite(score) else None
        return -1 if item is None else self.row_of_item.get(int(item), -1)

    # ------------------------------------------------------------------ item-head candidates

    @torch.no_grad()
    def path_logprobs(self, b: Batch, paths: torch.Tensor) -> torch.Tensor:
        """paths (B, M, L) full code paths -> (B, M) summed log-probs of their L code tokens from here.

        One forward: the M paths' first L-1 tokens are packed after the prompt with the beam's 4D mask
        (each path sees the prompt and itself), then the cache is cropped back.
        """
        assert b.logits is not None and b.cache is not None, "prefill first"
        tm, dev = self.tm, self.device
        n, M, L = paths.shape
        off = tm.offset + torch.arange(L, device=dev) * tm.codebook_size  # (L,)
        tok_ids = paths.to(dev) + off  # (B, M, L) token ids
        total = torch.log_softmax(b.logits.float(), -1).gather(1, tok_ids[:, :, 0])  # (B, M) level a
        if L == 1:
            return total
        t0, ln = b.mask.shape[1], L - 1
        idx = torch.arange(ln, device=dev).repeat(M)  # (M*ln,)
        path_of = torch.arange(M, device=dev).repeat_interleave(ln)
        own = (path_of[:, None] == path_of[None, :]) & (idx[None, :] <= idx[:, None])
        mask4 = torch.cat([b.mask.bool()[:, None, None, :].expand(n, 1, M * ln, t0),
                           own[None, None].expand(n, 1, M * ln, M * ln)], dim=-1)
        pos = b.mask.sum(-1, keepdim=True) + idx[None, :]
        out = self.model(input_ids=tok_ids[:, :, :ln].reshape(n, M * ln), attention_mask=mask4, position_ids=pos,
                         past_key_values=b.cache, use_cache=True)
        b.cache = out.past_key_values
        b.cache.crop(t0)
        logp = torch.log_softmax(out.logits.float(), -1)  # (B, M*ln, V)
        nxt = tok_ids[:, :, 1:].reshape(n, M * ln, 1)
        return total + logp.gather(2, nxt).reshape(n, M, ln).sum(-1)

    @torch.no_grad()
    def head_candidates(self, b: Batch, m: int, code_weight: float) -> BeamResult:
        """The item head's top-`m` items over the whole catalogue, re-scored as
        ``item log-softmax + code_weight * code log-prob`` (exact, `path_logprobs`), best first."""
        assert self.item_head is not None and b.hidden is not None, "needs an item head and a prefill"
        il = torch.log_softmax(self.item_head.logits(b.hidden), -1)  # (B, N)
        top, rows = il.topk(min(m, il.shape[1]), dim=-1)  # (B, M)
        codes = torch.as_tensor(np.asarray(self.trie.codes), dtype=torch.long)[rows.cpu()]  # (B, M, L)
        score = top.float()
        if code_weight:
            score = score + code_weight * self.path_logprobs(b, codes).float()
        order = score.argsort(dim=-1, descending=True)
        rows_o = rows.gather(1, order).cpu().numpy()
        ids = np.asarray(self.trie.item_ids)
        return BeamResult(np.take_along_axis(codes.numpy(), order.cpu().numpy()[:, :, None], 1),
                          score.gather(1, order).cpu().numpy(), [[int(ids[r]) for r in row] for row in rows_o])

    # ------------------------------------------------------------------ one call

    def recommend(self, prefixes: list[str], width: int, think: bool, max_think: int = 32,
                  max_len: int | None = None, code_weight: float | None = None) -> tuple[BeamResult, list[str]]:
        """Prompts end with ``<think>`` (think) or ``<|item_begin|>`` (direct); returns beams + reasoning texts.

        With an item head and a `code_weight`, candidates are the head's top-`width` items over the whole
        catalogue (`head_candidates`) instead of the code beam's leaves.
        """
        b = self.prefill(self.encode_prefixes(prefixes, max_len))
        texts = [""] * len(prefixes)
        if think:
            ids = self.reason(b, max_think)
            texts = [self.tok.decode(r, skip_special_tokens=False).strip() for r in ids]
            self.close_think(b)
        if self.item_head is not None and code_weight is not None:
            return self.head_candidates(b, width, code_weight), texts
        return self.beam_codes(b, width), texts
