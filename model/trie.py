"""Prefix trie over valid item codes: the one constraint every decoder uses.

Plain data: `allowed_next(prefix)` returns the codes that may follow `prefix` so that the path still
ends at a real item. Views restrict it to a set of allowed prefixes or exclude items (e.g. consumed
ones). `TokenMap` maps (level, code) to token ids, and the small adapters at the bottom serve HF
`generate`; the vLLM adapter lives with the offline engine. An empty allowed set is an error.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np


class EmptyAllowedSetError(ValueError):
    """No code may follow the given prefix (unknown prefix, or everything under it excluded)."""


class CodeTrie:
    """Trie over the rows of a code table ``codes`` (N, L) with item ids ``item_ids`` (N,)."""

    def __init__(self, codes: np.ndarray, item_ids: np.ndarray, codebook_size: int):
        codes = np.asarray(codes, dtype=np.int64)
        if codes.ndim != 2 or len(codes) != len(item_ids):
            raise ValueError(f"codes must be (N, L) matching item_ids, got {codes.shape} and {len(item_ids)}")
        if len(codes) == 0:
            raise EmptyAllowedSetError("trie has no items")
        self.codes = codes
        self.item_ids = np.asarray(item_ids, dtype=np.int64)
        self.codebook_size = codebook_size
        self.num_levels = codes.shape[1]
        # prefix (tuple of length 0..L-1) -> row indices below it; children derive from these
        self._rows: dict[tuple[int, ...], np.ndarray] = {}
        self._children: dict[tuple[int, ...], np.ndarray] = {}
        order = np.lexsort(codes.T[::-1])  # rows sorted by code tuple
        self._index(order, 0, ())
        self._leaf = {tuple(int(x) for x in c): int(i) for c, i in zip(codes, self.item_ids, strict=True)}

    def _index(self, rows: np.ndarray, level: int, prefix: tuple[int, ...]) -> None:
        # iterative over levels: group the sorted rows by their code at `level`
        stack = [(rows, level, prefix)]
        while stack:
            rows, level, prefix = stack.pop()
            self._rows[prefix] = rows
            if level == self.num_levels:
                continue
            col = self.codes[rows, level]
            uniq, starts = np.unique(col, return_index=True)
            self._children[prefix] = uniq
            bounds = list(starts[1:]) + [len(rows)]
            for code, s, e in zip(uniq.tolist(), starts.tolist(), bounds, strict=True):
                stack.append((rows[s:e], level + 1, prefix + (code,)))

    def __len__(self) -> int:
        return len(self.item_ids)

    def allowed_next(self, prefix: Sequence[int]) -> np.ndarray:
        """Sorted codes allowed after `prefix` (len < num_levels). Raises if none."""
        p = tuple(int(x) for x in prefix)
        if len(p) >= self.num_levels:
            raise ValueError(f"prefix {p} is already a full code (num_levels={self.num_levels})")
        out = self._children.get(p)
        if out is None or len(out) == 0:
            raise EmptyAllowedSetError(f"no valid continuation for prefix {p}")
        return out

    def has_prefix(self, prefix: Sequence[int]) -> bool:
        return tuple(int(x) for x in prefix) in self._rows

    def item(self, codes: Sequence[int]) -> int | None:
        """Item id at a full code, or None."""
        return self._leaf.get(tuple(int(x) for x in codes))

    def rows_under(self, prefix: Sequence[int]) -> np.ndarray:
        return self._rows.get(tuple(int(x) for x in prefix), np.zeros(0, dtype=np.int64))

    def _subset(self, rows: np.ndarray) -> CodeTrie:
        if len(rows) == 0:
            raise EmptyAllowedSetError("restriction leaves no items")
        rows = np.sort(rows)
        return CodeTrie(self.codes[rows], self.item_ids[rows], self.codebook_size)

    def restrict(self, prefixes: Iterable[Sequence[int]]) -> CodeTrie:
        """Trie of the items that start with one of `prefixes` (unknown prefixes are ignored)."""
        parts = [self.rows_under(p) for p in prefixes]
        rows = np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)
        return self._subset(rows)

    def exclude(self, item_ids: Iterable[int]) -> CodeTrie:
        """Trie without the given items."""
        drop = np.isin(self.item_ids, np.fromiter(item_ids, dtype=np.int64))
        return self._subset(np.nonzero(~drop)[0])

    def dense_tables(self) -> list[np.ndarray]:
        """Child tables for vectorised decoding: ``tables[l]`` is (P_l, codebook_size) int64.

        Prefixes of length l are numbered 0..P_l-1 (the empty prefix is row 0 of level 0);
        ``tables[l][row, code]`` is the row of ``prefix + (code,)`` at level l+1, or -1 if that path
        does not exist. At the last level the value is the index into ``item_ids`` of the leaf.
        """
        leaf_row = {tuple(int(x) for x in c): r for r, c in enumerate(self.codes)}
        tables: list[np.ndarray] = []
        level_prefixes: list[tuple[int, ...]] = [()]
        for level in range(self.num_levels):
            table = np.full((len(level_prefixes), self.codebook_size), -1, dtype=np.int64)
            nxt: list[tuple[int, ...]] = []
            for r, p in enumerate(level_prefixes):
                for c in self._children[p].tolist():
                    child = p + (c,)
                    if level == self.num_levels - 1:
                        table[r, c] = leaf_row[child]
                    else:
                        table[r, c] = len(nxt)
                        nxt.append(child)
            tables.append(table)
            level_prefixes = nxt
        return tables

    def level_mask(self, prefixes: np.ndarray) -> np.ndarray:
        """Boolean mask (B, codebook_size) of allowed next codes for each row of `prefixes` (B, l).

        Rows whose prefix has no continuation get an all-False row (the caller decides; beam search
        gives them -inf scores).
        """
        prefixes = np.asarray(prefixes, dtype=np.int64).reshape(len(prefixes), -1)
        mask = np.zeros((len(prefixes), self.codebook_size), dtype=bool)
        for r, p in enumerate(map(tuple, prefixes.tolist())):
            ch = self._children.get(p)
            if ch is not None:
                mask[r, ch] = True
        return mask


@dataclass(frozen=True)
class TokenMap:
    """Token ids of itemic codes: ``code_id(level, code) = offset + level * codebook_size + code``.

    Holds for vocabularies built by `model.think.tokens` (added level-major, contiguous) and for the
    lightweight OneRec's own code vocabulary.
    """

    offset: int
    num_levels: int
    codebook_size: int
    item_begin: int | None = None
    item_end: int | None = None
    # item-level tokens (`model.semantic_ids.item_id_token`), one per catalogue item in SID row order,
    # contiguous from `item_offset`; None when the vocabulary has none
    item_offset: int | None = None
    num_items: int = 0

    @property
    def has_items(self) -> bool:
        return self.item_offset is not None and self.num_items > 0

    def token_id(self, level: int, code: int) -> int:
        if not (0 <= level < self.num_levels and 0 <= code < self.codebook_size):
            raise ValueError(f"level/code out of range: level={level}, code={code}")
        return self.offset + level * self.codebook_size + code

    def level_code(self, token_id: int) -> tuple[int, int]:
        rel = token_id - self.offset
        if not 0 <= rel < self.num_levels * self.codebook_size:
            raise ValueError(f"token id {token_id} is not an itemic code token")
        return divmod(rel, self.codebook_size)

    def is_code(self, token_id: int) -> bool:
        return 0 <= token_id - self.offset < self.num_levels * self.codebook_size

    def allowed_token_ids(self, trie: CodeTrie, prefix: Sequence[int]) -> list[int]:
        level = len(prefix)
        base = self.offset + level * self.codebook_size
        return (trie.allowed_next(prefix) + base).tolist()


def hf_prefix_allowed_tokens_fn(trie: CodeTrie, tokmap: TokenMap) -> Callable[[int, object], list[int]]:
    """Adapter for HF ``generate(prefix_allowed_tokens_fn=...)``: inside an item block only trie paths.

    Outside an item block (text), everything is allowed; after `<|item_begin|>` the next tokens follow
    the trie; after the last level only `<|item_end|>` is allowed.
    """
    if tokmap.item_begin is None or tokmap.item_end is None:
        raise ValueError("TokenMap needs item_begin and item_end ids for the HF adapter")
    begin, end = tokmap.item_begin, tokmap.item_end

    def fn(batch_id: int, input_ids: object) -> list[int]:
        ids = input_ids.tolist()  # type: ignore[attr-defined]
        if begin not in ids:
            return []  # empty list = no constraint in HF
        last = len(ids) - 1 - ids[::-1].index(begin)
        if end in ids[last:]:
            return []
        prefix = [tokmap.level_code(t)[1] for t in ids[last + 1 :]]
        if len(prefix) == trie.num_levels:
            return [end]
        return tokmap.allowed_token_ids(trie, prefix)

    return fn
