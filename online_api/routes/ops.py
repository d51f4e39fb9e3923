"""Operations routes: `/healthz`, `/readyz`, `/metrics`, and the demo page at `/`."""

from __future__ import annotations

import asyncio
from pathlib import Path

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from online_api.deps import get_state
from online_api.schemas import ConsumedRuleInfo, Health, Readiness
from online_api.state import AppState

STATIC = Path(__file__).resolve().parent.parent / "static"

router = APIRouter(tags=["operations"])


@router.get("/healthz", response_model=Health, summary="Liveness: the process answers")
async def healthz() -> Health:
    return Health()


async def live_version_problem(state: AppState) -> str | None:
    """Why no user can get a think-ahead answer now (None: a live version is registered). Ready stays true (the
    replica answers, online-only): taking every replica out of the balancer for a data problem would be an outage.
    A Redis failure here is not a version problem (readiness's redis check and the breaker report it)."""
    try:
        async with asyncio.timeout(max(state.settings.redis_timeout_ms / 1000.0, 0.25)):
            version = await state.reader.current_version()
            if state.reader.pointer_error:
                return f"{state.reader.pointer_error}: every answer is online-only"
            if version is None:
                return "no live think-ahead version (nothing published): every answer is online-only"
            if not await state.reader.version_registered(version):
                return f"the live-version pointer names {version!r}, which does not exist: every answer is online-only"
    except Exception:  # noqa: BLE001 - Redis trouble is reported as such, not as a version problem
        return None
    return None


@router.get(
    "/readyz",
    response_model=Readiness,
    summary="Readiness: model loaded and Redis answering",
    responses={503: {"model": Readiness, "description": "not ready (still loading, load failed, or Redis down)"}},
)
async def readyz(request: Request) -> JSONResponse:
    state: AppState | None = getattr(request.app.state, "svc", None)
    if state is None:
        body = Readiness(ready=False, model=False, redis=False, detail="starting")
        return JSONResponse(body.model_dump(), status_code=503)
    model = state.batcher is not None and state.batcher.running and state.loaded is not None and state.loaded.healthy
    redis = state.redis_config_error is None and await state.redis_ok()
    detail = state.load_error or (None if model else "model loading")
    if not redis:
        detail = (detail + "; " if detail else "") + (state.redis_config_error or "redis unavailable")
    problem = await live_version_problem(state) if model and redis else None
    if problem:
        detail = (detail + "; " if detail else "") + problem
    try:
        rule = state.settings.consumed_rule()
        consumed: ConsumedRuleInfo | None = ConsumedRuleInfo(exclude=rule.exclude, source=rule.source)
    except ValueError:  # unreadable record: the model load reports it (the policy is built from the same call)
        consumed = None
    body = Readiness(ready=model and redis, model=model, redis=redis, degraded=problem is not None, detail=detail,
                     consumed_rule=consumed)
    state.metrics.ready.set(1 if body.ready else 0)
    state.metrics.think_ahead_degraded.set(1 if problem else 0)
    return JSONResponse(body.model_dump(), status_code=200 if body.ready else 503)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format"}})
async def metrics(state: AppState = Depends(get_state)) -> Response:
    state.metrics.pending_events.set(len(state.pending))
    state.metrics.events_replayed.set(state.reader.replayed)
    state.metrics.breaker_open.set(0 if state.breaker.allow() else 1)
    state.metrics.pointer_valid.set(0 if state.reader.pointer_error else 1)
    state.metrics.pointer_bad_reads.set(state.reader.bad_pointer_reads)
    if state.loaded is not None and state.loaded.processes:
        state.metrics.model_restarts.set(sum(p.restarts for p in state.loaded.processes))
        state.metrics.model_standby.set(sum(p.standby_calls for p in state.loaded.processes))
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.get("/", include_in_schema=False)
async def index() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html")
