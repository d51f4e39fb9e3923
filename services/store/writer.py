"""Offline-worker side of the store: `ThinkStore` writes a version's entries, verifies and publishes it with one
atomic flip of ``current``, rolls back, garbage-collects old versions, keeps the staleness counters and
reads entries and histories back in bulk (evaluation, refresh planning).

Not here: key names (`keys.py`), value encoding (`codec.py`), the online reads (`reader.py`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from typing import Any, cast

import redis

from services.store.codec import (
    MAX_VALUE_BYTES,
    CorruptValue,
    ThinkEntry,
    _check_ints,
    _is_int,
    _parse_history,
    decode_entry,
    encode_entry,
)
from services.store.keys import ThinkKeys, _check_user, _reply, _text, _wrong_type

_BATCH = 500  # commands per pipeline / keys per UNLINK


class IncompleteVersionError(RuntimeError):
    """`ThinkStore.publish` refused: the version holds fewer entries than expected."""


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
