"""The online API's state: what the lifespan loads (`LoadedModel`, `load_onerec`) and what every request
reads (`AppState`, on ``app.state.svc``). Routes and dependencies import it from here; the app factory
(`online_api.app`) builds it. It holds objects; it does not decide answers (`complete.py`) or parse HTTP.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import redis.asyncio as aioredis

from model.policy import PolicyConfig, Popularity
from model.semantic_ids import SemanticIDs
from model.think.grounding import Grounding
from model.trie import CodeTrie
from online_api.batching import MicroBatcher, OnlineModel
from online_api.complete import Completer, RedisBreaker
from online_api.events import PendingEvents
from online_api.inline_batcher import InlineBatcher
from online_api.loop_batcher import LoopBatcher
from online_api.metrics import Metrics
from online_api.model_process import ProcessModel, warm_up
from services.catalog import Catalog
from services.config import Settings
from services.store import AsyncThinkReader

_FLUSH_EVERY_S = 0.2


@dataclass
class LoadedModel:
    """What the lifespan loads in the background; `processes` is set when the model runs in child
    processes (`model` is then the first of them)."""

    model: OnlineModel
    sid: SemanticIDs
    trie: CodeTrie
    model_id: str
    processes: list[ProcessModel] = field(default_factory=list)

    @property
    def process(self) -> ProcessModel | None:
        return self.processes[0] if self.processes else None

    @property
    def extra_models(self) -> list[ProcessModel]:
        """Model processes after the first (with ``model_handoff=thread``: one more batcher thread each)."""
        return self.processes[1:]

    @property
    def healthy(self) -> bool:
        return all(p.healthy for p in self.processes)

    def close(self) -> None:
        for p in self.processes:
            p.close()


ModelLoader = Callable[[Settings, PolicyConfig], "LoadedModel"]


def load_onerec(settings: Settings, policy: PolicyConfig) -> LoadedModel:
    """The checkpoint at `settings.resolved("onerec")`, with the code table it was trained with, warmed up with
    the served `policy`: in `settings.model_processes` child processes (`settings.model_process`, see
    `online_api.model_process`) or in this one."""
    from model.onerec import OneRec

    folder = settings.resolved("onerec")
    name = Path(folder).resolve().name
    onerec = OneRec.load(folder)
    warm_up(onerec, settings, policy)
    if not settings.model_process or settings.model_handoff == "inline":
        return LoadedModel(onerec, onerec.sid, onerec.trie, name)
    # `onerec` stays here as the standby, run only while a child restarts
    procs: list[ProcessModel] = []
    try:
        for _ in range(settings.model_processes):
            procs.append(ProcessModel(folder, settings, policy, standby=onerec))
            procs[-1].start()
    except Exception:
        for p in procs:
            p.close()
        raise
    return LoadedModel(procs[0], onerec.sid, onerec.trie, name, procs)


class AppState:
    """Everything a request needs; lives on ``app.state.svc``."""

    def __init__(self, settings: Settings, catalog: Catalog, users: list[int], popularity: Popularity,
                 redis: aioredis.Redis, metrics: Metrics) -> None:
        self.settings = settings
        self.catalog = catalog
        self.users = users
        self.redis = redis
        self.metrics = metrics
        self.policy = PolicyConfig.from_settings(settings)  # the one served policy: every request and model call
        self.reader = AsyncThinkReader(redis, settings.namespace, current_ttl_s=settings.current_ttl_s)
        self.pending = PendingEvents(settings.pending_events_max)
        self.breaker = RedisBreaker(settings.redis_backoff_ms / 1000.0, settings.redis_breaker_failures)
        self.loaded: LoadedModel | None = None
        self.load_error: str | None = None
        self.redis_config_error: str | None = None  # e.g. a plain URL naming one node of a cluster (not ready)
        self.batcher: MicroBatcher | None = None
        self._codes: dict[int, list[int]] = {}
        self.grounding: Grounding | None = None
        self.completer = Completer(settings, self.policy, self.reader, set(catalog.item_ids), None, None, popularity,
                                   metrics, self.pending, self.breaker)

    @property
    def model_id(self) -> str:
        return self.loaded.model_id if self.loaded is not None else "none"

    def codes_of(self, item_id: int) -> list[int]:
        """Semantic-ID codes of an item ([] before the model is loaded or for an item without codes)."""
        return self._codes.get(item_id, [])

    def attach(self, loaded: LoadedModel) -> None:
        """Model is loaded: start its batcher (a thread, or the event-loop hand-off) and let the completer use it."""
        batcher: MicroBatcher
        if self.settings.model_handoff == "inline":
            batcher = InlineBatcher.from_settings(loaded.model, self.settings, on_batch=self._on_batch,
                                                  on_wait=self.metrics.queue_wait.observe)
        elif loaded.processes and self.settings.model_handoff == "loop":
            batcher = LoopBatcher.for_processes(loaded.processes, self.settings, on_batch=self._on_batch,
                                                on_wait=self.metrics.queue_wait.observe)
        else:
            batcher = MicroBatcher.from_settings(loaded.model, self.settings, on_batch=self._on_batch,
                                                 on_wait=self.metrics.queue_wait.observe,
                                                 extra_models=loaded.extra_models)
        batcher.start()  # on the event loop: the lifespan calls `attach` there
        # every answer lists each item's codes: one dict lookup instead of a numpy row per item and request
        self._codes = {int(i): c for i, c in zip(loaded.sid.item_ids.tolist(), loaded.sid.codes.tolist(), strict=True)}
        self.batcher, self.loaded = batcher, loaded
        self.grounding = Grounding.build(self.catalog, loaded.sid)  # category labels + short titles (the page)
        self.completer.known = {int(i) for i in loaded.sid.item_ids}
        self.completer.trie = loaded.trie
        self.completer.batcher = batcher

    def _on_batch(self, kind: str, size: int, seconds: float) -> None:
        self.metrics.batch_size.labels(kind).observe(size)
        self.metrics.model_latency.labels(kind).observe(seconds)

    async def redis_ok(self) -> bool:
        """PING within max(redis timeout, 250 ms): readiness means reachable; slowness is the breaker's job."""
        try:
            async with asyncio.timeout(max(self.settings.redis_timeout_ms / 1000.0, 0.25)):
                await self.redis.ping()
        except Exception:  # noqa: BLE001 - any failure means "not ready"
            return False
        return True

    async def flush_loop(self) -> None:
        """Write events queued during a Redis outage once it answers again."""
        timeout = self.settings.redis_timeout_ms / 1000.0
        while True:
            await asyncio.sleep(_FLUSH_EVERY_S)
            if len(self.pending) and self.breaker.allow():
                await self.pending.flush(self.reader, self.settings.history_max, timeout)
            self.metrics.pending_events.set(len(self.pending))
