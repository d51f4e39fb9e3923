"""User routes: `POST /v1/events`, `GET /v1/users/{user_id}/think`, `GET /v1/users` (demo page sample)."""

from __future__ import annotations

import asyncio
import logging
import uuid

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Response
from redis.exceptions import RedisError

from model.think.grounding import parse
from online_api.complete import entry_lag
from online_api.deps import get_state, require_api_key
from online_api.schemas import (
    MAX_ID,
    UNAUTHORIZED,
    ErrorResponse,
    EventsRequest,
    EventsResponse,
    HistoryItem,
    Mention,
    Prefix,
    ThinkEntryOut,
    ThinkResponse,
    UsersResponse,
)
from online_api.state import AppState
from services.store import write_refusal

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1", tags=["users"], dependencies=[Depends(require_api_key)])


@router.post(
    "/events",
    response_model=EventsResponse,
    summary="Append interactions to a user's history",
    responses={
        **UNAUTHORIZED,
        202: {"model": EventsResponse, "description": "Redis unavailable: queued, written when it is back"},
        503: {"model": ErrorResponse, "description": "Redis unavailable and the local event buffer is full"},
    },
)
async def post_events(req: EventsRequest, response: Response, state: AppState = Depends(get_state)) -> EventsResponse:
    """Known item ids are appended (bounded history, oldest dropped); unknown ones are dropped and counted.
    The next recommend of the user already uses them, even while they wait for Redis."""
    known = state.completer.known
    items = [i for i in req.items if i in known]
    unknown = len(req.items) - len(items)
    if unknown:
        state.metrics.unknown_items.inc(unknown)
    if not items:
        return EventsResponse(user_id=req.user_id, accepted=0, unknown_items=unknown, stored=False,
                              detail="no item is in the catalogue: nothing stored")
    s = state.settings
    append_id = uuid.uuid4().hex  # a retry of a write that timed out must not append the items twice
    # queued events of this user go first, so new ones queue behind them (order = arrival order)
    if not state.pending.has(req.user_id) and state.breaker.allow():
        try:
            async with asyncio.timeout(s.redis_timeout_ms / 1000.0):
                n = await state.reader.append_events(req.user_id, items, s.history_max, append_id)
        except (RedisError, OSError, TimeoutError) as e:
            log.debug("events write failed: %r", e)
            refused = write_refusal(e)
            if refused:  # Redis answered and refused the write: reads still work, the read breaker stays shut
                state.metrics.write_refusals.labels(refused).inc()
            else:
                state.breaker.failed()
                state.metrics.redis_errors.labels("events").inc()
        else:
            state.breaker.succeeded()
            state.metrics.events.labels("true").inc(len(items))
            return EventsResponse(user_id=req.user_id, accepted=len(items), unknown_items=unknown, stored=True,
                                  history_len=n)
    if not state.pending.add(req.user_id, items, append_id):
        raise HTTPException(503, "Redis unavailable and the event buffer is full; retry later",
                            headers={"Retry-After": "1"})
    state.metrics.events.labels("false").inc(len(items))
    state.metrics.pending_events.set(len(state.pending))
    response.status_code = 202
    return EventsResponse(user_id=req.user_id, accepted=len(items), unknown_items=unknown, stored=False)


@router.get(
    "/users/{user_id}/think",
    response_model=ThinkResponse,
    summary="The user's cached reasoning, prefixes and history",
    responses={**UNAUTHORIZED, 404: {"model": ErrorResponse, "description": "the live-version pointer in Redis "
                                     "is not a usable version (the detail says why)"}},
)
async def get_think(user_id: int = Path(..., ge=0, le=MAX_ID), state: AppState = Depends(get_state)) -> ThinkResponse:
    """What the offline tier cached for the user under the live version (entry null if none), plus the
    history the next recommend would use. `degraded` when Redis could not be read."""
    s = state.settings
    version, entry, history, degraded = None, None, [], False
    try:
        async with asyncio.timeout(s.redis_timeout_ms / 1000.0):
            res = await state.reader.fetch(user_id, history_max=s.history_max)
        version, entry, history = res.version, res.entry, res.history
        if res.corrupt:
            state.metrics.corrupt.inc()
        if res.bad_version:
            raise HTTPException(404, f"no usable think-ahead version: {res.bad_version}")
    except (RedisError, OSError, TimeoutError):
        state.metrics.redis_errors.labels("think").inc()
        degraded = True
    history = (history + state.pending.get(user_id))[-s.history_max :]
    cat = state.catalog
    out = None
    if entry is not None:
        mentions, categories = _grounding(state, entry.reasoning, history)
        out = ThinkEntryOut(
            reasoning=entry.reasoning, mentions=mentions, categories=categories,
            prefixes=[Prefix(a=a, b=b, logprob=lp) for a, b, lp in entry.prefixes],
            history_len=entry.history_len, history_tail=entry.history_tail, model_id=entry.model_id,
            created_at=entry.created_at, lag=entry_lag(entry, history),
        )  # fmt: skip
    return ThinkResponse(user_id=user_id, version=version, entry=out,
                         history=[HistoryItem(item_id=i, title=cat.title(i)) for i in history], degraded=degraded)


def _grounding(state: AppState, reasoning: str, history: list[int]) -> tuple[list[Mention], list[str]]:
    """History items and categories a rationale names (`model.think.grounding.parse`)."""
    r = parse(reasoning)
    g = state.grounding
    categories = list(dict.fromkeys(r.likes + ([r.next] if r.next else [])))
    if g is None:
        return [], categories
    mentions = []
    for m in r.mentions:
        match = next((i for i in reversed(history) if g.titles.get(i) == m), None)
        if match is not None:
            mentions.append(Mention(item_id=match, title=state.catalog.title(match), short=m))
    return mentions, categories


@router.get("/users", response_model=UsersResponse, summary="A sample of user ids (demo page)",
            responses={**UNAUTHORIZED})
async def list_users(limit: int = Query(20, ge=1, le=1000), state: AppState = Depends(get_state)) -> UsersResponse:
    return UsersResponse(users=state.users[:limit])
