"""Request dependencies shared by the routes: the app state and the optional API-key check.

Both are ``async def`` on purpose: FastAPI runs a plain ``def`` dependency in its thread pool, which
costs every request two thread hand-offs (and GIL ping-pong with the model thread) for a dict lookup.
"""

from __future__ import annotations

import secrets

from fastapi import HTTPException, Request, Security
from fastapi.security import APIKeyHeader

from online_api.state import AppState

_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="required when the server sets "
                               "ONEREC_API_KEY")


async def get_state(request: Request) -> AppState:
    state: AppState | None = getattr(request.app.state, "svc", None)
    if state is None:  # only possible if the lifespan did not run
        raise HTTPException(503, "service is starting")
    return state


async def require_api_key(request: Request, key: str | None = Security(_api_key_header)) -> None:
    """401 unless the server has no key configured or the X-API-Key header matches it."""
    expected = request.app.state.settings.api_key
    if expected is None:
        return
    if key is None or not secrets.compare_digest(key.encode(), expected.encode()):
        raise HTTPException(401, "missing or invalid X-API-Key", headers={"WWW-Authenticate": "APIKey"})
