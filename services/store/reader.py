"""Online side of the store: `AsyncThinkReader` reads the live entry and the user's history in one round trip,
caches the live version briefly, and appends interactions idempotently (a retried append is applied once).

Not here: key names (`keys.py`), value encoding (`codec.py`), writing versions (`writer.py`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio as aioredis

from services.store.codec import (
    MAX_VALUE_BYTES,
    CorruptValue,
    ThinkEntry,
    _check_ints,
    _is_int,
    _parse_history,
    decode_entry,
)
from services.store.keys import ThinkKeys, _reply, _wrong_type, check_version_pointer


@dataclass
class FetchResult:
    """One online read: live version, the user's entry under it (None if missing) and their history."""

    version: str | None
    entry: ThinkEntry | None
    history: list[int]
    corrupt: bool = False
    bad_version: str | None = None  # why the live-version pointer was unusable (version is then None)


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

    async def version_registered(self, version: str) -> bool:
        """Whether `version` was begun (is in the versions set): a live pointer naming anything else serves no
        entries at all."""
        return await self.r.zscore(self.keys.versions, self.keys.check_version(version)) is not None

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
