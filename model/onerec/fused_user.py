"""The fused one-user engine: `OneRec.complete` / `decode_full` for one user in a handful of compiled calls
(numba, `model.onerec.fused_kernels`), the API's engine per request at low and moderate rates.

Same rule and order as `model.onerec.one_user.OneUser` (numpy) and the batched torch path, to float rounding
(`tests/test_one_user.py` compares them): the trunk once; log p(a) over the trie; the given prefixes (best
offline score per (a, b)) plus the model's own top-N (a, b); log p(b | a) per distinct a; then levels c, d by beam
search over each node's valid children, the item head added at the leaves. What differs is the cost: the numpy
engine runs ~150 array operations per answer, each paying dispatch and, at live spacing, cold caches; here a
level-head row costs O(D) before its output layer (the LayerNorm rewrite in `model.onerec.fused_kernels`), the
output layer is computed for valid children only, and rows that cannot place a candidate are skipped (exact
pruning, `fused_kernels.beam_step`). Calls for several users run user by user (`OneRec._per_user`).
docs/PROFILE.md has the measurements.

The kernels compile on first use (a few seconds) and are cached on disk by numba (``cache=True``: beside the
module, or under ``NUMBA_CACHE_DIR``); `online_api.model_process.warm_up` runs them before a process reports
ready.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from model.onerec import fused_kernels as fk
from model.onerec.config import DeadlineExceeded
from model.onerec.numpy_net import NumpyNet
from model.onerec.one_user import Tables, finish
from model.onerec.serving import FrozenOneRec
from model.policy import PolicyConfig, Prefix, Scored


def _stack(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """One contiguous float32 array with a leading axis over `arrays` (per layer or per level)."""
    return np.ascontiguousarray(np.stack(list(arrays)), dtype=np.float32)


class FusedUser:
    """Compiled one-user completions over a float32 copy of a `OneRec`'s serving snapshot."""

    def __init__(self, onerec: Tables) -> None:
        assert isinstance(onerec.net, FrozenOneRec), "the fused engine copies the serving snapshot"
        net = NumpyNet(onerec.net)
        self.onerec = onerec
        self.kernels = fk  # every compiled call goes through here (tests count them)
        self.K, self.levels, self.n_heads = onerec.K, onerec.cfg.num_levels, net.heads_n
        self.item_w = float(onerec.cfg.item_score_weight)
        blocks = net.blocks  # per block: ln1, qkv, proj, ln2, ff1, ff2 as (weight, bias)
        self.trunk = (net.inputs, net.pos, self.n_heads,
                      *(_stack([blk[i][j] for blk in blocks]) for i in range(6) for j in range(2)),
                      *net.norm)  # fmt: skip
        # level heads: LN(g, beta) -> W1 (D, D) + b1 -> GELU -> W2 (D, K) + b2, with the LayerNorm rewrite
        g = _stack([head[0][0] for head in net.level_heads])  # (L, D)
        beta = _stack([head[0][1] for head in net.level_heads])
        w1 = _stack([head[1][0] for head in net.level_heads])  # (L, D, D), (in, out)
        self.g, self.w1 = g, w1
        self.c0 = _stack([beta[lv] @ w1[lv] + net.level_heads[lv][1][1] for lv in range(self.levels)])  # (L, D)
        self.w2t = _stack([head[2][0].T for head in net.level_heads])  # (L, K, D): one output column per row
        self.b2 = _stack([head[2][1] for head in net.level_heads])  # (L, K)
        decc = net.dec - net.dec.mean(-1, keepdims=True)  # centred decoder embeddings ((L - 1) K, D)
        self.decc = np.ascontiguousarray(decc, dtype=np.float32)
        tdec = np.zeros((self.levels, max(1, len(decc)), g.shape[1]), np.float32)
        for lv in range(1, self.levels):  # tdec[l, j K + c] = (decc[j K + c] * g[l]) @ W1[l], j < l
            tdec[lv, : lv * self.K] = (decc[: lv * self.K] * g[lv]) @ w1[lv]
        self.tdec = tdec
        self.items = np.zeros((1, 1), np.float32) if net.items is None else net.items
        self.root = onerec.child[0][0].numpy().astype(np.int64)
        self.child1 = onerec._child_pad[1].numpy().astype(np.int64)
        self.kids = [(np.ascontiguousarray(c.numpy(), np.int64), np.ascontiguousarray(n.numpy(), np.int64))
                     for c, n in onerec._kids]
        self.item_ids = onerec.sid.item_ids
        self._no_excl = np.zeros(0, dtype=np.int64)

    def _check(self, deadline: float | None) -> None:
        if deadline is not None and time.perf_counter() > deadline:
            raise DeadlineExceeded("deadline passed during decoding")

    def _user(self, history: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(h, hc, U) of the user: the trunk's last hidden state, its centred copy and the heads' user terms."""
        rows = self.onerec._known_rows(history)[-self.onerec.cfg.max_len :]
        h = self.kernels.encode_last(rows if len(rows) else np.zeros(1, dtype=np.int64), *self.trunk)
        hc, U = self.kernels.head_user(h, self.g, self.w1)
        return h, hc, U

    def complete(self, history: Sequence[int], prefixes: Sequence[Prefix], k: int, policy: PolicyConfig,
                 exclude: set[int] | None = None, deadline: float | None = None) -> Scored:
        """One user's `OneRec.complete`: levels c.. under the allowed (a, b) prefixes (plus the model's own)."""
        K = self.K
        h, hc, U = self._user(history)
        self._check(deadline)
        # one C call for the list of tuples; codes off the codebook (any size: float rounding keeps them off) and
        # scores of -inf / NaN are dropped by the kernel
        try:
            given = np.array(prefixes, dtype=np.float64).reshape(-1, 3)
        except (OverflowError, TypeError, ValueError):  # ints beyond float range: filtered in Python first
            given = np.array([p for p in prefixes if 0 <= p[0] < K and 0 <= p[1] < K], dtype=np.float64).reshape(-1, 3)
        codes_ab = np.clip(given[:, :2], -1, K).astype(np.int64)
        pa, pb, plp = codes_ab[:, 0].copy(), codes_ab[:, 1].copy(), given[:, 2].copy()
        (c0_, n0), (c1_, n1) = self.kids[0], self.kids[1]
        codes, nodes, scores = self.kernels.prefix_beams(
            K, pa, pb, plp, int(policy.own_prefixes), float(policy.own_prefix_floor), float(policy.prefix_weight),
            self.root, self.child1, c0_, n0, c1_, n1, hc, U, self.decc, self.tdec, self.c0, self.w2t, self.b2)
        self._check(deadline)
        return self._levels(2, codes, nodes, scores, policy.beam_for(k), k, h, hc, U, exclude, deadline)

    def decode_full(self, history: Sequence[int], k: int, beam: int, exclude: set[int] | None = None,
                    deadline: float | None = None) -> Scored:
        """One user's `OneRec.decode_full`: beam search over all code levels."""
        h, hc, U = self._user(history)
        self._check(deadline)
        codes, nodes, scores = np.zeros((1, 0), np.int64), np.zeros(1, np.int64), np.zeros(1)
        return self._levels(0, codes, nodes, scores, beam, k, h, hc, U, exclude, deadline)

    def _levels(self, start: int, codes: np.ndarray, nodes: np.ndarray, scores: np.ndarray, beam: int, k: int,
                h: np.ndarray, hc: np.ndarray, U: np.ndarray, exclude: set[int] | None,
                deadline: float | None) -> Scored:
        """Beam steps from level `start` to the leaves, then the first k live items."""
        excl = self._exclusion(exclude)
        for level in range(start, self.levels):
            kc, kn = self.kids[level]
            codes, nodes, scores = self.kernels.beam_step(
                level, self.K, codes, nodes, scores, beam, kc, kn, excl, level == self.levels - 1, self.item_w,
                self.items, h, hc, U, self.decc, self.tdec, self.c0, self.w2t, self.b2)
            self._check(deadline)
        return finish(nodes, scores, k, self.item_ids)

    def _exclusion(self, exclude: set[int] | None) -> np.ndarray:
        """The catalogue rows that may not be listed, sorted (the kernels look leaves up by binary search)."""
        if not exclude:
            return self._no_excl
        row_of = self.onerec.row_of
        return np.sort(np.fromiter((row_of[i] for i in exclude if i in row_of), np.int64))
