"""`OneRec.complete` and `OneRec.decode_full` for a batch of one user, in numpy (`model.onerec.numpy_net`): what
the API runs per request at low and moderate rates. Same rule, same scores and same order as the batched torch
path in `model.onerec.decoding` (to float rounding; `tests/test_one_user.py` compares them), with less
CPU (docs/PROFILE.md: 5.10 vs 5.79 ms per answer at 100/s).

Steps, as in `OneRec.complete`: the trunk once; log p(a) over the trie; the given prefixes (best offline
score per (a, b)) plus the model's own top-N (a, b); log p(b | a) for every distinct a in one head pass;
then levels c, d by beam search over each node's valid children only (the head's last layer is computed for
those columns alone), the item head added at the leaves.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch

from model.onerec.config import DeadlineExceeded, OneRecConfig
from model.onerec.numpy_net import NumpyNet
from model.onerec.serving import FrozenOneRec, ModuleNet
from model.policy import PolicyConfig, Prefix, Scored
from model.semantic_ids import SemanticIDs


class Tables(Protocol):
    """What a one-user engine reads of `model.onerec.decoding.OneRec` (named here, not imported: that module
    imports this one)."""

    net: FrozenOneRec | ModuleNet
    cfg: OneRecConfig
    sid: SemanticIDs
    K: int
    child: list[torch.Tensor]
    _child_pad: list[torch.Tensor]
    _kids: list[tuple[torch.Tensor, torch.Tensor]]
    row_of: dict[int, int]

    def _known_rows(self, hist: Sequence[int]) -> np.ndarray: ...


def _log_softmax(x: np.ndarray) -> np.ndarray:
    """Log-softmax over the last axis; a row with no finite entry stays all -inf."""
    m = x.max(-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = x - m - np.log(np.add.reduce(np.exp(x - m), -1, keepdims=True))
    return np.where(np.isnan(out), -np.inf, out)


def _top(x: np.ndarray, n: int) -> np.ndarray:
    """Indices of the n largest entries of the 1-D `x`, largest first."""
    if n <= 0:
        return np.zeros(0, dtype=np.int64)
    idx = np.argpartition(-x, n - 1)[:n] if n < len(x) else np.arange(len(x))
    return idx[np.argsort(-x[idx], kind="stable")]


def finish(nodes: np.ndarray, scores: np.ndarray, k: int, item_ids: np.ndarray) -> Scored:
    """The first k live leaves of a final beam (node >= 0, finite score) as (item id, score), best first."""
    out: Scored = []
    for n, s in zip(nodes.tolist(), scores.tolist(), strict=True):
        if n >= 0 and s > -math.inf:
            out.append((int(item_ids[n]), float(s)))
        if len(out) == k:
            break
    return out


class OneUser:
    """The numpy tables and network one-user completions read: built once from a `OneRec`."""

    def __init__(self, onerec: Tables) -> None:
        assert isinstance(onerec.net, FrozenOneRec), "the numpy engine copies the serving snapshot"
        self.onerec = onerec
        self.net = NumpyNet(onerec.net)
        self.K, self.levels = onerec.K, onerec.cfg.num_levels
        self.root = onerec.child[0][0].numpy()  # (K,) level-b node of each a, -1: a not in the trie
        self.no_root = self.root < 0
        self.child_pad = [t.numpy() for t in onerec._child_pad]
        self.kids = [(codes.numpy(), kids.numpy()) for codes, kids in onerec._kids]
        self.item_ids = onerec.sid.item_ids
        self.n_items = len(onerec.sid)

    def _check(self, deadline: float | None) -> None:
        if deadline is not None and time.perf_counter() > deadline:
            raise DeadlineExceeded("deadline passed during decoding")

    def complete(self, history: Sequence[int], prefixes: Sequence[Prefix], k: int, policy: PolicyConfig,
                 exclude: set[int] | None = None, deadline: float | None = None) -> Scored:
        """One user's `OneRec.complete`: levels c.. under the allowed (a, b) prefixes (plus the model's own)."""
        K, net = self.K, self.net
        h = self._hidden(history)
        self._check(deadline)
        la = _log_softmax(np.where(self.no_root, -np.inf, net.level_logits(h, None, 0)))  # (K,)
        best: dict[tuple[int, int], float] = {}  # duplicates keep their best offline score
        for a, b, lp in prefixes:
            if 0 <= a < K and 0 <= b < K and lp > best.get((a, b), -math.inf):
                best[(a, b)] = lp
        own_a = _top(la, min(policy.own_prefixes, K))
        given_a = np.fromiter((a for a, _ in best), np.int64, len(best))
        a_set = np.unique(np.concatenate([given_a, own_a]))  # one level-b row per distinct a
        node_a = self.root[a_set]
        lb = net.level_logits(h, a_set[:, None], 1)  # (A, K)
        lb = _log_softmax(np.where(self.child_pad[1][node_a] < 0, -np.inf, lb))
        if len(own_a):
            pair = (la[own_a][:, None] + lb[np.searchsorted(a_set, own_a)]).reshape(-1)  # (n * K,)
            floor = (min(best.values()) if best else 0.0) + policy.own_prefix_floor
            for i in _top(pair, len(own_a)).tolist():
                if pair[i] > -math.inf:
                    best.setdefault((int(own_a[i // K]), i % K), floor)
        if not best:
            return []
        pa = np.fromiter((a for a, _ in best), np.int64, len(best))
        pb = np.fromiter((b for _, b in best), np.int64, len(best))
        off = np.fromiter(best.values(), np.float32, len(best))
        inv = np.searchsorted(a_set, pa)
        nodes = self.child_pad[1][node_a[inv], pb]  # (P,) level-c nodes
        scores = np.where(nodes < 0, -np.inf, la[pa] + lb[inv, pb] + np.float32(policy.prefix_weight) * off)
        codes = np.stack([pa, pb], -1)  # (P, 2)
        excl = self._exclusion(exclude)
        self._check(deadline)
        for level in range(2, self.levels):
            codes, nodes, scores = self._step(h, codes, nodes, scores, level, policy.beam_for(k), excl)
            self._check(deadline)
        return self._finish(nodes, scores, k)

    def decode_full(self, history: Sequence[int], k: int, beam: int, exclude: set[int] | None = None,
                    deadline: float | None = None) -> Scored:
        """One user's `OneRec.decode_full`: beam search over all code levels."""
        h = self._hidden(history)
        self._check(deadline)
        excl = self._exclusion(exclude)
        codes, nodes, scores = np.zeros((1, 0), np.int64), np.zeros(1, np.int64), np.zeros(1, np.float32)
        for level in range(self.levels):
            codes, nodes, scores = self._step(h, codes, nodes, scores, level, beam, excl)
            self._check(deadline)
        return self._finish(nodes, scores, k)

    def _hidden(self, history: Sequence[int]) -> np.ndarray:
        """The trunk's last hidden state (D,) of the last max_len known items (the padding row when none)."""
        rows = self.onerec._known_rows(history)[-self.onerec.cfg.max_len :]
        return self.net.encode_last(rows if len(rows) else np.zeros(1, dtype=np.int64))

    def _finish(self, nodes: np.ndarray, scores: np.ndarray, k: int) -> Scored:
        return finish(nodes, scores, k, self.item_ids)

    def _exclusion(self, exclude: set[int] | None) -> np.ndarray | None:
        """(N + 1,) True = may not be listed; the last entry is the never-excluded "no leaf" index -1."""
        if not exclude:
            return None
        row_of = self.onerec.row_of
        mask = np.zeros(self.n_items + 1, dtype=bool)
        mask[[row_of[i] for i in exclude if i in row_of]] = True
        return mask

    def _step(self, h: np.ndarray, codes: np.ndarray, nodes: np.ndarray, scores: np.ndarray, level: int,
              beam: int, excl: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Expand beams one level over their nodes' valid children: codes (W, level), nodes/scores (W,)."""
        kc, nxt = self.kids[level][0][nodes], self.kids[level][1][nodes]  # (W, C) child codes, children
        invalid = nxt < 0
        last = level == self.levels - 1
        if excl is not None and last:
            invalid |= excl[nxt]
        logp = _log_softmax(np.where(invalid, -np.inf, self.net.level_logits(h, codes, level, kc)))
        if last and self.onerec.cfg.item_score_weight > 0:  # leaves: the item head (see `OneRec._step`)
            logp = logp + np.float32(self.onerec.cfg.item_score_weight) * self.net.item_logits(h, nxt)
        total = (scores[:, None] + logp).reshape(-1)  # (W * C,)
        idx = _top(total, min(beam, len(total)))
        top = total[idx]
        new_codes = np.concatenate([codes[idx // kc.shape[1]], kc.reshape(-1)[idx][:, None]], 1)
        return new_codes, np.where(top == -np.inf, -1, nxt.reshape(-1)[idx]), top
