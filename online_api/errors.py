"""Error handling of the online API that cannot itself fail, and the limits enforced before a body is parsed.

- `RequestGuard` (pure ASGI middleware, outermost of the app's own): a body larger than `MAX_BODY_BYTES` is a
  413 before anything reads it; a body that does not arrive within the read timeout (Content-Length larger than
  what is sent) is a 408, so a slow or lying client holds its connection for seconds, not until it gives up; a
  JSON body that is not UTF-8, nests deeper than `MAX_DEPTH` or holds a number longer than `MAX_DIGITS` digits
  is a 422 that says which, before the JSON parser sees it. It is also the last resort: an exception that
  escapes a route (a response that fails to render, a bug) becomes a degraded popular-items answer on
  ``POST /v1/recommend`` (the endpoint promises an answer) and a short JSON 500 elsewhere, with one
  rate-limited log line (`RateLimitedLog`) instead of a traceback per request.
- `validation_error` / `http_error`: the 422 body is rendered by `safe_errors`, which turns any input
  (lone surrogates, bytes, deep nesting, huge integers, NaN) into bounded JSON-safe text.

Not here: request shapes (`schemas.py`), what a normal answer is (`complete.py`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import time
from collections.abc import Sequence
from typing import Any

from fastapi import Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)

MAX_DEPTH = 32  # nesting of arrays / objects in a JSON body (a valid request nests 2 deep)
MAX_DIGITS = 4000  # digits of one JSON number (Python refuses to parse ints of more than 4300)
MAX_ERRORS = 20  # errors listed in one 422 body
MAX_ERROR_BYTES = 8192  # a 422 body is at most this long, whatever the input was
_STR_CHARS = 120  # characters of one echoed string
_SEQ_ITEMS = 8  # items of one echoed list or dict

# a JSON string (escapes included; an unterminated one runs to the end): matched in linear time
_STRING = re.compile(rb'"(?:[^"\\]++|\\.)*+"?', re.DOTALL)
_LONG_NUMBER = re.compile(rb"\d{%d}" % (MAX_DIGITS + 1))
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


class RateLimitedLog:
    """At most one log line per `key` every `every_s` seconds (the first with its traceback); the lines in
    between are counted and the next one says how many were suppressed."""

    def __init__(self, logger: logging.Logger, every_s: float = 60.0) -> None:
        self.logger, self.every_s = logger, every_s
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def exception(self, key: str, msg: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._last.get(key, -math.inf) < self.every_s:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return
        n = self._suppressed.pop(key, 0)
        self._last[key] = now
        extra = f" ({n} similar in the last {self.every_s:g}s not logged)" if n else ""
        self.logger.error(msg + extra, *args, exc_info=True)


RATE_LOG = RateLimitedLog(log)


# --------------------------------------------------------------------------- safe rendering


def safe_text(x: object, limit: int = _STR_CHARS) -> str:
    """`x` as at most `limit` characters of text that encodes as UTF-8 (lone surrogates and undecodable
    bytes become backslash escapes)."""
    try:
        if isinstance(x, bytes | bytearray):
            s = bytes(x[: limit * 4]).decode("utf-8", "backslashreplace")
        elif isinstance(x, str):
            s = x
        else:
            s = str(x)
    except Exception:  # noqa: BLE001 - a str() that fails (huge ints, odd objects) still gets a name
        s = f"<{type(x).__name__}>"
    if len(s) > limit:
        s = s[:limit] + "..."
    return s.encode("utf-8", "backslashreplace").decode("utf-8")


def safe_value(x: object, depth: int = 2) -> Any:
    """A bounded JSON-safe copy of `x`: `depth` levels of containers, `_SEQ_ITEMS` items each."""
    if x is None or isinstance(x, bool):
        return x
    if isinstance(x, int):
        return x if abs(x) < 2**63 else f"<int of {x.bit_length()} bits>"
    if isinstance(x, float):
        return x if math.isfinite(x) else str(x)
    if isinstance(x, str | bytes | bytearray):
        return safe_text(x)
    if isinstance(x, list | tuple | dict):
        if depth <= 0:
            return f"<{type(x).__name__} of {len(x)} items>"
        if isinstance(x, dict):
            return {safe_text(k, 40): safe_value(v, depth - 1) for k, v in list(x.items())[:_SEQ_ITEMS]}
        return [safe_value(v, depth - 1) for v in x[:_SEQ_ITEMS]]
    return f"<{type(x).__name__}>"


def safe_errors(errors: Sequence[Any], depth: int = 2) -> list[dict[str, Any]]:
    """FastAPI/pydantic error dicts (type, loc, msg, input, ctx) made bounded and JSON-safe."""
    out = []
    for e in list(errors)[:MAX_ERRORS]:
        if not isinstance(e, dict):
            continue
        loc = [v if isinstance(v, int) and not isinstance(v, bool) else safe_text(v, 40)
               for v in list(e.get("loc") or ())[:8]]  # fmt: skip
        item = {"type": safe_text(e.get("type", "value_error"), 40), "loc": loc,
                "msg": safe_text(e.get("msg", ""), 300), "input": safe_value(e.get("input"), depth)}  # fmt: skip
        if isinstance(e.get("ctx"), dict):
            item["ctx"] = safe_value(e["ctx"], 1)
        out.append(item)
    return out


def render_422(errors: Sequence[Any]) -> bytes:
    """The 422 body: shallower echoes of the input until it fits `MAX_ERROR_BYTES`; never raises."""
    try:
        for depth, keep in ((2, MAX_ERRORS), (0, MAX_ERRORS), (0, 3)):
            body = json.dumps({"detail": safe_errors(list(errors)[:keep], depth)}, allow_nan=False).encode()
            if len(body) <= MAX_ERROR_BYTES:
                return body
    except Exception:  # noqa: BLE001 - rendering the error must not become the error
        RATE_LOG.exception("render_422", "could not render a validation error")
    return json.dumps({"detail": [{"type": "value_error", "loc": ["body"], "msg": "invalid request",
                                   "input": None}]}).encode()  # fmt: skip


def _json_response(status: int, body: bytes, headers: dict[str, str] | None = None) -> Response:
    return Response(body, status_code=status, media_type="application/json", headers=headers)


def body_error(msg: str, kind: str = "json_invalid") -> bytes:
    return render_422([{"type": kind, "loc": ["body"], "msg": msg, "input": None}])


# FastAPI answers 400 with this detail when it cannot parse a JSON body for another reason than bad JSON
# syntax (that one is a 422 `json_invalid`); it is a 422 here too, naming the cause where it is known
_BODY_PARSE_ERROR = "There was an error parsing the body"


def _parse_cause(exc: BaseException) -> str:
    cause = exc.__cause__
    if isinstance(cause, UnicodeError):
        return "request body is not UTF-8 JSON"
    if isinstance(cause, RecursionError):
        return f"request body nests deeper than {MAX_DEPTH} levels"
    if isinstance(cause, ValueError) and "digits" in str(cause):
        return f"a number in the request body has more than {MAX_DIGITS} digits"
    return "request body could not be parsed as JSON"


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 400 and exc.detail == _BODY_PARSE_ERROR:
        return _json_response(422, body_error(_parse_cause(exc)))
    return await http_exception_handler(request, exc)


def limit_error(field: str, value: Any, limit: int) -> dict[str, Any]:
    """The one 422 error for a value over a server limit (`max_k`, `max_request_history`), in FastAPI's shape."""
    many = isinstance(value, list | tuple) or field == "history"
    return {"type": "too_long" if many else "less_than_equal", "loc": ("body", field),
            "msg": f"{field} may hold at most {limit} items (server limit)" if many
            else f"{field} must be at most {limit} (server limit)",
            "input": len(value) if isinstance(value, list | tuple) else value, "ctx": {"le": limit}}  # fmt: skip


def server_limits(errors: Sequence[Any], settings: Any) -> list[Any]:
    """Schema-bound errors of `k` and `history` restated with the server's own limit, so that a client is told
    one limit whether it asked for 101 or for 5000 (the schema's hard bound is only a backstop)."""
    if settings is None:
        return list(errors)
    limits = {"k": (settings.max_k, "less_than_equal"), "history": (settings.max_request_history, "too_long")}
    out = []
    for e in errors:
        loc = tuple(e.get("loc") or ()) if isinstance(e, dict) else ()
        if len(loc) == 2 and loc[0] == "body" and loc[1] in limits and e.get("type") == limits[loc[1]][1]:
            e = limit_error(str(loc[1]), e.get("input"), limits[loc[1]][0])
        out.append(e)
    return out


async def validation_error(request: Request, exc: Exception) -> Response:
    """FastAPI's 422 body, rendered so that no input can make rendering it fail."""
    assert isinstance(exc, RequestValidationError)
    try:
        errors = server_limits(exc.errors(), getattr(request.app.state, "settings", None))
    except Exception:  # noqa: BLE001
        errors = []
    return _json_response(422, render_422(errors or [{"type": "value_error", "loc": ["body"], "msg": "invalid"}]))


# --------------------------------------------------------------------------- before parsing


def _is_json(scope: Scope) -> bool:
    """The body will go to FastAPI's JSON parser: a JSON content type, or none at all."""
    ctype = dict(scope["headers"]).get(b"content-type")
    if ctype is None:
        return True
    main = ctype.split(b";", 1)[0].strip().lower()
    return main == b"application/json" or (main.startswith(b"application/") and main.endswith(b"+json"))


def check_json_body(body: bytes) -> str | None:
    """Why a JSON body is refused before parsing (not UTF-8, too deep, a too-long number), or None."""
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as e:
        return f"request body is not UTF-8 JSON (invalid byte at offset {e.start})"
    bare = _STRING.sub(b'""', body)  # brackets and digits inside strings do not count
    if _LONG_NUMBER.search(bare):
        return f"a number in the request body has more than {MAX_DIGITS} digits"
    brackets = bare.translate(None, _NOT_BRACKETS)
    if len(brackets) > MAX_DEPTH:
        depth = 0
        for b in brackets:  # bounded by the body limit; a valid request has a handful of brackets
            depth += 1 if b in b"[{" else -1
            if depth > MAX_DEPTH:
                return f"request body nests deeper than {MAX_DEPTH} levels"
    return None


# --------------------------------------------------------------------------- the middleware


class RequestGuard:
    """Body limits before parsing and the last-resort handler (see the module docstring)."""

    def __init__(self, app: ASGIApp, limit: int, read_timeout_s: float) -> None:
        self.app, self.limit, self.read_timeout_s = app, limit, read_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await _send(send, 413, json.dumps({"detail": f"request body larger than {self.limit} bytes"}))
        body: bytes | None = b""
        if scope["method"] in ("POST", "PUT", "PATCH"):
            try:
                async with asyncio.timeout(self.read_timeout_s):
                    body = await self._read(receive)
            except TimeoutError:
                msg = f"request body not received within {self.read_timeout_s:g} s"
                return await _send(send, 408, json.dumps({"detail": msg}), close=True)
            if body is None:
                return await _send(send, 413, json.dumps({"detail": f"request body larger than {self.limit} bytes"}))
            if body and _is_json(scope) and (why := check_json_body(body)) is not None:
                return await _send(send, 422, body_error(why).decode())
            receive = _replay(body, receive)
        started = False

        async def watch(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception:  # noqa: BLE001 - the last resort: no traceback per request, an answer where promised
            path = scope.get("path", "")
            RATE_LOG.exception(f"{scope['method']} {path}", "unhandled error on %s %s", scope["method"], path)
            if started:  # too late for another answer: the server closes the connection
                return
            if scope["method"] == "POST" and path == "/v1/recommend":
                fallback = degraded_recommend(scope, body or b"")
                if fallback is not None:
                    return await _send(send, 200, fallback)
            await _send(send, 500, json.dumps({"detail": "internal error (logged)"}))

    async def _read(self, receive: Receive) -> bytes | None:
        """The whole body, or None once it exceeds the limit (chunked bodies have no Content-Length)."""
        chunks: list[bytes] = []
        size = 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":
                return b"".join(chunks)
            chunks.append(msg.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return None
            if not msg.get("more_body", False):
                return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _send(send: Send, status: int, body: str | bytes, close: bool = False) -> None:
    data = body.encode() if isinstance(body, str) else body
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


def degraded_recommend(scope: Scope, body: bytes) -> str | None:
    """A fallback answer (popular items, degraded) for a recommend whose normal path raised; None if even
    that is impossible (the app is not started). Reads `k` from the body when it is a sane int."""
    try:
        state: Any = getattr(scope["app"].state, "svc", None)
        if state is None:
            return None
        k = 10
        try:
            req = json.loads(body)
            if isinstance(req, dict) and isinstance(req.get("k"), int) and 1 <= req["k"] <= state.settings.max_k:
                k = req["k"]
        except (ValueError, RecursionError):
            pass
        state.metrics.fallbacks.labels("internal_error").inc()
        items = [{"item_id": i, "title": safe_text(state.catalog.title(i), 500), "codes": state.codes_of(i),
                  "score": s, "source": "fallback", "cached_prefix": None}
                 for i, s in state.completer.popularity.recommend(k)]  # fmt: skip
        return json.dumps({"items": items, "reasoning": None, "source": "fallback", "degraded": True,
                           "latency_ms": 0.0, "version": None, "model_id": safe_text(state.model_id),
                           "unknown_items": 0}, allow_nan=False)  # fmt: skip
    except Exception:  # noqa: BLE001
        RATE_LOG.exception("degraded_recommend", "could not build the fallback answer")
        return None
