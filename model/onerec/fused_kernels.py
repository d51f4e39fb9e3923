"""numba kernels of the fused one-user engine (`model.onerec.fused_user`): the trunk, the level heads and the
beam steps of one user's completion compiled into a few machine-code calls instead of ~150 numpy operations.

Exact rewrites make a level-head row cost O(D) instead of O(D^2) before its output layer. A level head is
``LN(h + sum_j dec[c_j]) @ W1 + b1``; LayerNorm is ``zc * inv * g + beta`` with ``zc`` the centred input and
``inv`` one scalar per row, and centring is linear, so (``hc`` = centred h, ``ec`` = centred dec rows)::

    LN(z) @ W1 + b1 = inv * ((hc * g) @ W1 + sum_j (ec[c_j] * g) @ W1) + (beta @ W1 + b1)

``(hc * g) @ W1`` is one matrix-vector product per user and level (`head_user`), ``(ec[r] * g) @ W1`` a table
per level built once (`model.onerec.fused_user`), and ``inv`` needs only ``zc = hc + sum_j ec[c_j]``. The output
layer is computed for the valid children of a node only (the others are -inf before the softmax anyway), and the
beam steps skip rows that cannot place a candidate (`beam_step`, `prefix_beams`: exact pruning by score order).

Every kernel is compiled with bounds checks (``boundscheck=True``; no cost measurable against the run-to-run
spread in an ad hoc timing, docs/PROFILE.md): an index bug raises IndexError, which the API answers by its
fallback, instead of reading or writing outside an array (a crash of the process, or worse, a wrong answer).

Array layouts (all C-contiguous): float32 weights, int64 indices; a level's children tables are ``codes``,
``nodes`` (n_nodes + 1, C): valid children first, -1 = none, the last row all -1 (the "dead beam" row).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

LN_EPS = np.float32(1e-5)
NEG = -np.inf
_FAST = {"nsz", "arcp", "contract", "reassoc"}  # no nnan/ninf: -inf is a real value in the beam code
_SQRT_HALF = np.float32(1.0 / math.sqrt(2.0))


@njit(cache=True, boundscheck=True, fastmath=_FAST)
def _layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:  # pragma: no cover - jit
    """Rows of x (T, D) -> LayerNorm(x) (T, D), torch's eps."""
    T, D = x.shape
    out = np.empty_like(x)
    for t in range(T):
        mu = np.float32(0.0)
        for i in range(D):
            mu += x[t, i]
        mu /= D
        var = np.float32(0.0)
        for i in range(D):
            d = x[t, i] - mu
            var += d * d
        inv = np.float32(1.0) / np.sqrt(var / D + LN_EPS)
        for i in range(D):
            out[t, i] = (x[t, i] - mu) * inv * w[i] + b[i]
    return out


@njit(cache=True, boundscheck=True, fastmath=_FAST)
def _gelu_(x: np.ndarray) -> None:  # pragma: no cover - jit
    """Exact (erf) GELU in place, over a flat view."""
    flat = x.reshape(-1)
    for i in range(flat.shape[0]):
        v = flat[i]
        flat[i] = np.float32(0.5) * v * (np.float32(1.0) + math.erf(v * _SQRT_HALF))


@njit(cache=True, boundscheck=True, fastmath=_FAST)
def encode_last(rows: np.ndarray, inputs: np.ndarray, pos: np.ndarray, n_heads: int,
                ln1w: np.ndarray, ln1b: np.ndarray, wqkv: np.ndarray, bqkv: np.ndarray, wp: np.ndarray,
                bp: np.ndarray, ln2w: np.ndarray, ln2b: np.ndarray, w1: np.ndarray, b1: np.ndarray,
                w2: np.ndarray, b2: np.ndarray, nw: np.ndarray, nb: np.ndarray) -> np.ndarray:  # pragma: no cover
    """rows (T,) item rows + 1 of one user (no padding) -> the trunk's last hidden state (D,); per-block
    weights stacked on a leading layer axis, linear weights as (in, out)."""
    T, D = rows.shape[0], inputs.shape[1]
    n_layers, max_len = wqkv.shape[0], pos.shape[0]
    dh = D // n_heads
    scale = np.float32(1.0 / math.sqrt(dh))
    x = np.empty((T, D), np.float32)
    for t in range(T):
        x[t] = inputs[rows[t]] + pos[max_len - T + t]
    for layer in range(n_layers):
        qkv = np.dot(_layer_norm(x, ln1w[layer], ln1b[layer]), wqkv[layer]) + bqkv[layer]  # (T, 3D)
        t0 = T - 1 if layer == n_layers - 1 else 0  # the last block: only the last position's output
        att = np.zeros((T - t0, D), np.float32)
        s = np.empty(T, np.float32)
        for hd in range(n_heads):
            q0, k0, v0 = hd * dh, D + hd * dh, 2 * D + hd * dh
            for t in range(t0, T):  # causal: position t sees keys 0..t
                m = np.float32(NEG)
                for j in range(t + 1):
                    acc = np.float32(0.0)
                    for e in range(dh):
                        acc += qkv[t, q0 + e] * qkv[j, k0 + e]
                    s[j] = acc * scale
                    m = max(m, s[j])
                tot = np.float32(0.0)
                for j in range(t + 1):
                    s[j] = np.exp(s[j] - m)
                    tot += s[j]
                for j in range(t + 1):
                    p = s[j] / tot
                    for e in range(dh):
                        att[t - t0, q0 + e] += p * qkv[j, v0 + e]
        xs = x[t0:] + np.dot(att, wp[layer]) + bp[layer]
        f = np.dot(_layer_norm(xs, ln2w[layer], ln2b[layer]), w1[layer]) + b1[layer]
        _gelu_(f)
        x = xs + np.dot(f, w2[layer]) + b2[layer]
    return _layer_norm(x[-1:], nw, nb)[0]


@njit(cache=True, boundscheck=True, fastmath=_FAST)
def head_user(h: np.ndarray, g: np.ndarray, w1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover
    """h (D,) -> (hc (D,) centred h, U (L, D) with U[l] = (hc * g[l]) @ w1[l])."""
    L, D = g.shape
    hc = h - np.float32(h.sum() / D)
    U = np.empty((L, D), np.float32)
    for level in range(L):
        U[level] = np.dot(hc * g[level], w1[level])
    return hc, U


@njit(cache=True, boundscheck=True, fastmath=_FAST)
def head_hidden(level: int, codes: np.ndarray, K: int, hc: np.ndarray, U: np.ndarray, decc: np.ndarray,
                tdec: np.ndarray, c0: np.ndarray) -> np.ndarray:  # pragma: no cover
    """The level head's hidden layer (after GELU) (D,) for one row of earlier codes `codes` (>= level,)."""
    D = hc.shape[0]
    zc = hc.copy()
    y = U[level].copy()
    for j in range(level):
        r = j * K + codes[j]
        for i in range(D):
            zc[i] += decc[r, i]
            y[i] += tdec[level, r, i]
    var = np.float32(0.0)
    for i in range(D):
        var += zc[i] * zc[i]
    inv = np.float32(1.0) / np.sqrt(var / D + LN_EPS)
    for i in range(D):
        v = y[i] * inv + c0[level, i]
        y[i] = np.float32(0.5) * v * (np.float32(1.0) + math.erf(v * _SQRT_HALF))
    return y


@njit(cache=True, boundscheck=True, fastmath=_FAST)
def _dot(a: np.ndarray, b: np.ndarray) -> np.float32:  # pragma: no cover - jit
    acc = np.float32(0.0)
    for i in range(a.shape[0]):
        acc += a[i] * b[i]
    return acc


@njit(cache=True, boundscheck=True)
def _member(sorted_rows: np.ndarray, n: int) -> bool:  # pragma: no cover - jit
    i = np.searchsorted(sorted_rows, n)
    return i < sorted_rows.shape[0] and sorted_rows[i] == n


@njit(cache=True, boundscheck=True, fastmath=_FAST)
def row_logprobs(y: np.ndarray, level: int, kc: np.ndarray, kn: np.ndarray, w2t: np.ndarray, b2: np.ndarray,
                 excl: np.ndarray, use_excl: bool, out: np.ndarray) -> None:  # pragma: no cover - jit
    """Log-softmax over one node's children slots (codes kc, children kn, -1 = none; with `use_excl`, leaves
    whose row is in the sorted `excl` are masked too) into out[:C]; invalid slots get -inf."""
    C = kc.shape[0]
    m = NEG
    for c in range(C):
        n = kn[c]
        if n < 0 or (use_excl and excl.shape[0] > 0 and _member(excl, n)):
            out[c] = NEG
        else:
            col = kc[c]
            acc = np.float32(0.0)
            for i in range(y.shape[0]):
                acc += y[i] * w2t[level, col, i]
            out[c] = acc + b2[level, col]
            m = max(m, out[c])
    if m == NEG:
        return
    tot = 0.0
    for c in range(C):
        if out[c] > NEG:
            tot += math.exp(out[c] - m)
    lse = m + math.log(tot)
    for c in range(C):
        if out[c] > NEG:
            out[c] = out[c] - lse


@njit(cache=True, boundscheck=True)
def top_order(x: np.ndarray, n: int) -> np.ndarray:  # pragma: no cover - jit
    """Indices of the n largest entries of x (finite or not), largest first, ties by index: one pass that keeps
    a sorted list of the best n (cheaper than a full sort for n much smaller than len(x))."""
    n = min(n, x.shape[0])
    if n <= 0:
        return np.zeros(0, np.int64)
    idx = np.empty(n, np.int64)
    val = np.empty(n)
    size = 0
    for i in range(x.shape[0]):
        v = x[i]
        if size == n:
            if not v > val[n - 1]:
                continue
            size -= 1
        j = size  # insert after every kept value >= v: ties keep index order
        while j > 0 and val[j - 1] < v:
            idx[j], val[j] = idx[j - 1], val[j - 1]
            j -= 1
        idx[j], val[j] = i, v
        size += 1
    return idx[:size]


@njit(cache=True, boundscheck=True)
def _push(best: np.ndarray, size: int, v: float) -> int:
    """Keep in best (n,) the n largest values pushed so far, descending; returns the new size."""
    n = best.shape[0]
    if size == n:
        if not v > best[n - 1]:
            return size
        size -= 1
    j = size
    while j > 0 and best[j - 1] < v:
        best[j] = best[j - 1]
        j -= 1
    best[j] = v
    return size + 1


@njit(cache=True, boundscheck=True)
def beam_step(level: int, K: int, codes: np.ndarray, nodes: np.ndarray, scores: np.ndarray, beam: int,
              kids_codes: np.ndarray, kids_nodes: np.ndarray, excl: np.ndarray, last: bool, item_w: float,
              items: np.ndarray, h: np.ndarray, hc: np.ndarray, U: np.ndarray, decc: np.ndarray, tdec: np.ndarray,
              c0: np.ndarray, w2t: np.ndarray, b2: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # pragma: no cover - jit
    """Expand the live beams (node >= 0, finite score) one level over their nodes' valid children and keep the
    best `beam` finite candidates: codes (W', level + 1), nodes (W',), scores (W',), best first. At the `last`
    level the excluded leaves (rows in the sorted `excl`) are masked before the softmax and the item head is added
    (weight `item_w`)."""
    W, C = codes.shape[0], kids_codes.shape[1]
    cand = np.full(W * C, NEG)
    lp = np.empty(C)
    # a child's score is its parent's + a log-prob <= 0, unless the item head adds to it: rows in descending
    # score order, and once `beam` candidates beat a row's own score no later row can place one (exact pruning)
    bounded = not (last and item_w > 0)
    best = np.empty(max(beam, 1))
    size = 0
    for w in np.argsort(-scores, kind="mergesort"):
        node = nodes[w]
        if node < 0 or scores[w] == NEG:
            continue
        if bounded and size == beam and scores[w] < best[beam - 1]:
            break
        y = head_hidden(level, codes[w], K, hc, U, decc, tdec, c0)
        row_logprobs(y, level, kids_codes[node], kids_nodes[node], w2t, b2, excl, last, lp)
        for c in range(C):
            if lp[c] > NEG:
                v = lp[c]
                if last and item_w > 0:
                    v += item_w * _dot(items[kids_nodes[node, c] + 1], h)
                cand[w * C + c] = scores[w] + v
                if bounded:
                    size = _push(best, size, cand[w * C + c])
    idx = top_order(cand, beam)
    keep = 0
    for i in range(idx.shape[0]):
        if cand[idx[i]] > NEG:
            keep += 1
    new_codes = np.empty((keep, codes.shape[1] + 1), np.int64)
    new_nodes = np.empty(keep, np.int64)
    new_scores = np.empty(keep)
    for i in range(keep):
        w, c = idx[i] // C, idx[i] % C
        new_codes[i, : codes.shape[1]] = codes[w]
        new_codes[i, codes.shape[1]] = kids_codes[nodes[w], c]
        new_nodes[i] = kids_nodes[nodes[w], c]
        new_scores[i] = cand[idx[i]]
    return new_codes, new_nodes, new_scores


@njit(cache=True, boundscheck=True)
def _level_b_row(a: int, r: int, lb: np.ndarray, root: np.ndarray, kids1_codes: np.ndarray, kids1_nodes: np.ndarray,
                 one: np.ndarray, no_excl: np.ndarray, lp1: np.ndarray, K: int, hc: np.ndarray, U: np.ndarray,
                 decc: np.ndarray, tdec: np.ndarray, c0: np.ndarray, w2t: np.ndarray, b2: np.ndarray
                 ) -> None:  # pragma: no cover - jit
    """lb[r] = log p(b | a) over a's valid children (-inf elsewhere; the whole row when a is off the trie)."""
    node = root[a]
    if node < 0:
        return
    one[0] = a
    y = head_hidden(1, one, K, hc, U, decc, tdec, c0)
    row_logprobs(y, 1, kids1_codes[node], kids1_nodes[node], w2t, b2, no_excl, False, lp1)
    for c in range(kids1_codes.shape[1]):
        if kids1_nodes[node, c] >= 0:
            lb[r, kids1_codes[node, c]] = lp1[c]


@njit(cache=True, boundscheck=True)
def prefix_beams(K: int, pa: np.ndarray, pb: np.ndarray, plp: np.ndarray, own_n: int, own_floor: float,
                 prefix_weight: float, root: np.ndarray, child1: np.ndarray, kids0_codes: np.ndarray,
                 kids0_nodes: np.ndarray, kids1_codes: np.ndarray, kids1_nodes: np.ndarray, hc: np.ndarray,
                 U: np.ndarray, decc: np.ndarray, tdec: np.ndarray, c0: np.ndarray, w2t: np.ndarray, b2: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # pragma: no cover - jit
    """Levels a and b of a completion (`model.onerec.one_user.OneUser.complete`'s rule): the given prefixes
    (a, b, offline log-prob) deduplicated to their best score, plus the model's own top-`own_n` (a, b) with the
    weakest given score + `own_floor`; each scored log p(a) + log p(b | a) + prefix_weight * offline score, -inf
    off the trie. Returns codes (P, 2), level-c nodes (P,), scores (P,) in that order (given first)."""
    no_excl = np.zeros(0, np.int64)
    empty = np.zeros(0, np.int64)
    la = np.full(K, NEG)
    lp0 = np.empty(kids0_codes.shape[1])
    y0 = head_hidden(0, empty, K, hc, U, decc, tdec, c0)
    row_logprobs(y0, 0, kids0_codes[0], kids0_nodes[0], w2t, b2, no_excl, False, lp0)
    for c in range(kids0_codes.shape[1]):
        if kids0_nodes[0, c] >= 0:
            la[kids0_codes[0, c]] = lp0[c]
    n_own = min(own_n, K)
    P = pa.shape[0] + n_own
    ga, gb, glp = np.empty(P, np.int64), np.empty(P, np.int64), np.empty(P)
    G = 0
    for i in range(pa.shape[0]):  # duplicates keep their best offline score; -inf / NaN never enter
        a, b, s = pa[i], pb[i], plp[i]
        if a < 0 or a >= K or b < 0 or b >= K:
            continue
        found = -1
        for j in range(G):
            if ga[j] == a and gb[j] == b:
                found = j
                break
        if found < 0:
            if s > NEG:
                ga[G], gb[G], glp[G] = a, b, s
                G += 1
        elif s > glp[found]:
            glp[found] = s
    n_given = G
    own_a = top_order(la, n_own)
    C1 = kids1_codes.shape[1]
    arow = np.full(K, -1, np.int64)  # a -> its row of lb, once computed
    lb = np.full((G + n_own, K), NEG)
    A = 0
    lp1 = np.empty(C1)
    one = np.empty(1, np.int64)
    for j in range(G):  # every given a; the own a's below, only as far as they can place a pair
        a = ga[j]
        if arow[a] < 0:
            arow[a] = A
            _level_b_row(a, A, lb, root, kids1_codes, kids1_nodes, one, no_excl, lp1, K, hc, U, decc, tdec, c0,
                         w2t, b2)
            A += 1
    if n_own > 0:  # the own top-n (a, b) over the own a's, each at the weakest given score + own_floor
        floor = own_floor + (glp[:n_given].min() if n_given else 0.0)
        pair = np.full(n_own * C1, NEG)
        best = np.empty(n_own)
        size = 0
        for i in range(n_own):  # descending log p(a); a pair scores log p(a) + log p(b | a) <= log p(a)
            a = own_a[i]
            node = root[a]
            if la[a] == NEG or (size == n_own and la[a] < best[n_own - 1]):
                break
            if node < 0:
                continue
            if arow[a] < 0:
                arow[a] = A
                _level_b_row(a, A, lb, root, kids1_codes, kids1_nodes, one, no_excl, lp1, K, hc, U, decc, tdec, c0,
                             w2t, b2)
                A += 1
            for c in range(C1):
                if kids1_nodes[node, c] >= 0:
                    pair[i * C1 + c] = la[a] + lb[arow[a], kids1_codes[node, c]]
                    size = _push(best, size, pair[i * C1 + c])
        for i in top_order(pair, n_own):
            if pair[i] == NEG:
                break
            a = own_a[i // C1]
            b = kids1_codes[root[a], i % C1]
            seen = False
            for j in range(G):
                if ga[j] == a and gb[j] == b:
                    seen = True
                    break
            if not seen:
                ga[G], gb[G], glp[G] = a, b, floor
                G += 1
    codes = np.empty((G, 2), np.int64)
    nodes = np.empty(G, np.int64)
    scores = np.empty(G)
    for j in range(G):
        a, b = ga[j], gb[j]
        node_a = root[a]
        codes[j, 0], codes[j, 1] = a, b
        nodes[j] = child1[node_a, b] if node_a >= 0 else -1
        scores[j] = la[a] + lb[arow[a], b] + prefix_weight * glp[j] if nodes[j] >= 0 else NEG
    return codes, nodes, scores
