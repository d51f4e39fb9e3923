"""The Think-Ahead Redis store: the ONLY module that knows Redis keys and value encoding.

The offline worker writes one versioned set of per-user think entries (reasoning + scored ``(a, b)``
prefixes) with `ThinkStore`, verifies it and flips ``current`` to it in one atomic write; the online
API reads the live version with `AsyncThinkReader`. This module does not decode items, run models or
build HTTP bodies.

Keys (``ns`` is the configurable namespace; ``{user}`` is a Redis Cluster hash tag, so a user's think
entries and history live in the same slot and can be read in one pipelined round trip):

====================================  ========  ====================================================
key                                   type      content
====================================  ========  ====================================================
``ns:think:{version}:{<user>}``       string    encoded `ThinkEntry` (compact JSON), SET with EX ttl
``ns:history:{<user>}``               list      recent item ids, oldest first, bounded (LTRIM)
``ns:appended:{<user>}``              list      ids of the user's last appends (a retried append is a no-op)
``ns:think:current``                  string    the live version (flipped with one atomic SET)
``ns:think:previous``                 string    the version live before the last flip (rollback)
``ns:think:{version}:meta``           hash      refresh metadata, one JSON-encoded value per field
``ns:think:{version}:done:{shard}``   set       indices of chunks whose entries are fully written
``ns:think:versions``                 zset      every begun version, scored by creation time (gc)
``ns:stale``                          zset      user -> interactions appended since their live entry
                                                was computed (incremental refresh, most stale first)
====================================  ========  ====================================================

Staleness: each applied append adds its item count to the user's score in ``ns:stale`` (a replayed
append adds nothing); the incremental refresh writes a user's new entry into the *live* version (one
SET per user: a reader gets the old value or the new one, never a mix) and then subtracts the count it
saw when it read the history (`settle_staleness`), so interactions that arrived meanwhile stay counted.
The counter is written after the append script (another slot on Cluster): an append whose counter write
fails is retried by the caller with the same append id, applied once and not counted (an entry then
stays one refresh staler than its score says; the next full refresh resets it).

Readers never see a half-written version: a version's entries are written while ``current`` still
names the old one; ``publish`` counts the new entries and only then flips ``current`` with a single
``SET ... GET`` (atomic, single key, so it also works on Cluster where ``current`` and ``previous``
hash to different slots). ``previous`` is written right after from the value that SET returned; a
crash between the two writes leaves ``previous`` one flip behind, never a wrong ``current``.

Values carry ``SCHEMA_VERSION``; anything that does not decode (foreign bytes, unknown schema, wrong
types, over `MAX_VALUE_BYTES`) raises `CorruptValue` inside this module and reaches callers as
"missing" plus a ``corrupt`` counter. So does a key of the wrong Redis type (a list where an entry
should be, a string where a history should be: ``WRONGTYPE``), which would otherwise look like a
Redis failure and trip the callers' breaker for every user. Entries are read with ``GETRANGE`` up to
one byte past `MAX_VALUE_BYTES`, so an oversized value costs a bounded read, not a transfer of all of
it. Values are held to the standard of HTTP input: text must encode as UTF-8 (a lone surrogate in a
reasoning or model id would only fail when a response is rendered) and ids are non-negative ints below
2**53, else the entry is corrupt. The live-version pointer is validated on each read from Redis (a
string that is not a version name, undecodable bytes, another Redis type): the reader then sees no live
version, says why in `FetchResult.bad_version` and counts it (`AsyncThinkReader.bad_pointer_reads`).
Redis connection errors are not caught: callers own fallback. `write_refusal` tells a write Redis
refused (out of memory, read-only replica, failing persistence) from a Redis that is unreachable.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, cast

import redis
import redis.asyncio as aioredis

SCHEMA_VERSION = 1
MAX_VALUE_BYTES = 64 * 1024
_BATCH = 500  # commands per pipeline / keys per UNLINK

_NS_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")  # no braces (hash tags) and no glob characters
_VERSION_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")  # no ':' so `ns:think:{version}:*` matches one version
_RESERVED = {"current", "previous", "versions"}
MAX_STORED_ID = 2**53 - 1  # ids read back are held to the HTTP bound (online_api.schemas.MAX_ID)
# error prefixes of writes Redis refused while it still answers reads
_REFUSALS = {"OOM": "oom", "READONLY": "readonly", "MISCONF": "misconf", "NOREPLICAS": "noreplicas"}


class CorruptValue(ValueError):
    """A Redis value that cannot be decoded as a think entry of a known schema."""


class IncompleteVersionError(RuntimeError):
    """`ThinkStore.publish` refused: the version holds fewer entries than expected."""


@dataclass
class ThinkEntry:
    """Offline think-ahead result for one user."""

    reasoning: str
    prefixes: list[tuple[int, int, float]]  # (a, b, logprob), best first
    history_len: int  # length of the history the entry was computed from
    history_tail: list[int]  # last few item ids of that history (staleness checks)
    model_id: str
    created_at: float  # unix seconds


@dataclass
class FetchResult:
    """One online read: live version, the user's entry under it (None if missing) and their history."""

    version: str | None
    entry: ThinkEntry | None
    history: list[int]
    corrupt: bool = False
    bad_version: str | None = None  # why the live-version pointer was unusable (version is then None)


# --------------------------------------------------------------------------- encoding


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _safe_text(x: object) -> bool:
    """A str that any JSON encoder can write as UTF-8 (no lone surrogates)."""
    if not isinstance(x, str):
        return False
    try:
        x.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _stored_id(x: object) -> bool:
    return _is_int(x) and 0 <= cast(int, x) <= MAX_STORED_ID


def write_refusal(e: BaseException) -> str | None:
    """`oom`, `readonly`, `misconf` or `noreplicas` when Redis answered and refused a write; None for
    anything else (unreachable, timeout, a bug). A refusal says nothing about whether reads work."""
    if isinstance(e, redis.exceptions.OutOfMemoryError):
        return "oom"
    if isinstance(e, redis.exceptions.ReadOnlyError):
        return "readonly"
    if not isinstance(e, redis.ResponseError):
        return None
    msg = str(e)
    for prefix, kind in _REFUSALS.items():
        # a refusal inside a script arrives wrapped ("... script: ...: OOM command not allowed ...")
        if msg.startswith(prefix) or f" {prefix} " in msg or f": {prefix}" in msg or f"-{prefix}" in msg:
            return kind
    return None


def check_version_pointer(raw: object) -> tuple[str | None, str | None]:
    """(version, None) for a valid live-version pointer value or a missing one (None, None); (None, why)
    for anything else."""
    if raw is None:
        return None, None
    if _wrong_type(raw):
        return None, "the live-version key holds another Redis type"
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes | bytearray) else raw
    except UnicodeDecodeError:
        return None, "the live-version pointer is not UTF-8"
    try:
        return ThinkKeys.check_version(text), None
    except ValueError:
        shown = text[:40].encode("utf-8", "backslashreplace").decode() if isinstance(text, str) else "?"
        return None, f"the live-version pointer {shown!r} is not a version name"


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
    obj = {
        "v": SCHEMA_VERSION,
        "r": entry.reasoning,
        "p": prefixes,
        "hl": entry.history_len,
        "ht": _check_ints("history_tail", entry.history_tail),
        "m": entry.model_id,
        "t": round(created, 3),
    }
    raw = json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    if len(raw) > MAX_VALUE_BYTES:
        raise ValueError(f"entry: encoded size {len(raw)} bytes exceeds {MAX_VALUE_BYTES}")
    return raw


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
    for q in p:
        if (
            not isinstance(q, list)
            or len(q) != 3
            or not _stored_id(q[0])
            or not _stored_id(q[1])
            or not isinstance(q[2], int | float)
            or isinstance(q[2], bool)
            or not math.isfinite(q[2])  # 1e400 parses as inf without passing through parse_constant
        ):
            raise CorruptValue(f"bad prefix {q!r}")
        prefixes.append((q[0], q[1], float(q[2])))
    return ThinkEntry(r, prefixes, hl, list(ht), m, float(t))


# --------------------------------------------------------------------------- keys


def _wrong_type(x: object) -> bool:
    """A command's reply said the key holds another Redis type (someone else's value under our key)."""
    return isinstance(x, redis.ResponseError) and "WRONGTYPE" in str(x)


def _reply(x: Any) -> Any:
    """One reply of a pipeline run with ``raise_on_error=False``: WRONGTYPE passes as a value, others raise."""
    if isinstance(x, Exception) and not _wrong_type(x):
        raise x
    return x


def _text(x: bytes | str | None) -> str | None:
    return x.decode() if isinstance(x, bytes | bytearray) else x


def _check_user(user: object) -> int:
    if not _is_int(user):
        raise ValueError(f"user: expected an int id, got {user!r}")
    return cast(int, user)


class ThinkKeys:
    """Key names under one namespace (see the module docstring for the table)."""

    def __init__(self, ns: str) -> None:
        if not isinstance(ns, str) or not _NS_RE.match(ns):
            raise ValueError(f"ns: expected 1-64 chars of [A-Za-z0-9_.:-], got {ns!r}")
        self.ns = ns
        self.current = f"{ns}:think:current"
        self.previous = f"{ns}:think:previous"
        self.versions = f"{ns}:think:versions"
        self.stale = f"{ns}:stale"

    @staticmethod
    def check_version(version: object) -> str:
        if not isinstance(version, str) or not _VERSION_RE.fullmatch(version) or version in _RESERVED:
            raise ValueError(
                f"version: expected 1-64 chars of [A-Za-z0-9_.-] (not {sorted(_RESERVED)}), got {version!r}"
            )
        return version

    def think(self, version: str, user: int) -> str:
        return f"{self.ns}:think:{self.check_version(version)}:{{{_check_user(user)}}}"

    def history(self, user: int) -> str:
        return f"{self.ns}:history:{{{_check_user(user)}}}"

    def appended(self, user: int) -> str:
        return f"{self.ns}:appended:{{{_check_user(user)}}}"

    def meta(self, version: str) -> str:
        return f"{self.ns}:think:{self.check_version(version)}:meta"

    def done(self, version: str, shard: int) -> str:
        if not _is_int(shard) or shard < 0:
            raise ValueError(f"shard: expected a non-negative int, got {shard!r}")
        return f"{self.ns}:think:{self.check_version(version)}:done:{shard}"

    def entry_pattern(self, version: str) -> str:
        """SCAN MATCH pattern for one version's user entries (not its meta/done keys)."""
        return f"{self.ns}:think:{self.check_version(version)}:{{*}}"

    def done_pattern(self, version: str) -> str:
        """SCAN MATCH pattern for one version's done-chunk sets."""
        return f"{self.ns}:think:{self.check_version(version)}:done:*"

    def version_pattern(self, version: str) -> str:
        """SCAN MATCH pattern for every key of one version."""
        return f"{self.ns}:think:{self.check_version(version)}:*"


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


# --------------------------------------------------------------------------- offline (sync)

# KEYS: the staleness zset. ARGV: user, seen, user, seen, ... Subtracts what the new entry has seen; removes
# users at <= 0 (events that arrived after the history was read keep them in the set).
_SETTLE = """
for i = 1, #ARGV, 2 do
  if redis.call('ZSCORE', KEYS[1], ARGV[i]) then
    local n = tonumber(redis.call('ZINCRBY', KEYS[1], -tonumber(ARGV[i + 1]), ARGV[i]))
    if n <= 0 then redis.call('ZREM', KEYS[1], ARGV[i]) end
  end
end
return 0
"""


class ThinkStore:
    """Offline-worker side: write, verify, publish, roll back and garbage-collect versions."""

    def __init__(self, client: redis.Redis, ns: str) -> None:
        self.r: Any = client  # Any: redis-py's sync/async union return types defeat mypy
        self.keys = ThinkKeys(ns)
        self.corrupt = 0  # values read by `get_entry` that were treated as missing
        self._settle = client.register_script(_SETTLE)

    # ---- version lifecycle
    def begin_version(self, version: str, meta: dict[str, Any], created_at: float | None = None) -> None:
        """Register a version (idempotent: a resumed refresh keeps its original start time)."""
        if version == self.current_version():
            raise ValueError(f"version: {version!r} is live; write a new version instead")
        now = time.time() if created_at is None else created_at
        pipe = self.r.pipeline(transaction=False)
        pipe.zadd(self.keys.versions, {version: now}, nx=True)
        pipe.hsetnx(self.keys.meta(version), "started", json.dumps(now))
        if meta:
            pipe.hset(self.keys.meta(version), mapping={k: json.dumps(v) for k, v in meta.items()})
        pipe.execute()

    def write_entries(self, version: str, entries: dict[int, ThinkEntry], ttl_s: int) -> int:
        """SET every entry with EX ttl_s (pipelined, idempotent on re-write). Returns the number written."""
        if not _is_int(ttl_s) or ttl_s <= 0:
            raise ValueError(f"ttl_s: expected a positive int, got {ttl_s!r}")
        if version == self.current_version():
            raise ValueError(f"version: {version!r} is live; readers would see it half-written")
        return self._set_entries(version, entries, ttl_s)

    def _set_entries(self, version: str, entries: dict[int, ThinkEntry], ttl_s: int) -> int:
        """One SET with EX per user value, pipelined in batches of `_BATCH`."""
        items = [(self.keys.think(version, u), encode_entry(e)) for u, e in entries.items()]
        for i in range(0, len(items), _BATCH):
            pipe = self.r.pipeline(transaction=False)
            for key, value in items[i : i + _BATCH]:
                pipe.set(key, value, ex=ttl_s)
            pipe.execute()
        return len(items)

    def mark_chunk_done(self, version: str, shard: int, chunk_idx: int) -> None:
        """Record that chunk `chunk_idx` of `shard` is fully written (call after `write_entries`)."""
        if not _is_int(chunk_idx) or chunk_idx < 0:
            raise ValueError(f"chunk_idx: expected a non-negative int, got {chunk_idx!r}")
        self.r.sadd(self.keys.done(version, shard), chunk_idx)

    def done_chunks(self, version: str, shard: int) -> set[int]:
        """Chunks of `shard` already written; a resumed refresh skips these."""
        return {int(x) for x in self.r.smembers(self.keys.done(version, shard))}

    def count_entries(self, version: str) -> int:
        """Exact number of user entries of `version` (SCAN, deduplicated; robust to re-writes)."""
        seen = set(self.r.scan_iter(match=self.keys.entry_pattern(version), count=1000))
        return len(seen)

    def finish_version(self, version: str, meta_updates: dict[str, Any] | None = None) -> None:
        """Stamp `finished` (and any extra metadata) on a fully written version."""
        fields = {"finished": time.time(), **(meta_updates or {})}
        self.r.hset(self.keys.meta(version), mapping={k: json.dumps(v) for k, v in fields.items()})

    def publish(self, version: str, expected_users: int) -> str | None:
        """Verify `version` holds >= expected_users entries, then make it live. Returns the old version."""
        if self.r.zscore(self.keys.versions, self.keys.check_version(version)) is None:
            raise ValueError(f"version: {version!r} was never begun (call begin_version first)")
        count = self.count_entries(version)
        if count < expected_users:
            raise IncompleteVersionError(
                f"version {version!r} has {count} entries, expected {expected_users}; not published"
            )
        old = _text(self.r.set(self.keys.current, version, get=True))  # the one atomic flip
        if old is not None and old != version:
            self.r.set(self.keys.previous, old)
        self.r.hset(self.keys.meta(version), mapping={"published": json.dumps(time.time()), "users": json.dumps(count)})
        return old

    def rollback(self) -> str:
        """Make `previous` live again (and the rolled-back version the new `previous`). Returns it."""
        prev = _text(self.r.get(self.keys.previous))
        if prev is None:
            raise RuntimeError("rollback: no previous version recorded")
        if self.r.zscore(self.keys.versions, prev) is None:
            raise RuntimeError(f"rollback: previous version {prev!r} was garbage-collected")
        old = _text(self.r.set(self.keys.current, prev, get=True))
        if old is not None and old != prev:
            self.r.set(self.keys.previous, old)
        return prev

    def write_live_entries(self, version: str, entries: dict[int, ThinkEntry], ttl_s: int) -> int:
        """SET entries into the *live* `version` (incremental refresh). Each user's value is one key and one
        SET, so a concurrent reader sees the old entry or the new one, never a mix. Returns the number written."""
        if not _is_int(ttl_s) or ttl_s <= 0:
            raise ValueError(f"ttl_s: expected a positive int, got {ttl_s!r}")
        if version != self.current_version():
            raise ValueError(f"version: {version!r} is not live (live: {self.current_version()!r})")
        return self._set_entries(version, entries, ttl_s)

    # ---- staleness (interactions the live entry has not seen)
    def stale_users(self, min_staleness: int = 1, limit: int | None = None) -> list[tuple[int, int]]:
        """(user, staleness) with staleness >= `min_staleness`, most stale first (ties within the returned page:
        lower id first; which tied users make a `limit` is Redis's order)."""
        if not _is_int(min_staleness) or min_staleness < 1:
            raise ValueError(f"min_staleness: expected an int >= 1, got {min_staleness!r}")
        if limit is not None and (not _is_int(limit) or limit < 1):
            raise ValueError(f"limit: expected an int >= 1 or None, got {limit!r}")
        try:
            raw = self.r.zrange(self.keys.stale, "+inf", min_staleness, desc=True, byscore=True,
                                offset=0 if limit else None, num=limit, withscores=True)  # fmt: skip
        except redis.ResponseError as e:
            if not _wrong_type(e):
                raise
            self.corrupt += 1
            return []
        out = []
        for member, score in raw:
            try:
                out.append((int(member), int(score)))
            except ValueError:
                self.corrupt += 1
        return sorted(out, key=lambda x: (-x[1], x[0]))

    def staleness(self, users: Iterable[int]) -> dict[int, int]:
        """Each user's staleness (0 when not in the set)."""
        users = [_check_user(u) for u in users]
        if not users:
            return {}
        scores = self.r.zmscore(self.keys.stale, users)
        return {u: int(s or 0) for u, s in zip(users, scores, strict=True)}

    def settle_staleness(self, seen: dict[int, int]) -> None:
        """Subtract from each user's staleness the count the new entry has seen; drop users at <= 0."""
        pairs = [x for u, n in seen.items() if n > 0 for x in (_check_user(u), int(n))]
        for i in range(0, len(pairs), 2 * _BATCH):
            self._settle(keys=[self.keys.stale], args=pairs[i : i + 2 * _BATCH])

    def clear_staleness(self, users: Iterable[int]) -> None:
        """Forget users' staleness (their histories were replaced by a full refresh)."""
        users = [_check_user(u) for u in users]
        for i in range(0, len(users), _BATCH):
            self.r.zrem(self.keys.stale, *users[i : i + _BATCH])

    def get_histories(self, users: Iterable[int]) -> dict[int, list[int]]:
        """Many users' bounded histories (pipelined LRANGE; non-int elements and wrong types are counted)."""
        users = list(users)
        out: dict[int, list[int]] = {}
        for i in range(0, len(users), _BATCH):
            part = users[i : i + _BATCH]
            pipe = self.r.pipeline(transaction=False)
            for u in part:
                pipe.lrange(self.keys.history(u), 0, -1)
            for u, raw in zip(part, pipe.execute(raise_on_error=False), strict=True):
                raw = _reply(raw)
                if _wrong_type(raw):
                    self.corrupt += 1
                    out[u] = []
                    continue
                out[u], bad = _parse_history(raw)
                self.corrupt += bad
        return out

    # ---- reads
    def current_version(self) -> str | None:
        return _text(self.r.get(self.keys.current))

    def previous_version(self) -> str | None:
        return _text(self.r.get(self.keys.previous))

    def versions(self) -> list[str]:
        """Every registered version, oldest first."""
        return [cast(str, _text(v)) for v in self.r.zrange(self.keys.versions, 0, -1)]

    def meta(self, version: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in self.r.hgetall(self.keys.meta(version)).items():
            text = cast(str, _text(v))
            try:
                out[cast(str, _text(k))] = json.loads(text)
            except ValueError:
                out[cast(str, _text(k))] = text
        return out

    def get_entry(self, version: str, user: int) -> ThinkEntry | None:
        """The user's entry under `version`; None if missing or corrupt (corrupt ones are counted)."""
        return self.get_entries(version, [user])[user]

    def _decode(self, raw: Any) -> ThinkEntry | None:
        if not raw:  # GETRANGE of a missing key is b"" (no valid value is empty)
            return None
        try:
            if _wrong_type(raw):
                raise CorruptValue("key holds another Redis type")
            return decode_entry(raw)
        except CorruptValue:
            self.corrupt += 1
            return None

    def get_entries(self, version: str, users: Iterable[int]) -> dict[int, ThinkEntry | None]:
        """Entries of many users under `version` (pipelined GETs; None = missing or corrupt, counted)."""
        users = list(users)
        out: dict[int, ThinkEntry | None] = {}
        for i in range(0, len(users), _BATCH):
            part = users[i : i + _BATCH]
            pipe = self.r.pipeline(transaction=False)
            for u in part:
                pipe.getrange(self.keys.think(version, u), 0, MAX_VALUE_BYTES)
            for u, raw in zip(part, pipe.execute(raise_on_error=False), strict=True):
                out[u] = self._decode(_reply(raw))
        return out

    def copy_entries(self, src: str, dst: str, users: Iterable[int], ttl_s: int) -> list[int]:
        """COPY users' entries from version `src` to `dst` with a fresh TTL; returns the users not copied.

        Both keys of a user share the ``{user}`` hash tag, so COPY stays inside one Cluster slot.
        Entries that are missing or corrupt under `src` are not copied (the caller recomputes them).
        """
        if not _is_int(ttl_s) or ttl_s <= 0:
            raise ValueError(f"ttl_s: expected a positive int, got {ttl_s!r}")
        if dst == self.current_version():
            raise ValueError(f"version: {dst!r} is live; readers would see it half-written")
        entries = self.get_entries(src, users)
        missing = [u for u, e in entries.items() if e is None]
        good = [u for u, e in entries.items() if e is not None]
        for i in range(0, len(good), _BATCH):
            part = good[i : i + _BATCH]
            pipe = self.r.pipeline(transaction=False)
            for u in part:
                pipe.copy(self.keys.think(src, u), self.keys.think(dst, u), replace=True)
                pipe.expire(self.keys.think(dst, u), ttl_s)
            res = pipe.execute()
            missing += [u for u, copied in zip(part, res[::2], strict=True) if not copied]  # expired meanwhile
        return missing

    def get_history(self, user: int) -> list[int]:
        try:
            raw = self.r.lrange(self.keys.history(user), 0, -1)
        except redis.ResponseError as e:
            if not _wrong_type(e):
                raise
            self.corrupt += 1
            return []
        items, bad = _parse_history(raw)
        self.corrupt += bad
        return items

    def status(self, version: str | None = None) -> dict[str, Any]:
        """Progress and metadata of `version` (default: the live one), for the worker CLI."""
        current, previous = self.current_version(), self.previous_version()
        version = version if version is not None else current
        out: dict[str, Any] = {"current": current, "previous": previous, "version": version}
        if version is None:
            return out
        done: dict[int, int] = {}
        for key in self.r.scan_iter(match=self.keys.done_pattern(version), count=1000):
            done[int(cast(str, _text(key)).rsplit(":", 1)[1])] = int(self.r.scard(key))
        out.update(
            meta=self.meta(version),
            entries=self.count_entries(version),
            done_chunks=dict(sorted(done.items())),
            live=version == current,
        )
        return out

    # ---- maintenance
    def write_histories(self, histories: dict[int, list[int]], max_len: int) -> None:
        """Replace each user's history with its last `max_len` items (DEL + RPUSH + LTRIM, pipelined)."""
        if not _is_int(max_len) or max_len <= 0:
            raise ValueError(f"max_len: expected a positive int, got {max_len!r}")
        users = list(histories.items())
        for i in range(0, len(users), _BATCH):
            pipe = self.r.pipeline(transaction=False)
            for user, items in users[i : i + _BATCH]:
                key = self.keys.history(user)
                tail = _check_ints("histories", items)[-max_len:]
                pipe.delete(key)
                if tail:
                    pipe.rpush(key, *tail)
                    pipe.ltrim(key, -max_len, -1)
            pipe.execute()

    def gc(self, keep: int = 2) -> list[str]:
        """Delete every key of versions other than current, previous and the newest `keep`. Returns them."""
        if not _is_int(keep) or keep < 0:
            raise ValueError(f"keep: expected a non-negative int, got {keep!r}")
        all_versions = self.versions()  # oldest first
        protected = {self.current_version(), self.previous_version()}
        protected.update(all_versions[len(all_versions) - keep :] if keep else [])
        removed = [v for v in all_versions if v not in protected]
        for version in removed:
            batch: list[Any] = []
            for key in self.r.scan_iter(match=self.keys.version_pattern(version), count=1000):
                batch.append(key)
                if len(batch) >= _BATCH:
                    self.r.unlink(*batch)
                    batch = []
            if batch:
                self.r.unlink(*batch)
            self.r.zrem(self.keys.versions, version)
        return removed


# --------------------------------------------------------------------------- online (async)

APPEND_IDS_KEPT = 16  # append ids remembered per user: more than the appends between a failed write and its retry
APPEND_IDS_TTL_S = 24 * 3600

# One atomic, idempotent append. KEYS: history, appended ids. ARGV: max_len, append id ('' = none), ids kept,
# ids TTL, item ids... Returns {history length, 1 if this id was applied before, 1 if a foreign value was
# replaced}. A value of another Redis type under either key is corrupt, i.e. missing: it is replaced.
_APPEND = """
local replaced = 0
for _, k in ipairs(KEYS) do
  local t = redis.call('TYPE', k).ok
  if t ~= 'none' and t ~= 'list' then redis.call('DEL', k); replaced = 1 end
end
if ARGV[2] ~= '' and redis.call('LPOS', KEYS[2], ARGV[2]) then
  return {redis.call('LLEN', KEYS[1]), 1, replaced}
end
redis.call('RPUSH', KEYS[1], unpack(ARGV, 5))
redis.call('LTRIM', KEYS[1], -tonumber(ARGV[1]), -1)
if ARGV[2] ~= '' then
  redis.call('LPUSH', KEYS[2], ARGV[2])
  redis.call('LTRIM', KEYS[2], 0, tonumber(ARGV[3]) - 1)
  redis.call('EXPIRE', KEYS[2], tonumber(ARGV[4]))
end
return {redis.call('LLEN', KEYS[1]), 0, replaced}
"""


class AsyncThinkReader:
    """Online side: one round trip per request for the live entry plus the user's history.

    The live version is cached for `current_ttl_s` seconds, so after a publish or rollback readers
    switch within that time (the old version stays readable meanwhile).
    """

    def __init__(
        self,
        client: aioredis.Redis,
        ns: str,
        current_ttl_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.r: Any = client
        self.keys = ThinkKeys(ns)
        self.current_ttl_s = current_ttl_s
        self.clock = clock
        self.corrupt = 0  # values treated as missing; the API exports this as a metric
        self.replayed = 0  # appends whose id had been applied already (a retry after an unanswered write)
        self._append = client.register_script(_APPEND)
        self.bad_pointer_reads = 0  # reads of the live-version pointer that found it unusable
        self.pointer_error: str | None = None  # why the last read pointer was unusable (None: fine)
        self._current: str | None = None
        self._current_at = -math.inf

    def invalidate(self) -> None:
        """Forget the cached live version (next read asks Redis)."""
        self._current_at = -math.inf

    async def current_version(self) -> str | None:
        now = self.clock()
        if now - self._current_at >= self.current_ttl_s:
            try:
                raw: Any = await self.r.get(self.keys.current)
            except redis.ResponseError as e:
                if not _wrong_type(e):
                    raise
                raw = e
            self._current, self.pointer_error = check_version_pointer(raw)  # validated once per read
            self.bad_pointer_reads += self.pointer_error is not None
            self._current_at = now
        return self._current

    def _decode(self, raw: Any) -> tuple[ThinkEntry | None, bool]:
        if not raw:  # GETRANGE of a missing key is b"" (no valid value is empty)
            return None, False
        try:
            if _wrong_type(raw):
                raise CorruptValue("key holds another Redis type")
            return decode_entry(raw), False
        except CorruptValue:
            self.corrupt += 1
            return None, True

    async def fetch(self, user: int, history_max: int | None = None) -> FetchResult:
        """Live entry and history of `user` in one pipelined round trip (same hash slot)."""
        if history_max is not None and (not _is_int(history_max) or history_max <= 0):
            raise ValueError(f"history_max: expected a positive int or None, got {history_max!r}")
        version = await self.current_version()
        start = 0 if history_max is None else -history_max
        async with self.r.pipeline(transaction=False) as pipe:
            if version is not None:
                pipe.getrange(self.keys.think(version, user), 0, MAX_VALUE_BYTES)
            pipe.lrange(self.keys.history(user), start, -1)
            res = [_reply(x) for x in await pipe.execute(raise_on_error=False)]
        entry, corrupt = self._decode(res[0]) if version is not None else (None, False)
        history, bad = ([], 1) if _wrong_type(res[-1]) else _parse_history(res[-1])
        self.corrupt += bad
        return FetchResult(version, entry, history, corrupt or bad > 0, self.pointer_error)

    async def get_entry(self, user: int) -> ThinkEntry | None:
        """The user's live entry; None if nothing is published, the entry is missing or corrupt."""
        version = await self.current_version()
        if version is None:
            return None
        try:
            raw = await self.r.getrange(self.keys.think(version, user), 0, MAX_VALUE_BYTES)
        except redis.ResponseError as e:
            if not _wrong_type(e):
                raise
            raw = e
        return self._decode(raw)[0]

    async def append_events(self, user: int, items: list[int], max_len: int, append_id: str = "") -> int:
        """Append interactions to the user's bounded history; returns its new length.

        With an `append_id` the append is idempotent: a write that timed out may still have been applied,
        so retrying it with the same id must not append the items twice (the last `APPEND_IDS_KEPT` ids
        of each user are remembered for `APPEND_IDS_TTL_S`)."""
        if not _is_int(max_len) or max_len <= 0:
            raise ValueError(f"max_len: expected a positive int, got {max_len!r}")
        if not isinstance(append_id, str) or len(append_id) > 64:
            raise ValueError(f"append_id: expected a string of at most 64 chars, got {append_id!r}")
        key = self.keys.history(user)
        items = _check_ints("items", items)
        if not items:
            return int(await self.r.llen(key))
        # both keys carry the {user} hash tag: one slot, so the script is Cluster-safe
        n, replayed, replaced = await self._append(
            keys=[key, self.keys.appended(user)], args=[max_len, append_id, APPEND_IDS_KEPT, APPEND_IDS_TTL_S, *items]
        )
        self.replayed += int(replayed)
        self.corrupt += int(replaced)
        if not int(replayed):
            # after the script: the zset is one key for all users (another Cluster slot than the history)
            try:
                await self.r.zincrby(self.keys.stale, len(items), user)
            except redis.ResponseError as e:  # a foreign value under the key: the append stands, uncounted
                if not _wrong_type(e):
                    raise
                self.corrupt += 1
        return min(int(n), max_len)
