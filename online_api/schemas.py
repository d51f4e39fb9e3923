"""HTTP bodies of the online API: the ONE owner of request and response shapes.

Validation happens here, where data enters: ids are non-negative ints, `k` and history lengths have
hard upper bounds (the server's configured limits, which may be lower, are checked in the routes and
reported the same way: 422 with the field's location, and written into the served OpenAPI document by
`apply_server_limits`). JSON numbers must be numbers: `true` or `"7"` are rejected, not coerced (pydantic's
lax mode would read them as 1 and 7), while `7.0` is the integer 7 as JSON Schema says. Nothing here reads
Redis or runs a model.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from pydantic_core import PydanticCustomError

# Hard bounds of the schema; `Settings.max_k` / `Settings.max_request_history` may be lower.
HARD_MAX_K = 1000
HARD_MAX_HISTORY = 1000
MAX_EVENTS = 100
# ids must survive any JSON client (JavaScript numbers are doubles: integers are exact up to 2**53 - 1)
MAX_ID = 2**53 - 1
MAX_BODY_BYTES = 64 * 1024  # larger request bodies get 413 before they are parsed


def _number(kind: str) -> BeforeValidator:
    """Reject JSON booleans and strings before pydantic's lax mode coerces them to numbers."""

    def check(v: Any) -> Any:
        if isinstance(v, bool | str | bytes):
            raise PydanticCustomError(f"{kind}_type", f"Input should be a valid {kind}, not {{got}}",
                                      {"got": type(v).__name__})  # fmt: skip
        return v

    return BeforeValidator(check)


# (constraints before the validator: after it, pydantic would not write them into the JSON schema)
Id = Annotated[int, Field(ge=0, le=MAX_ID), _number("integer")]
ItemId = Id

Source = Literal["think-ahead", "online-only", "fallback"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --------------------------------------------------------------------------- recommend


class RecommendRequest(_Strict):
    """Ask for the next items of one user."""

    user_id: Id = Field(..., description="user id", examples=[42])
    k: Annotated[int, Field(ge=1, le=HARD_MAX_K), _number("integer")] = Field(
        10, description="number of items (at most the server's max_k)"
    )
    history: list[ItemId] | None = Field(
        None,
        max_length=HARD_MAX_HISTORY,
        description="recent item ids, oldest first, not yet sent as events; merged after the stored history "
        "(an overlap with its tail is not counted twice). At most the server's max_request_history.",
        examples=[[101, 2048]],
    )
    budget_ms: Annotated[float, Field(gt=0, le=10_000, allow_inf_nan=False), _number("number")] | None = Field(
        None, description="latency budget of this request; default: the server's default_budget_ms"
    )

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"user_id": 42, "k": 10}, {"user_id": 7, "history": [1, 2]}]}
    )


class Item(BaseModel):
    item_id: int
    title: str
    codes: list[int] = Field(..., description="semantic-ID codes (a, b, c, d)")
    score: float = Field(..., description="log-probability (model) or log-popularity (fallback); higher is better")
    source: Source = Field(..., description="which path produced this item")
    cached_prefix: bool | None = Field(
        None, description="think-ahead items: true when the item's (a, b) is one of the cached prefixes the "
                          "offline reasoning produced, false when it came from the online model's own prefixes "
                          "(ONEREC_OWN_PREFIXES); null for other sources")
    category: str | None = Field(None, description="category label of the item's first code (the words a grounded "
                                                   "rationale uses); null before the model is loaded")


class RecommendResponse(BaseModel):
    items: list[Item]
    reasoning: str | None = Field(None, description="offline reasoning text of the think-ahead entry, if used")
    source: Source = Field(..., description="think-ahead: completed under the cached prefixes (and the online "
                           "model's own ones); online-only: full decode of the fresh history; fallback: popular items")
    degraded: bool = Field(..., description="a dependency failed or the budget ran out")
    latency_ms: float
    version: str | None = Field(None, description="live think-ahead version in Redis (null if unknown)")
    model_id: str = Field(..., description="online model checkpoint")
    unknown_items: int = Field(0, description="history item ids dropped because the catalogue lacks them")


# --------------------------------------------------------------------------- events


class EventsRequest(_Strict):
    """Interactions to append to a user's bounded history (oldest first)."""

    user_id: Id = Field(..., examples=[42])
    items: list[ItemId] = Field(..., min_length=1, max_length=MAX_EVENTS, description="item ids, oldest first")


class EventsResponse(BaseModel):
    user_id: int
    accepted: int = Field(..., description="items appended (or queued)")
    unknown_items: int = Field(..., description="items dropped: not in the catalogue")
    stored: bool = Field(..., description="true: written to Redis; false: nothing written now: queued until Redis "
                                          "is back (HTTP 202), or nothing to store (accepted 0, detail says why)")
    history_len: int | None = Field(None, description="length of the stored history after the write")
    detail: str | None = Field(None, description="why nothing was stored, when accepted is 0")


# --------------------------------------------------------------------------- think entry


class HistoryItem(BaseModel):
    item_id: int
    title: str


class Mention(HistoryItem):
    short: str = Field(..., description="the short title the reasoning quotes")


class Prefix(BaseModel):
    a: int
    b: int
    logprob: float


class ThinkEntryOut(BaseModel):
    reasoning: str
    mentions: list[Mention] = Field(
        default_factory=list, description="history items the reasoning names (quoted short titles), most recent "
                                          "match first; a mention of no history item is left out")
    categories: list[str] = Field(default_factory=list, description="category labels the reasoning names")
    prefixes: list[Prefix]
    history_len: int
    history_tail: list[int]
    model_id: str
    created_at: float
    lag: int | None = Field(None, description="interactions since the entry was computed (null if unknown)")


class ThinkResponse(BaseModel):
    user_id: int
    version: str | None
    entry: ThinkEntryOut | None
    history: list[HistoryItem]
    degraded: bool = Field(False, description="Redis could not be read")


class UsersResponse(BaseModel):
    users: list[int] = Field(..., description="sample of user ids from the dataset (for the demo page)")


# --------------------------------------------------------------------------- operations


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class ConsumedRuleInfo(BaseModel):
    exclude: bool = Field(description="items of the user's history are never listed")
    source: str = Field(description="forced by ONEREC_EXCLUDE_CONSUMED, chosen on validation (auto), or the default")


class Readiness(BaseModel):
    ready: bool
    model: bool
    redis: bool
    degraded: bool = Field(False, description="ready, but no usable live think-ahead version: every answer is "
                                              "online-only (detail says why)")
    detail: str | None = None
    consumed_rule: ConsumedRuleInfo | None = None


class ErrorResponse(BaseModel):
    detail: str


def apply_server_limits(spec: dict[str, Any], max_k: int, max_history: int) -> dict[str, Any]:
    """Write the server's configured limits into the OpenAPI document (in place), so that every request the
    served schema allows is one this server accepts (the routes enforce the same limits)."""
    props = spec.get("components", {}).get("schemas", {}).get("RecommendRequest", {}).get("properties", {})
    if "k" in props:
        props["k"]["maximum"] = min(max_k, HARD_MAX_K)
    for variant in props.get("history", {}).get("anyOf", []):
        if variant.get("type") == "array":
            variant["maxItems"] = min(max_history, HARD_MAX_HISTORY)
    return spec


UNAUTHORIZED: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "missing or wrong X-API-Key"}
}
