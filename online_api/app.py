"""App factory and lifespan of the online API.

`create_app(settings)` builds the FastAPI app; its lifespan loads the catalogue (needed for titles and
the popularity fallback, fast), opens the async Redis pool with tight timeouts and no retries (a dead
Redis costs milliseconds), then loads the OneRec checkpoint and starts the model (in a child process by
default, `online_api.model_process`) and its batching thread in the background: `/healthz` answers at
once, `/readyz` says 503 until model and Redis are ready, and recommend answers by fallback meanwhile. Serve with
``uvicorn online_api.app:create_app --factory --loop uvloop --http httptools`` or ``python -m online_api``.
This module does not decide answers (`complete.py`) or define bodies (`schemas.py`).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import random
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from model.policy import Popularity
from online_api.errors import RequestGuard, http_error, validation_error
from online_api.metrics import Metrics
from online_api.routes import ops, recommend, users
from online_api.schemas import MAX_BODY_BYTES, apply_server_limits
from online_api.state import AppState, ModelLoader, load_onerec
from services.catalog import load_dataset
from services.config import Settings, get_settings
from services.store.connect import ClusterModeError, check_async, connect_async, is_cluster_url

log = logging.getLogger(__name__)

__version__ = "0.1.0"


def freeze_heap() -> None:
    """Move every object alive now (catalogue, histories, model) out of the garbage collector's sight.

    The API process holds ~350k long-lived objects after start; one full collection over them took
    230-255 ms here (with the OneRec standby loaded), a pause every in-flight request would wait out.
    Frozen, a full collection only walks what was allocated since (`gc.freeze`, the usual fix for long-running servers).
    """
    gc.collect()
    gc.freeze()


def open_redis(settings: Settings) -> Any:
    """Async client with tight timeouts and no retries: failures surface at once and the caller falls back.
    ``redis+cluster://`` gives redis-py's asyncio `RedisCluster` (`services.store.connect`)."""
    return connect_async(settings.redis_url, settings.redis_timeout_ms / 1000.0, settings.redis_max_connections)


async def warm_redis(client: Any, url: str, n: int, timeout_s: float, wave: int = 8) -> int:
    """Open `n` pool connections now, so that a burst reuses them instead of connecting (TCP + handshake under
    the tight connect timeout) per request; returns how many opened. A Redis that is down costs one failed wave.
    Connections are held until the end (else the pool would hand the same one out again), `wave` at a time."""
    if is_cluster_url(url):
        # a cluster client connects per node on first use; learn the slot map now (one round trip)
        try:
            async with asyncio.timeout(timeout_s):
                await client.initialize()
        except Exception as e:  # noqa: BLE001 - unreachable now: readiness and the breaker deal with it
            log.warning("redis cluster not reachable at start: %r", e)
        return 0
    pool = client.connection_pool
    held: list[Any] = []
    try:
        async with asyncio.timeout(timeout_s):
            while len(held) < n:
                got = await asyncio.gather(*(pool.get_connection() for _ in range(min(wave, n - len(held)))),
                                           return_exceptions=True)
                opened = [c for c in got if not isinstance(c, BaseException)]
                held += opened
                if not opened:  # unreachable: readiness and the breaker deal with it
                    break
    except TimeoutError:
        pass
    finally:
        for c in held:
            await pool.release(c)
    return len(held)


async def check_cluster_mode(state: AppState) -> None:
    """A plain redis:// URL naming one node of a cluster: say so in /readyz (not ready) instead of answering
    by fallback for every user whose slot lives elsewhere. Best effort: a Redis down now is readiness's job."""
    try:
        async with asyncio.timeout(max(state.settings.redis_timeout_ms / 1000.0, 1.0)):
            await check_async(state.redis, state.settings.redis_url)
    except ClusterModeError as e:
        log.error("%s", e)
        state.redis_config_error = str(e)
    except Exception as e:  # noqa: BLE001 - unreachable now
        log.debug("cluster-mode check skipped: %r", e)


def _document_limits(app: FastAPI, settings: Settings) -> None:
    """Serve an OpenAPI document with this server's `max_k` / `max_request_history`, not the hard bounds."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = apply_server_limits(build(), settings.max_k, settings.max_request_history)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to customise the schema


def create_app(settings: Settings | None = None, *, loader: ModelLoader | None = None) -> FastAPI:
    """Build the app; `loader` replaces `load_onerec` (tests)."""
    settings = settings or get_settings()
    load_model = loader or load_onerec

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        t0 = time.perf_counter()
        ds = await asyncio.to_thread(load_dataset, settings.data_dir)
        users = sorted(ds.sequences)
        random.Random(0).shuffle(users)
        popularity = Popularity(ds.sequences.values())
        state = AppState(settings, ds.catalog, users, popularity, open_redis(settings), Metrics())
        app.state.svc = state
        freeze_heap()
        log.info("catalogue loaded: %d items, %d users (%.2fs)", len(ds.catalog), len(ds.sequences),
                 time.perf_counter() - t0)

        async def load() -> None:
            try:
                loaded = await asyncio.to_thread(load_model, settings, state.policy)
            except Exception as e:  # noqa: BLE001 - reported by /readyz; the API keeps answering by fallback
                log.exception("model load failed")
                state.load_error = f"model load failed: {e}"
                return
            state.completer.popularity = Popularity(ds.sequences.values(), {int(i) for i in loaded.sid.item_ids})
            state.attach(loaded)
            freeze_heap()
            log.info("model %s ready (%.2fs after start)", loaded.model_id, time.perf_counter() - t0)

        warm = warm_redis(state.redis, settings.redis_url, settings.redis_max_connections,
                          max(settings.redis_timeout_ms / 1000.0, 1.0))
        tasks = [asyncio.create_task(load()), asyncio.create_task(state.flush_loop()), asyncio.create_task(warm),
                 asyncio.create_task(check_cluster_mode(state))]
        try:
            yield
        finally:
            for t in tasks:
                t.cancel()
            for t in tasks:
                with suppress(asyncio.CancelledError, Exception):
                    await t
            if state.batcher is not None:
                await state.batcher.aclose()
            if state.loaded is not None:
                await asyncio.to_thread(state.loaded.close)
            gc.unfreeze()  # collectable again (matters where apps come and go in one process: tests)
            await state.redis.aclose()

    app = FastAPI(
        title="OneRec-Think online API",
        version=__version__,
        summary="Think-Ahead recommendations: offline reasoning + prefixes in Redis, online completion.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.add_middleware(RequestGuard, limit=MAX_BODY_BYTES, read_timeout_s=settings.body_read_timeout_s)
    app.include_router(recommend.router)
    app.include_router(users.router)
    app.include_router(ops.router)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    _document_limits(app, settings)
    return app
