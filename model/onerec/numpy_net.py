"""The serving network of the lightweight OneRec for one user at a time, in numpy.

A one-user completion (the API's call at low and moderate rates) is ~150 operations on tiny arrays; torch
pays several microseconds of dispatch per operation, and on this project's virtual machines a call that
comes 10 ms after the previous one pays about twice its back-to-back CPU (docs/PROFILE.md). numpy's
operations are cheaper per call and its code is smaller: 0.87x torch's CPU per completion at 10 ms spacing,
0.88x per answer end to end at 100/s (`benchmarks.onerec_latency`, `benchmarks.online_ab`; docs/PROFILE.md).
`NumpyNet` is a float32 copy of a `model.onerec.serving.FrozenOneRec` snapshot with the same three calls
(`encode_last`, `level_logits`, `item_logits`) for one user's arrays; results equal the torch ones to float
rounding (tests compare them). The completion logic over it is `model.onerec.one_user`. numpy's BLAS runs one
thread here (`one_blas_thread`): worker threads would only spin between products this small.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from model.onerec.serving import FrozenOneRec


def one_blas_thread() -> None:
    """Limit numpy's BLAS, and scipy's (the one the fused engine's compiled `np.dot` calls), to one thread in this
    process (the online model's process). scipy's BLAS is loaded here first: a library loaded after the limit
    keeps its default threads, which spin after every small product (measured: twice the CPU per answer)."""
    import scipy.linalg  # noqa: F401 - loads scipy's BLAS so that the limit below reaches it
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1, user_api="blas")


def _np(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().numpy(), dtype=np.float32)


def layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """LayerNorm over the last axis, eps 1e-5 (torch's default)."""
    inv = 1.0 / x.shape[-1]
    xc = x - np.add.reduce(x, -1, keepdims=True) * inv
    var = np.add.reduce(xc * xc, -1, keepdims=True) * inv
    return xc * (1.0 / np.sqrt(var + 1e-5)) * w + b


def gelu(x: np.ndarray) -> np.ndarray:
    """Exact (erf) GELU, torch's default, computed by torch on the same memory (no copy): its vectorised erf
    costs a tenth of scipy's at these sizes, the largest single cost of a one-user completion otherwise."""
    return F.gelu(torch.from_numpy(x)).numpy()  # type: ignore[no-any-return]


class NumpyNet:
    """float32 numpy copy of a `FrozenOneRec` (itself a snapshot of the trained weights)."""

    def __init__(self, net: FrozenOneRec) -> None:
        self.d, self.heads_n, self.max_len = net.d, net.heads_n, net.max_len
        self.inputs, self.pos, self.dec = _np(net.inputs), _np(net.pos), _np(net.dec)
        self.blocks = [tuple((_np(w), _np(b)) for w, b in blk) for blk in net.blocks]
        self.norm = (_np(net.norm[0]), _np(net.norm[1]))
        self.level_heads = [tuple((_np(w), _np(b)) for w, b in head) for head in net.level_heads]
        self.offset = net.offset.numpy().astype(np.int64)
        self.items = None if net.items is None else _np(net.items)
        self._causal: dict[int, np.ndarray] = {}

    def _mask(self, T: int) -> np.ndarray:
        got = self._causal.get(T)
        if got is None:
            got = self._causal[T] = np.triu(np.full((T, T), -np.inf, dtype=np.float32), 1)
        return got

    def encode_last(self, rows: np.ndarray) -> np.ndarray:
        """rows (T,) item rows + 1 of one user (no padding; [0] for an empty history) -> last hidden state (D,).

        Same as `FrozenOneRec.encode_last` for a batch of one."""
        T, D, H = len(rows), self.d, self.heads_n
        dh = D // H
        scale = 1.0 / math.sqrt(dh)
        x = self.inputs[rows] + self.pos[self.max_len - T :]  # (T, D)
        last = len(self.blocks) - 1
        for i, ((n1w, n1b), (qkv_w, qkv_b), (pw, pb), (n2w, n2b), (f1w, f1b), (f2w, f2b)) in enumerate(self.blocks):
            qkv = (layer_norm(x, n1w, n1b) @ qkv_w + qkv_b).reshape(T, 3, H, dh).transpose(1, 2, 0, 3)
            q, k, v = qkv[0], qkv[1], qkv[2]  # (H, T, dh)
            if i == last:  # only the last position's output is needed from the final block; it sees every key
                q, x = q[:, -1:], x[-1:]
                s = (q @ k.transpose(0, 2, 1)) * scale
            else:
                s = (q @ k.transpose(0, 2, 1)) * scale + self._mask(T)
            s = np.exp(s - s.max(-1, keepdims=True))
            s /= np.add.reduce(s, -1, keepdims=True)
            x = x + (s @ v).transpose(1, 0, 2).reshape(-1, D) @ pw + pb
            x = x + gelu(layer_norm(x, n2w, n2b) @ f1w + f1b) @ f2w + f2b
        return layer_norm(x[-1], *self.norm)

    def level_logits(self, h: np.ndarray, prev: np.ndarray | None, level: int,
                     cols: np.ndarray | None = None) -> np.ndarray:
        """h (D,), prev (R, level) codes of earlier levels (None at level 0) -> logits (R, K) ((K,) at level 0);
        with `cols` (R, C), only those code columns of each row: (R, C) (the head's last layer on C of K)."""
        z = h
        if level > 0:
            assert prev is not None
            z = h + self.dec[prev[:, :level] + self.offset[:level]].sum(1)
        elif cols is not None:  # level 0 of a beam search: one row per beam
            z = np.broadcast_to(h, (cols.shape[0], h.shape[0]))
        (nw, nb), (w1, b1), (w2, b2) = self.level_heads[level]
        y = gelu(layer_norm(z, nw, nb) @ w1 + b1)
        if cols is None:
            return y @ w2 + b2  # type: ignore[no-any-return]
        return np.einsum("rf,frc->rc", y, w2[:, cols]) + b2[cols]  # type: ignore[no-any-return]

    def item_logits(self, h: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Unnormalised item-head logits of catalogue rows `rows` (any shape; -1 reads the padding row) for h (D,)."""
        assert self.items is not None
        return self.items[rows + 1] @ h  # type: ignore[no-any-return]
