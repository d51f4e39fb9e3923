"""Think-entry values: the encoding of one `ThinkEntry` (compact JSON with a schema version) and its strict
decoding, plus the parsing of a stored history. Every value read back is held to the standard of HTTP input.

Not here: key names and Redis replies (`keys.py`), any Redis command (`writer.py`, `reader.py`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, cast

SCHEMA_VERSION = 1
MAX_VALUE_BYTES = 64 * 1024
MAX_STORED_ID = 2**53 - 1  # ids read back are held to the HTTP bound (online_api.schemas.MAX_ID)


class CorruptValue(ValueError):
    """A Redis value that cannot be decoded as a think entry of a known schema."""


@dataclass
class ThinkEntry:
    """Offline think-ahead result for one user."""

    reasoning: str
    prefixes: list[tuple[int, int, float]]  # (a, b, logprob), best first
    history_len: int  # length of the history the entry was computed from
    history_tail: list[int]  # last few item ids of that history (staleness checks)
    model_id: str
    created_at: float  # unix seconds
    # (item_id, log-prob) of the think model's own top items, best first; [] when the refresh stored none. Optional
    # key "i" in the value, so entries written before it decode unchanged (docs/THINK.md section 13).
    items: list[tuple[int, float]] = field(default_factory=list)


_NUMBER = (int, float)  # exact JSON number types (not bool)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _safe_text(x: object) -> bool:
    """A str that any JSON encoder can write as UTF-8 (no lone surrogates)."""
    if not isinstance(x, str):
        return False
    if x.isascii():  # O(1) on CPython's compact strings: no surrogate possible
        return True
    try:
        x.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _stored_id(x: object) -> bool:
    return _is_int(x) and 0 <= cast(int, x) <= MAX_STORED_ID


def _check_ints(name: str, values: Iterable[object]) -> list[int]:
    out = []
    for v in values:
        if not _is_int(v) or cast(int, v) < 0:
            raise ValueError(f"{name}: expected non-negative ints, got {v!r}")
        out.append(cast(int, v))
    return out


def encode_entry(entry: ThinkEntry) -> bytes:
    """Compact JSON (short keys, logprobs rounded to 4 decimals). Raises ValueError on bad fields."""
    if not isinstance(entry.reasoning, str):
        raise ValueError(f"reasoning: expected str, got {type(entry.reasoning).__name__}")
    if not isinstance(entry.model_id, str):
        raise ValueError(f"model_id: expected str, got {type(entry.model_id).__name__}")
    prefixes = []
    for p in entry.prefixes:
        if len(p) != 3:
            raise ValueError(f"prefixes: expected (a, b, logprob), got {p!r}")
        a, b = _check_ints("prefixes", p[:2])
        lp = float(p[2])
        if not math.isfinite(lp):
            raise ValueError(f"prefixes: logprob must be finite, got {p[2]!r}")
        prefixes.append([a, b, round(lp, 4)])
    if not _is_int(entry.history_len) or entry.history_len < 0:
        raise ValueError(f"history_len: expected a non-negative int, got {entry.history_len!r}")
    created = float(entry.created_at)
    if not math.isfinite(created):
        raise ValueError(f"created_at: must be finite, got {entry.created_at!r}")
    obj: dict[str, Any] = {
        "v": SCHEMA_VERSION,
        "r": entry.reasoning,
        "p": prefixes,
        "hl": entry.history_len,
        "ht": _check_ints("history_tail", entry.history_tail),
        "m": entry.model_id,
        "t": round(created, 3),
    }
    if entry.items:
        obj["i"] = _encode_items(entry.items)
    raw = json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    if len(raw) > MAX_VALUE_BYTES:
        raise ValueError(f"entry: encoded size {len(raw)} bytes exceeds {MAX_VALUE_BYTES}")
    return raw


def _encode_items(items: Iterable[tuple[int, float]]) -> list[list[float | int]]:
    out: list[list[float | int]] = []
    for it in items:
        if len(it) != 2:
            raise ValueError(f"items: expected (item_id, logprob), got {it!r}")
        (i,) = _check_ints("items", it[:1])
        lp = float(it[1])
        if not math.isfinite(lp):
            raise ValueError(f"items: logprob must be finite, got {it[1]!r}")
        out.append([i, round(lp, 4)])
    return out


def _decode_items(raw: Any) -> list[tuple[int, float]]:
    if not isinstance(raw, list):
        raise CorruptValue("field i must be a list")
    out: list[tuple[int, float]] = []
    for q in raw:  # exact types: json.loads makes no subclasses, and `type(x) is int` already excludes bool
        if (type(q) is not list or len(q) != 2 or type(q[0]) is not int or not 0 <= q[0] <= MAX_STORED_ID
                or type(q[1]) not in _NUMBER or not math.isfinite(q[1])):
            raise CorruptValue(f"bad item {q!r}")
        out.append((q[0], float(q[1])))
    return out


def _reject_constant(name: str) -> Any:
    raise CorruptValue(f"non-finite number {name} in value")


def decode_entry(raw: bytes | str) -> ThinkEntry:
    """Inverse of `encode_entry`; raises `CorruptValue` on anything else (never another error type)."""
    try:
        data = raw.encode() if isinstance(raw, str) else raw
    except UnicodeEncodeError as e:
        raise CorruptValue(f"undecodable text: {e}") from None
    if not isinstance(data, bytes | bytearray):
        raise CorruptValue(f"expected bytes, got {type(raw).__name__}")
    if len(data) > MAX_VALUE_BYTES:
        raise CorruptValue(f"value of {len(data)} bytes exceeds {MAX_VALUE_BYTES}")
    try:
        obj = json.loads(data, parse_constant=_reject_constant)
    except CorruptValue:
        raise
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CorruptValue(f"not JSON: {e}") from None
    if not isinstance(obj, dict):
        raise CorruptValue(f"expected a JSON object, got {type(obj).__name__}")
    if obj.get("v") != SCHEMA_VERSION:
        raise CorruptValue(f"unknown schema version {obj.get('v')!r} (expected {SCHEMA_VERSION})")
    fields: list[Any] = [obj.get(k) for k in ("r", "p", "hl", "ht", "m", "t")]
    r, p, hl, ht, m, t = fields
    if not _safe_text(r) or not _safe_text(m):
        raise CorruptValue("fields r/m must be strings that encode as UTF-8")
    if not _is_int(hl) or hl < 0:
        raise CorruptValue(f"field hl must be a non-negative int, got {hl!r}")
    if not isinstance(t, int | float) or isinstance(t, bool) or not math.isfinite(t):
        raise CorruptValue(f"field t must be a finite number, got {t!r}")
    if not isinstance(ht, list) or not all(_stored_id(x) for x in ht):
        raise CorruptValue("field ht must be a list of item ids")
    if not isinstance(p, list):
        raise CorruptValue("field p must be a list")
    prefixes: list[tuple[int, int, float]] = []
    for q in p:  # exact types, as in `_decode_items` (the per-answer cost of the online read: docs/PROFILE.md)
        if (
            type(q) is not list
            or len(q) != 3
            or type(q[0]) is not int
            or not 0 <= q[0] <= MAX_STORED_ID
            or type(q[1]) is not int
            or not 0 <= q[1] <= MAX_STORED_ID
            or type(q[2]) not in _NUMBER
            or not math.isfinite(q[2])  # 1e400 parses as inf without passing through parse_constant
        ):
            raise CorruptValue(f"bad prefix {q!r}")
        prefixes.append((q[0], q[1], float(q[2])))
    items = _decode_items(obj["i"]) if "i" in obj else []
    return ThinkEntry(r, prefixes, hl, list(ht), m, float(t), items)


def _parse_history(raw: list[Any]) -> tuple[list[int], int]:
    """Item ids from LRANGE output, plus how many elements were not ints (corrupt)."""
    items, bad = [], 0
    for x in raw:
        try:
            i = int(x)
        except (TypeError, ValueError):
            bad += 1
            continue
        if 0 <= i <= MAX_STORED_ID:
            items.append(i)
        else:
            bad += 1
    return items, bad
