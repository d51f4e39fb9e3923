"""Write-behind buffer for interaction events while Redis is unavailable.

`POST /v1/events` writes straight to Redis when it can. When Redis fails, the events are kept here (bounded,
per user, in arrival order) and the next recommend already sees them; a background task flushes them in
order once Redis answers again. While a user has queued events, new ones queue behind them so the stored
order stays the arrival order. Events are lost only if the process dies during an outage.

Each request's items keep the append id of their first write attempt: a write that timed out may have been
applied by Redis after all, and the store skips an append whose id it has seen (no duplicates on retry).
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict

from redis.exceptions import RedisError

from services.store import AsyncThinkReader

log = logging.getLogger(__name__)


class PendingEvents:
    """Per-user queued appends ``(append id, item ids)``, oldest first, at most `max_events` items in total."""

    def __init__(self, max_events: int) -> None:
        self.max_events = max_events
        self._by_user: OrderedDict[int, list[tuple[str, list[int]]]] = OrderedDict()
        self._count = 0
        self._lock = asyncio.Lock()  # one flush at a time

    def __len__(self) -> int:
        return self._count

    def has(self, user: int) -> bool:
        return user in self._by_user

    def get(self, user: int) -> list[int]:
        return [i for _, items in self._by_user.get(user, ()) for i in items]

    def add(self, user: int, items: list[int], append_id: str = "") -> bool:
        """Queue `items` (written later with `append_id`); False (nothing queued) when the buffer is full."""
        if self._count + len(items) > self.max_events:
            return False
        self._by_user.setdefault(user, []).append((append_id, list(items)))
        self._count += len(items)
        return True

    async def flush(self, reader: AsyncThinkReader, max_len: int, timeout_s: float) -> int:
        """Write queued appends to Redis, oldest user first; stops at the first failure. Returns items written."""
        written = 0
        async with self._lock:
            while self._by_user:
                user, queued = next(iter(self._by_user.items()))
                append_id, items = queued[0]  # appends queued for this user during the await stay behind it
                try:
                    async with asyncio.timeout(timeout_s):
                        await reader.append_events(user, items, max_len, append_id)
                except (RedisError, OSError, TimeoutError) as e:
                    log.debug("flush of pending events failed: %r", e)
                    break
                queued.pop(0)
                if not queued:
                    self._by_user.pop(user, None)
                self._count -= len(items)
                written += len(items)
        return written
