"""Decoding with the lightweight OneRec: history item ids in, trie-constrained (item_id, score) lists out.

Two entry points for the online tier, both batched over users:
- `OneRec.decode_full`: beam search over all levels;
- `OneRec.complete`: given a *set* of allowed ``(a, b)`` prefixes per user with offline scores,
  rescore them with the fresh history and complete ``c, d`` under them.
Decoding only ever emits real items: the trie's child tables mask every step. It runs on the serving copy
of the weights (`model.onerec.serving`). This module does not read Redis or HTTP, and does not train.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from model.onerec.config import DeadlineExceeded, OneRecConfig
from model.onerec.modeling import OneRecModel, save_checkpoint
from model.onerec.one_user import OneUser
from model.onerec.serving import FrozenOneRec, ModuleNet
from model.policy import PolicyConfig, Prefix, Scored
from model.semantic_ids import SemanticIDs
from model.trie import CodeTrie
from services.catalog import Example

if TYPE_CHECKING:
    from model.onerec.fused_user import FusedUser


class OneRec:
    """Inference wrapper: history item ids in, (item_id, score) lists out; CPU, no grad."""

    PER_USER_MAX = 16  # largest call that runs user by user on the fused engine (`_per_user`)

    def __init__(self, model: OneRecModel, sid: SemanticIDs):
        self.model = model.eval()
        # decoding runs on a plain-tensor copy of the weights (about half the time per call); it is a
        # snapshot: wrap the model again after training it further
        self.net: FrozenOneRec | ModuleNet = FrozenOneRec(model)
        self.sid = sid
        self.cfg = model.cfg
        self.trie = CodeTrie(sid.codes, sid.item_ids, sid.codebook_size)
        # trie rows follow the code table order: both are built from sid.codes in the same order
        self.child = [torch.from_numpy(t) for t in self.trie.dense_tables()]
        # decoding indexes these copies: one extra all -1 row at the end, so that a dead beam (node -1)
        # looks up "no children" directly instead of through clamp + mask ops on every step
        self._child_pad = [torch.cat([t, t.new_full((1, t.shape[1]), -1)]) for t in self.child]
        # the same children as short lists (codes ascending): a node has 1-2 children on average below
        # level b, so a beam step scores (B, W, C) valid slots instead of (B, W, K) mostly-masked ones
        self._kids = [self._compact(t) for t in self._child_pad]
        self._no_root = self.child[0][0] < 0  # (K,) level-a codes absent from the trie
        self.K = sid.codebook_size
        self.row_of = {int(i): r for r, i in enumerate(sid.item_ids)}
        # item id -> row + 1 (0: not in the catalogue) for ids up to the largest one (`_known_rows`); none for
        # catalogues with sparse huge ids (the dict serves them)
        top = int(sid.item_ids.max(initial=-1))
        self._row_lut: np.ndarray | None = None
        if int(sid.item_ids.min(initial=0)) >= 0 and top < max(16 * len(sid), 1 << 20):
            self._row_lut = np.zeros(top + 1, dtype=np.int64)
            self._row_lut[sid.item_ids] = np.arange(1, len(sid) + 1)
        self.unknown_items = 0  # history items not in the catalogue (dropped, counted)
        # `complete` / `decode_full` run on a one-user engine instead of the batched torch path (same ranking, less
        # CPU: docs/PROFILE.md; `_per_user`): the compiled one (`model.onerec.fused_user`, also for calls of several
        # users) unless `fused_one_user` is off, then numpy (`model.onerec.one_user`, one-user calls only); tables
        # built on first use. `numpy_one_user` off: torch for every call
        self.numpy_one_user = True
        self.fused_one_user = True
        self._one_user: OneUser | None = None
        self._fused_user: FusedUser | None = None  # imported on first use: numba's import costs every CLI 0.3 s

    @staticmethod
    def _compact(table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense child table (nodes, K), -1 = none -> (codes, children), both (nodes, C) with C the most
        children of any node: valid codes first in ascending order, then code 0 with child -1."""
        valid = table >= 0
        width = max(1, int(valid.sum(1).max()))
        order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)[:, :width]  # valid codes, ascending
        kids = table.gather(1, order)
        return order.masked_fill(kids < 0, 0), kids

    # ---------------------------------------------------------------- persistence
    def save(self, folder: Path) -> None:
        save_checkpoint(self.model, self.sid, folder)

    @classmethod
    def load(cls, folder: Path | str, sid: SemanticIDs | None = None) -> OneRec:
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / "model.safetensors").is_file():
            raise FileNotFoundError(f"no OneRec checkpoint at {folder} (run: python -m model.onerec train)")
        cfg = OneRecConfig(**json.loads((folder / "config.json").read_text()))
        sid = sid or SemanticIDs.load(folder / "sid")
        model = OneRecModel(cfg, torch.from_numpy(sid.codes))
        model.load_state_dict(load_file(folder / "model.safetensors"))
        return cls(model, sid)

    # ---------------------------------------------------------------- helpers
    def _rows(self, histories: Sequence[Sequence[int]]) -> torch.Tensor:
        """Left-padded (B, T) item rows + 1 of the last max_len known items (T = longest, >= 1).

        Built in numpy from a lookup table (item id -> row + 1, 0 = unknown) and handed to torch once: a
        serving call pays a few numpy calls here instead of a dict lookup per item and two tensor builds."""
        known = [self._known_rows(hist)[-self.cfg.max_len :] for hist in histories]
        T = max(1, max((len(r) for r in known), default=1))
        out = np.zeros((len(histories), T), dtype=np.int64)
        for b, rows in enumerate(known):
            if len(rows):
                out[b, T - len(rows) :] = rows
        return torch.from_numpy(out)

    def _known_rows(self, hist: Sequence[int]) -> np.ndarray:
        """Rows + 1 of the catalogue items of `hist`, in order; unknown ids are dropped and counted."""
        lut = self._row_lut
        try:
            ids = None if lut is None else np.asarray(hist, dtype=np.int64).reshape(-1)
        except (OverflowError, TypeError, ValueError):  # ids outside int64: the dict decides
            ids = None
        if ids is None or lut is None:
            rows = np.array([self.row_of[i] + 1 for i in hist if i in self.row_of], dtype=np.int64)
        else:
            rows = lut[ids[(ids >= 0) & (ids < len(lut))]]
            rows = rows[rows > 0]
        self.unknown_items += len(hist) - len(rows)
        return rows

    def one_user(self) -> OneUser | FusedUser:
        """The engine of one-user completions (fused if `fused_one_user`, else numpy), over a copy of the serving
        snapshot `self.net`; each is built on first use."""
        if self.fused_one_user:
            if self._fused_user is None:
                from model.onerec.fused_user import FusedUser

                self._fused_user = FusedUser(self)
            return self._fused_user
        if self._one_user is None:
            self._one_user = OneUser(self)
        return self._one_user

    def _per_user(self, B: int) -> bool:
        """Whether a call for B users runs user by user on the one-user engine: the fused engine up to
        `PER_USER_MAX` users (the API's batches: a user costs it half what the batched torch path costs per user at
        every batch size measured, 2-16, docs/PROFILE.md), the numpy engine for one user; never for the module path
        (`ModuleNet`, a reference). Larger calls (evaluation's) keep the batched torch path: with two threads it
        decodes the whole Beauty test split in 6 s against the fused engine's 8 s, with the same metrics."""
        if not self.numpy_one_user or not isinstance(self.net, FrozenOneRec):
            return False
        return B == 1 or (self.fused_one_user and B <= self.PER_USER_MAX)

    def _last_hidden(self, histories: Sequence[Sequence[int]]) -> torch.Tensor:
        return self.net.encode_last(self._rows(histories))  # (B, D)

    def _exclusion(self, exclude: Sequence[set[int]] | None, B: int) -> torch.Tensor | None:
        if not exclude:
            return None
        mask = torch.zeros(B, len(self.sid) + 1, dtype=torch.bool)  # last column: the -1 "no leaf" index
        for b, items in enumerate(exclude):
            rows = [self.row_of[i] for i in items if i in self.row_of]
            if rows:
                mask[b, rows] = True
        return mask

    @staticmethod
    def _check(deadline: float | None) -> None:
        if deadline is not None and time.perf_counter() > deadline:
            raise DeadlineExceeded("deadline passed during decoding")

    def _step(self, h: torch.Tensor, codes: torch.Tensor, nodes: torch.Tensor, scores: torch.Tensor, level: int,
              beam: int, excl: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Expand beams one level. h (B, D); codes (B, W, level); nodes/scores (B, W) -> new (B, W').

        Serving calls this per request, so it is written for few tensor ops (each costs microseconds
        here, whatever its size) on small tensors: only each node's C valid child slots are scored (the
        head's K logits are computed, then gathered), and a dead beam (node -1) reads the last, empty row.
        """
        B, W = nodes.shape
        kc, nxt = self._kids[level][0][nodes], self._kids[level][1][nodes]  # (B, W, C) child codes, children
        logits = self.net.level_logits(h[:, None].expand(B, W, -1), codes, level).gather(2, kc)  # (B, W, C)
        invalid = nxt < 0
        if excl is not None and level == self.cfg.num_levels - 1:
            # excl (B, N + 1): column -1 (the last one) is the never-excluded "no leaf" index
            invalid |= excl[torch.arange(B)[:, None, None], nxt]
        logp = torch.log_softmax(logits.masked_fill_(invalid, -math.inf), -1)
        logp = logp.nan_to_num_(nan=-math.inf, neginf=-math.inf)  # rows without any valid child
        if level == self.cfg.num_levels - 1 and self.cfg.item_score_weight > 0:  # leaves: add the item head
            # only the beams' leaf slots (a few hundred rows, not the whole catalogue; invalid slots stay
            # -inf); the item log-softmax normaliser is one constant per user, so leaving it out keeps
            # every ranking
            logp = logp.add_(self.net.item_logits(h, nxt), alpha=self.cfg.item_score_weight)
        total = (scores[..., None] + logp).view(B, -1)  # (B, W*C)
        top, idx = total.topk(min(beam, total.shape[1]), dim=1)
        src = idx // kc.shape[2]
        new_codes = torch.cat([torch.gather(codes, 1, src[..., None].expand(-1, -1, level)),
                               torch.gather(kc.view(B, -1), 1, idx)[..., None]], -1)
        new_nodes = torch.gather(nxt.view(B, -1), 1, idx).masked_fill_(top == -math.inf, -1)
        return new_codes, new_nodes, top

    def _finish(self, nodes: torch.Tensor, scores: torch.Tensor, k: int) -> list[Scored]:
        out: list[Scored] = []
        for b in range(nodes.shape[0]):
            items: Scored = []
            for n, s in zip(nodes[b].tolist(), scores[b].tolist(), strict=True):
                if n >= 0 and s > -math.inf:
                    items.append((int(self.sid.item_ids[n]), float(s)))
                if len(items) == k:
                    break
            out.append(items)
        return out

    def _best_pairs(self, top_a: torch.Tensor, a: torch.Tensor, lb: torch.Tensor, n: int
                    ) -> list[list[tuple[int, int]]]:
        """The model's top-n (a, b) per user by log p(a) + log p(b|a) over the trie (a-beam of width W): the
        one rule behind `own_prefixes` and the own prefixes of `complete`.

        top_a, a (B, W): the W best level-a log-probs and codes; lb (B, W, K): log p(b | a), -inf off the trie.
        """
        B = a.shape[0]
        # neginf too: nan_to_num would turn -inf (pairs off the trie) into a finite number that passes the filter
        total = (top_a[..., None] + lb).nan_to_num(nan=-math.inf, neginf=-math.inf).reshape(B, -1)  # (B, W*K)
        top, idx = total.topk(min(n, total.shape[1]), dim=1)
        a_l, idx_l, top_l = a.tolist(), idx.tolist(), top.tolist()
        return [[(a_l[u][i // self.K], i % self.K) for i, t in zip(idx_l[u], top_l[u], strict=True) if t > -math.inf]
                for u in range(B)]

    def _level_a(self, h: torch.Tensor) -> torch.Tensor:
        """h (B, D) -> log p(a) (B, K), renormalised over the level-a codes of the trie."""
        la = self.net.level_logits(h, h.new_zeros(h.shape[0], 0, dtype=torch.long), 0)  # (B, K)
        return torch.log_softmax(la.masked_fill_(self._no_root, -math.inf), -1)

    def _level_b(self, h: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h (U, D), a (U,) -> (log p(b | a) (U, K) renormalised over a's children, a's level-b node (U,))."""
        node = self.child[0][0][a]  # (U,) level-b node of each a (-1: a not in the trie)
        lb = self.net.level_logits(h, a[:, None], 1)  # (U, K)
        return torch.log_softmax(lb.masked_fill_(self._child_pad[1][node] < 0, -math.inf), -1), node

    # ---------------------------------------------------------------- entry points
    @torch.no_grad()
    def own_prefixes(self, histories: Sequence[Sequence[int]], n: int) -> list[list[tuple[int, int]]]:
        """The model's own top-`n` (a, b) per user under `histories`, best first: the top-n level-a codes,
        then the best n pairs by log p(a) + log p(b|a) over the trie. `complete(own_prefixes=n)` adds
        exactly these (n <= K); prefix recall (`evaluation.prefix_recall`) measures them."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        h = self._last_hidden(histories)  # (B, D)
        B = h.shape[0]
        top_a, a = self._level_a(h).topk(min(n, self.K), dim=1)  # (B, n)
        lb, _ = self._level_b(h[:, None].expand(B, a.shape[1], -1).reshape(B * a.shape[1], -1), a.reshape(-1))
        return self._best_pairs(top_a, a, lb.view(B, a.shape[1], -1), n)

    @torch.no_grad()
    def prefix_logprobs(self, histories: Sequence[Sequence[int]], pref: np.ndarray) -> torch.Tensor:
        """log p(a) + log p(b|a) (each renormalised over the trie, the rule of `own_prefixes`) of the given (a, b)
        prefixes `pref` (M, 2) for every user: (B, M); -inf for a pair off the trie."""
        h = self._last_hidden(histories)  # (B, D)
        B = h.shape[0]
        pa, pb = (torch.as_tensor(np.ascontiguousarray(pref[:, j]), dtype=torch.long) for j in (0, 1))
        a_set = torch.unique(pa)  # (A,) ascending
        lb, _ = self._level_b(h.repeat_interleave(len(a_set), 0), a_set.repeat(B))  # (B * A, K)
        col = torch.searchsorted(a_set, pa)  # (M,) each prefix's a among a_set
        out = self._level_a(h)[:, pa] + lb.view(B, len(a_set), self.K)[:, col, pb]
        return out.nan_to_num_(nan=-math.inf, neginf=-math.inf)

    @torch.no_grad()
    def decode_full(self, histories: Sequence[Sequence[int]], k: int, beam: int,
                    exclude: Sequence[set[int]] | None = None, deadline: float | None = None
                    ) -> list[Scored]:
        """Top-k items per user by beam search over all code levels (scores: sum of log-probs)."""
        if beam < k:
            raise ValueError(f"beam ({beam}) must be >= k ({k})")
        B = len(histories)
        if self._per_user(B):
            one = self.one_user()
            return [one.decode_full(histories[b], k, beam, exclude[b] if exclude else None, deadline) for b in range(B)]
        h = self._last_hidden(histories)
        self._check(deadline)
        excl = self._exclusion(exclude, B)
        codes = torch.zeros(B, 1, 0, dtype=torch.long)
        nodes = torch.zeros(B, 1, dtype=torch.long)
        scores = torch.zeros(B, 1)
        for level in range(self.cfg.num_levels):
            codes, nodes, scores = self._step(h, codes, nodes, scores, level, beam, excl)
            self._check(deadline)
        return self._finish(nodes, scores, k)

    @torch.no_grad()
    def complete(self, histories: Sequence[Sequence[int]], prefixes: Sequence[Sequence[Prefix]], k: int,
                 policy: PolicyConfig, exclude: Sequence[set[int]] | None = None, deadline: float | None = None
                 ) -> list[Scored]:
        """Complete levels c.. under each user's allowed (a, b) prefixes, with the options of `policy`
        (`model.policy.PolicyConfig`: the beam, `policy.beam_for(k)`, and the three fields below).

        Score = model log p(a) + log p(b|a) + ... under the fresh history, plus `prefix_weight` times the
        offline log-prob of (a, b). Unknown prefixes are ignored; without own prefixes (below) a user with
        no valid prefix gets [].
        With `own_prefixes` = N > 0 the model's own top-N (a, b) under the fresh history join the set, each
        with the offline log-prob of the user's weakest given prefix + `own_prefix_floor` (a safety net when the
        offline prefixes miss what the fresh history points to; given prefixes keep their own score).
        """
        beam, prefix_weight, own_prefixes = policy.beam_for(k), policy.prefix_weight, policy.own_prefixes
        if len(prefixes) != len(histories):
            raise ValueError(f"{len(prefixes)} prefix lists for {len(histories)} users")
        B = len(histories)
        if self._per_user(B):
            one = self.one_user()
            return [one.complete(histories[b], prefixes[b], k, policy, exclude[b] if exclude else None, deadline)
                    for b in range(B)]
        h = self._last_hidden(histories)
        self._check(deadline)
        excl = self._exclusion(exclude, B)
        la = self._level_a(h)  # (B, K)
        given: list[dict[tuple[int, int], float]] = []
        for plist in prefixes:
            best: dict[tuple[int, int], float] = {}  # duplicates keep their best offline score
            for a, bb, lp in plist:
                if 0 <= a < self.K and 0 <= bb < self.K and lp > best.get((a, bb), -math.inf):
                    best[(a, bb)] = lp
            given.append(best)
        # level b depends on (user, a) only: one head run per distinct (user, a) over the given prefixes' a,
        # the model's own top a (own prefixes) and a = 0 (padding), keyed user * K + a
        user = torch.arange(B)[:, None]
        top_a, own_a = la.topk(max(0, min(own_prefixes, self.K)), dim=1)  # (B, n), n = 0: no own prefixes
        keys = torch.tensor([u * self.K + a for u, best in enumerate(given) for a, _ in best], dtype=torch.long)
        pairs = torch.unique(torch.cat([keys, (own_a + self.K * user).flatten(), self.K * user[:, 0]]))  # (U,)
        lb, node_ua = self._level_b(h[pairs // self.K], pairs % self.K)  # (U, K), (U,)
        own = ([[] for _ in range(B)] if own_prefixes <= 0 else
               self._best_pairs(top_a, own_a, lb[torch.searchsorted(pairs, own_a + self.K * user)], own_a.shape[1]))
        P = max(1, max((len(p) + len(o) for p, o in zip(prefixes, own, strict=True)), default=1))
        la_rows: list[list[int]] = []
        lb_rows: list[list[int]] = []
        off_rows: list[list[float]] = []
        for best, olist in zip(given, own, strict=True):
            floor = (min(best.values()) if best else 0.0) + policy.own_prefix_floor
            for ab in olist:
                best.setdefault(ab, floor)
            pad = P - len(best)  # padding entries (0, 0) get -inf and never survive
            la_rows.append([a for a, _ in best] + [0] * pad)
            lb_rows.append([bb for _, bb in best] + [0] * pad)
            off_rows.append(list(best.values()) + [-math.inf] * pad)
        pa, pb, off = torch.tensor(la_rows), torch.tensor(lb_rows), torch.tensor(off_rows)  # (B, P)
        inv = torch.searchsorted(pairs, pa + self.K * user)  # (B, P) row of lb of each prefix's (user, a)
        # model scores of the two given levels, renormalised over the trie like in decode_full
        node_b = self._child_pad[1][node_ua[inv], pb]  # (B, P)
        scores = torch.gather(la, 1, pa) + lb[inv, pb] + prefix_weight * off
        scores = scores.masked_fill_(node_b < 0, -math.inf).nan_to_num_(nan=-math.inf, neginf=-math.inf)
        codes = torch.stack([pa, pb], -1)
        nodes = node_b
        self._check(deadline)
        for level in range(2, self.cfg.num_levels):
            codes, nodes, scores = self._step(h, codes, nodes, scores, level, beam, excl)
            self._check(deadline)
        return self._finish(nodes, scores, k)


class OneRecRecommender:
    """`Recommender` for the evaluation harness (mode ``onerec``)."""

    def __init__(self, onerec: OneRec, beam: int = 20):
        self.onerec = onerec
        self.beam = beam

    @classmethod
    def load(cls, folder: Path | str, beam: int = 20) -> OneRecRecommender:
        return cls(OneRec.load(folder), beam)

    def recommend(self, examples: Sequence[Example], k: int) -> list[list[int]]:
        out = self.onerec.decode_full([e.history for e in examples], k, max(self.beam, k))  # beam at least k
        return [[i for i, _ in r] for r in out]
