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
import json
import logging
import math
import random
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import Any

import redis.asyncio as aioredis
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from model.policy import Popularity
from online_api.metrics import Metrics
from online_api.routes import ops, recommend, users
from online_api.schemas import MAX_BODY_BYTES, apply_server_limits
from online_api.state import AppState, ModelLoader, load_onerec
from services.catalog import load_dataset
from services.config import Settings, get_settings

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


def open_redis(settings: Settings) -> aioredis.Redis:
    """Async pool with tight timeouts and no retries: failures surface at once and the caller falls back."""
    t = settings.redis_timeout_ms / 1000.0
    # blocking pool: a burst waits (bounded by each request's deadline) for a connection instead of failing
    pool = aioredis.BlockingConnectionPool.from_url(
        settings.redis_url, max_connections=settings.redis_max_connections, timeout=t, socket_timeout=t,
        socket_connect_timeout=t, retry=Retry(NoBackoff(), 0), health_check_interval=0,
    )  # fmt: skip
    return aioredis.Redis(connection_pool=pool)


async def warm_redis(client: aioredis.Redis, n: int, timeout_s: float, wave: int = 8) -> int:
    """Open `n` pool connections now, so that a burst reuses them instead of connecting (TCP + handshake under
    the tight connect timeout) per request; returns how many opened. A Redis that is down costs one failed wave.
    Connections are held until the end (else the pool would hand the same one out again), `wave` at a time."""
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


class BodyLimit:
    """Pure ASGI middleware: 413 for request bodies over `limit` bytes, before anything parses them."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await self._reject(send)
        if length is None and scope["method"] in ("POST", "PUT", "PATCH"):
            # chunked: read at most `limit` bytes, then replay them to the app
            chunks, size, more = [], 0, True
            while more:
                msg = await receive()
                if msg["type"] != "http.request":
                    break
                chunks.append(msg.get("body", b""))
                size += len(chunks[-1])
                more = msg.get("more_body", False)
                if size > self.limit:
                    return await self._reject(send)
            body = b"".join(chunks)
            replayed = False

            async def replay() -> Message:
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            return await self.app(scope, replay, send)
        return await self.app(scope, receive, send)

    async def _reject(self, send: Send) -> None:
        body = json.dumps({"detail": f"request body larger than {self.limit} bytes"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


# FastAPI answers 400 with this detail when a JSON body is not even text (UnicodeDecodeError); everything
# else that is not JSON is a 422 `json_invalid`, so this one is too (documented, names the body)
_BODY_PARSE_ERROR = "There was an error parsing the body"


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 400 and exc.detail == _BODY_PARSE_ERROR:
        detail = [{"type": "json_invalid", "loc": ["body"], "msg": "request body is not UTF-8 JSON", "input": None}]
        return JSONResponse({"detail": detail}, status_code=422)
    return await http_exception_handler(request, exc)


def _finite(x: Any) -> Any:
    """JSON has no NaN or Infinity: such inputs (`1e400`, `NaN`) are echoed back as strings."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite(v) for v in x]
    return x


async def _validation_error(request: Request, exc: Exception) -> Response:
    """FastAPI's 422 body, except that a non-finite input no longer makes rendering it fail (a 500)."""
    assert isinstance(exc, RequestValidationError)
    return JSONResponse({"detail": _finite(jsonable_encoder(exc.errors()))}, status_code=422)


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
                loaded = await asyncio.to_thread(load_model, settings)
            except Exception as e:  # noqa: BLE001 - reported by /readyz; the API keeps answering by fallback
                log.exception("model load failed")
                state.load_error = f"model load failed: {e}"
                return
            state.completer.popularity = Popularity(ds.sequences.values(), {int(i) for i in loaded.sid.item_ids})
            state.attach(loaded)
            freeze_heap()
            log.info("model %s ready (%.2fs after start)", loaded.model_id, time.perf_counter() - t0)

        warm = warm_redis(state.redis, settings.redis_max_connections, max(settings.redis_timeout_ms / 1000.0, 1.0))
        tasks = [asyncio.create_task(load()), asyncio.create_task(state.flush_loop()), asyncio.create_task(warm)]
        try:
            yield
        finally:
            for t in tasks:
                t.cancel()
            for t in tasks:
                with suppress(asyncio.CancelledError, Exception):
                    await t
            if state.batcher is not None:
                await asyncio.to_thread(state.batcher.stop)
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
    app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES)
    app.include_router(recommend.router)
    app.include_router(users.router)
    app.include_router(ops.router)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    _document_limits(app, settings)
    return app
