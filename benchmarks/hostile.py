"""Hostile-input fuzzers of the online API, counted rather than raised: what schemathesis does not send.

- `http_cases` + `run_http_fuzz`: request bodies and paths a hostile client sends, from a fixed seed: byte-level
  mutations of valid bodies (bit flips, interesting bytes, insertions, deletions, duplicated spans, truncation),
  Unicode edge cases in every field (lone surrogates as escapes and as raw UTF-8, NUL, RTL marks, non-characters,
  BOMs, overlong encodings), nesting depth around and far past the limits, number edge cases (-0, 1e400, 2**53,
  thousands of digits, NaN, leading zeros), and the same bytes under other content types (text, multipart,
  form, none). Every answer must be < 500, arrive within the budget + 1 s, and be JSON when it says so; a 422
  must be small.
- `redis_value_cases` + `run_redis_fuzz`: arbitrary bytes, other Redis types and edge-case JSON written into
  every key the API reads (a user's think entry, their history, the live-version pointer) while a background
  thread keeps requesting; after each write the affected user's recommend, think and events are checked the
  same way, and a healthy user's recommend too. Each case's key is put back afterwards.
- `refusal_check`: Redis refusing writes (``maxmemory`` + ``noeviction``, then a read-only replica) while
  events and recommends run: events must be queued (``stored: false``), recommends of users with entries must
  stay think-ahead, and the read breaker must stay shut.

Used by `benchmarks.faults` (>= 5,000 HTTP and >= 1,000 Redis cases against the real artifacts) and by
tests/test_api_fuzz_hostile.py (a few hundred, seeded). Not a test and not a load generator.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import httpx
import redis

from services.store import SCHEMA_VERSION, ThinkKeys

MAX_422_BYTES = 8192  # online_api.errors.MAX_ERROR_BYTES

# --------------------------------------------------------------------------- HTTP cases

UNICODE = [
    "\\ud800", "\\udfff", "\\ud800\\ud800", "\\udc00\\ud800", "\\ud83d\\ude00", "\\u0000", "\\u202e", "\\u200f",
    "\\ufeff", "\\ufffe", "\\uffff", "\\ud83f\\udffe", "\u202eevil", "\u0000", "\ufdd0", "\U0010ffff", "\u00e9",
    "\\", "\\x", "\\u12", "\\uZZZZ",
]  # fmt: skip
RAW_UNICODE = [b"\xed\xa0\x80", b"\xed\xbf\xbf", b"\xc0\xaf", b"\xe0\x80\xaf", b"\xf4\x90\x80\x80", b"\xff",
               b"\xfe\xff", b"\xef\xbb\xbf", b"\x00", b"\xe2\x80\xae", b"\xef\xbf\xbe", b"\x80"]  # fmt: skip
NUMBERS = [
    "0", "-0", "1", "-1", "0.0", "-0.0", "1.0", "1e0", "1E+2", "1e-400", "1e400", "-1e400", "1e308", "2e308",
    "9007199254740991", "9007199254740992", "9007199254740993", "18446744073709551616", "1" + "0" * 40,
    "9" * 4300, "9" * 4301, "9" * 5000, "1." + "1" * 5000, "0." + "0" * 3000 + "1", "1e99999999999",
    "NaN", "Infinity", "-Infinity", "01", "00", "+1", ".5", "5.", "0x10", "1_000", "1e", "-", "--1", "1.5",
    "10.000000000000001", "4.9e-324", "true", "false", "null", '"7"', "[]", "{}",
]  # fmt: skip
DEPTHS = [1, 2, 10, 31, 32, 33, 64, 100, 498, 499, 500, 501, 999, 1000, 1001, 5000, 20000]
CONTENT_TYPES = [
    "application/json", "application/json", "application/json", "application/json; charset=utf-8",
    "application/json; charset=latin-1", "application/vnd.api+json", "text/plain", "application/octet-stream",
    "multipart/form-data; boundary=x", "multipart/form-data", "application/x-www-form-urlencoded", "",
    "application/json; boundary=\xff", "APPLICATION/JSON",
]  # fmt: skip
INTERESTING = b'\x00\xff\x80\xc0\xed"\\[]{}:,0123456789-+eE.\n \t'


@dataclass
class HttpCase:
    kind: str
    method: str
    path: str
    body: bytes
    content_type: str | None  # None: no header


def _seeds(users: list[int], items: list[int], rng: random.Random) -> list[tuple[str, dict[str, Any]]]:
    u, hist = rng.choice(users), rng.sample(items, min(len(items), rng.randint(0, 6)))
    return [
        ("/v1/recommend", {"user_id": u, "k": rng.randint(1, 20)}),
        ("/v1/recommend", {"user_id": u, "k": 5, "history": hist, "budget_ms": 300.0}),
        ("/v1/events", {"user_id": u, "items": hist or items[:1]}),
    ]


def _mutate(raw: bytes, rng: random.Random) -> bytes:
    b = bytearray(raw)
    for _ in range(rng.randint(1, 4)):
        op, i = rng.randrange(7), rng.randrange(len(b) + 1)
        if op == 0 and b and i < len(b):
            b[i] ^= 1 << rng.randrange(8)
        elif op == 1 and i < len(b):
            b[i] = rng.choice(INTERESTING)
        elif op == 2:
            b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif op == 3:
            del b[i : i + rng.randint(1, 8)]
        elif op == 4:
            j = rng.randint(i, len(b))
            b[i:i] = b[i:j] * rng.randint(1, 50)
        elif op == 5:
            b = b[:i]
        else:
            b[i:i] = rng.choice(RAW_UNICODE)
    return bytes(b)


def _nest(depth: int, rng: random.Random, inner: str = "1") -> str:
    if rng.random() < 0.5:
        return "[" * depth + inner + "]" * depth
    return '{"a":' * depth + inner + "}" * depth


def http_cases(n: int, users: list[int], items: list[int], seed: int = 0) -> Iterator[HttpCase]:
    """`n` hostile cases, the same for the same arguments."""
    rng = random.Random(seed)
    fields = ["user_id", "k", "history", "budget_ms", "items", "extra"]
    for i in range(n):
        path, obj = rng.choice(_seeds(users, items, rng))
        raw = json.dumps(obj).encode()
        ctype: str | None = "application/json"
        kind = ("mutate", "unicode", "depth", "number", "content_type", "path")[i % 6]
        if kind == "mutate":
            raw = _mutate(raw, rng)
        elif kind == "unicode":
            text = "".join(rng.choice(UNICODE) for _ in range(rng.randint(1, 3)))
            where = rng.choice(fields)
            value = rng.choice([f'"{text}"', f'["{text}"]', f'{{"{text}": 1}}', f'"{text}"'])
            key = where if rng.random() < 0.8 else text  # a key can be hostile too
            raw = (raw[:-1].decode() + f', "{key}": {value}}}').encode("utf-8", "surrogatepass")
        elif kind == "depth":
            depth = rng.choice(DEPTHS)
            inner = _nest(depth, rng, rng.choice(["1", '"x"', "[]", "\\ud800"]))
            raw = inner.encode() if rng.random() < 0.2 else (raw[:-1] + f', "{rng.choice(fields)}": {inner}}}'.encode())
        elif kind == "number":
            num = rng.choice(NUMBERS)
            raw = json.dumps({**obj, rng.choice(fields[:4] + ["items"]): "@@"}).replace('"@@"', num).encode()
            if rng.random() < 0.3:
                raw = raw.replace(b"]", b", " + num.encode() + b"]", 1)
        elif kind == "content_type":
            ctype = rng.choice(CONTENT_TYPES) or None
            if rng.random() < 0.5:
                raw = _mutate(raw, rng)
            if ctype and ctype.startswith("multipart") and rng.random() < 0.7:
                head = b'--x\r\nContent-Disposition: form-data; name="user_id"\r\n\r\n'
                raw = head + raw + b"\r\n--x"[: rng.randint(0, 6)]
        else:
            junk = rng.choice(["-1", "1e3", "%ED%A0%80", "%00", "%FF", "9" * 30, "1.0", "abc", "%E2%80%AE1", "", " ",
                               str(rng.choice(users)), "0x1", "１２"])  # fmt: skip
            if rng.random() < 0.6:
                yield HttpCase(kind, "GET", f"/v1/users/{junk}/think", b"", None)
            else:
                yield HttpCase(kind, "GET", f"/v1/users?limit={junk}", b"", None)
            continue
        yield HttpCase(kind, "POST", path, raw, ctype)


@dataclass
class FuzzCounts:
    cases: int = 0
    server_errors: int = 0  # status >= 500
    transport_errors: int = 0  # no answer (includes timeouts)
    hangs: int = 0  # answered (or not) later than the budget + 1 s
    bad_bodies: int = 0  # says JSON but is not, or a 422 over MAX_422_BYTES
    slowest_s: float = 0.0
    statuses: Counter[str] = field(default_factory=Counter)  # "<kind> <status>"
    examples: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {"cases": self.cases, "server_errors": self.server_errors, "transport_errors": self.transport_errors,
                "hangs": self.hangs, "bad_bodies": self.bad_bodies, "slowest_s": round(self.slowest_s, 3),
                "statuses": dict(sorted(self.statuses.items()))}  # fmt: skip


def check_response(counts: FuzzCounts, kind: str, label: str, send: Callable[[], httpx.Response], budget_s: float,
                   keep: int = 10) -> httpx.Response | None:  # fmt: skip
    """Send one request and count what came back."""
    counts.cases += 1
    t0 = time.monotonic()
    problem = ""
    r = None
    try:
        r = send()
    except httpx.HTTPError as e:
        counts.transport_errors += 1
        problem = f"transport {type(e).__name__}"
    took = time.monotonic() - t0
    counts.slowest_s = max(counts.slowest_s, took)
    if took > budget_s + 1.0:
        counts.hangs += 1
        problem = problem or f"took {took:.2f}s"
    if r is not None:
        counts.statuses[f"{kind} {r.status_code}"] += 1
        if r.status_code >= 500:
            counts.server_errors += 1
            problem = f"status {r.status_code}"
        if r.headers.get("content-type", "").startswith("application/json"):
            try:
                json.loads(r.content.decode("utf-8"))
            except ValueError:
                counts.bad_bodies += 1
                problem = problem or "body is not UTF-8 JSON"
        if r.status_code == 422 and len(r.content) > MAX_422_BYTES:
            counts.bad_bodies += 1
            problem = problem or f"422 of {len(r.content)} bytes"
    if problem and len(counts.examples) < keep:
        counts.examples.append(f"{label}: {problem}: {(r.text[:200] if r is not None else '')!r}")
    return r


def run_http_fuzz(base_url: str, cases: Iterator[HttpCase], api_key: str | None = None,
                  budget_s: float = 0.5) -> FuzzCounts:  # fmt: skip
    """Send each case once (sequentially) and count; `budget_s` is the longest budget a case may ask for."""
    counts = FuzzCounts()
    key = {"X-API-Key": api_key} if api_key else {}
    with httpx.Client(base_url=base_url, timeout=budget_s + 2.0) as client:
        for case in cases:
            headers: dict[str, str | bytes] = dict(key)
            if case.content_type is not None:
                headers["content-type"] = case.content_type.encode("latin-1")  # bytes: any header value goes

            def send(case: HttpCase = case, headers: dict[str, str | bytes] = headers) -> httpx.Response:
                return client.request(case.method, case.path, content=case.body or None, headers=headers)

            label = f"{case.kind} {case.method} {case.path[:60]} {case.body[:80]!r}"
            check_response(counts, case.kind, label, send, budget_s)
    return counts


# --------------------------------------------------------------------------- Redis values


@dataclass
class RedisCase:
    target: str  # "entry" | "history" | "pointer"
    user: int  # whose requests are checked after the write
    key: str
    what: str
    write: Callable[[redis.Redis], None]


def _entry(rng: random.Random, **over: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {"v": SCHEMA_VERSION, "r": "fuzzed reasoning", "p": [[0, 0, -0.5], [1, 2, -1.0]],
                           "hl": 3, "ht": [1, 2, 3], "m": "fuzz", "t": 1.7e9}  # fmt: skip
    obj.update(over)
    return obj


def _entry_values(rng: random.Random) -> list[bytes]:
    """Edge-case JSON near a valid entry (some of it valid and servable, most of it not)."""
    text = rng.choice(UNICODE + ["x" * 60_000, ""])
    js = [
        json.dumps(_entry(rng, r="@@")).replace('"@@"', f'"{text}"'),
        json.dumps(_entry(rng, m="@@")).replace('"@@"', f'"{text}"'),
        json.dumps(_entry(rng, p=[[rng.choice([-1, 2**53, 2**64, 10**30]), 0, -1.0]])),
        json.dumps(_entry(rng, p="@@")).replace('"@@"', rng.choice(["[[0,0,NaN]]", "[[0,0,1e400]]", "[[true,0,1]]",
                                                                       "[[0,0]]", "[0,0,1]", "{}", "null"])),
        json.dumps(_entry(rng, ht="@@")).replace('"@@"', rng.choice(['["1"]', "[-1]", "[1e3]", "[18446744073709551616]",
                                                                        "[" + "9" * 5000 + "]", "[[1]]"])),
        json.dumps(_entry(rng, t="@@")).replace('"@@"', rng.choice(['"x"', "1e400", "true", "null", "NaN"])),
        json.dumps(_entry(rng, hl="@@")).replace('"@@"', rng.choice(["-1", "1.5", "true", "9" * 5000])),
        json.dumps(_entry(rng, v=rng.choice([0, 2, "1", True, None, 1.0]))),
        json.dumps(_entry(rng, extra=_nest(50, rng))),
        _nest(rng.choice(DEPTHS), rng),
        rng.choice(["null", "1", '"entry"', "[]", "{}", "", "{", '{"v":1', "\ufeff" + json.dumps(_entry(rng))]),
    ]  # fmt: skip
    raw = rng.choice(js).encode("utf-8", "surrogatepass")
    utf16 = raw.decode("utf-8", "surrogatepass").encode("utf-16", "surrogatepass")
    return [raw, utf16, raw[: rng.randint(0, len(raw))]]


def redis_value_cases(n: int, users: list[int], version: str, keys: ThinkKeys,
                      seed: int = 0) -> Iterator[RedisCase]:  # fmt: skip
    """`n` cases, the same for the same arguments: each writer puts one hostile value under one key."""
    rng = random.Random(seed)
    for i in range(n):
        user = rng.choice(users)
        target = ("entry", "history", "pointer", "entry", "history")[i % 5]
        key = {"entry": keys.think(version, user), "history": keys.history(user), "pointer": keys.current}[target]
        choice = rng.randrange(6)
        if choice == 0:
            value = bytes(rng.randrange(256) for _ in range(rng.randint(0, 300)))
            yield RedisCase(target, user, key, f"random bytes ({len(value)})", lambda r, k=key, v=value: _set(r, k, v))
        elif choice == 1:
            rtype = rng.choice(["list", "hash", "set", "zset", "stream"])
            yield RedisCase(target, user, key, f"a {rtype}", lambda r, k=key, t=rtype: _other_type(r, k, t))
        elif choice == 2 and target == "history":
            ids = [b"junk", b"-5", b"1e3", b"\xff", b"9" * 5000, b" 12 ", b"", b"0x10", b"1.0", b"\xd9\xa1",
                   b"18446744073709551616", b"7"]  # fmt: skip
            junk = [rng.choice(ids) for _ in range(rng.randint(1, 200))]
            yield RedisCase(target, user, key, "a list of junk ids", lambda r, k=key, j=junk: _list(r, k, j))
        elif target == "pointer":
            ptr = rng.choice([b"", b" ", b"v1\n", b"current", b"previous", b"versions", b"a:b", b"{1}", b"*",
                              b"\xff\xfe", b"\xed\xa0\x80", b"x" * 65, b"x" * 100_000, b"missing-version", b"\x00",
                              version.encode(), version.encode() + b" "])  # fmt: skip
            yield RedisCase(target, user, key, f"pointer {ptr[:20]!r}", lambda r, k=key, v=ptr: _set(r, k, v))
        else:
            value = rng.choice(_entry_values(rng))
            yield RedisCase(target, user, key, f"edge JSON {value[:40]!r}", lambda r, k=key, v=value: _set(r, k, v))


def _list(r: redis.Redis, key: str, values: list[bytes]) -> None:
    r.delete(key)
    r.rpush(key, *values)


def _set(r: redis.Redis, key: str, value: bytes) -> None:
    r.delete(key)
    r.set(key, value)


def _other_type(r: redis.Redis, key: str, rtype: str) -> None:
    r.delete(key)
    if rtype == "list":
        r.rpush(key, b"1", b"2")
    elif rtype == "hash":
        r.hset(key, mapping={"v": "1"})
    elif rtype == "set":
        r.sadd(key, b"1")
    elif rtype == "zset":
        r.zadd(key, {"1": 1.0})
    else:
        r.xadd(key, {"v": "1"})


class _Background(threading.Thread):
    """Requests for random users while the fuzzer writes (so writes land between a request's reads)."""

    def __init__(self, base_url: str, users: list[int], api_key: str | None, budget_s: float) -> None:
        super().__init__(name="redis-fuzz-load", daemon=True)
        self.base_url, self.users, self.key, self.budget_s = base_url, users, api_key, budget_s
        self.counts = FuzzCounts()
        self.stop = threading.Event()

    def run(self) -> None:
        rng = random.Random(1)
        headers = {"X-API-Key": self.key} if self.key else {}
        with httpx.Client(base_url=self.base_url, timeout=self.budget_s + 2.0, headers=headers) as c:
            while not self.stop.is_set():
                u = rng.choice(self.users)
                if rng.random() < 0.7:
                    check_response(self.counts, "background", f"recommend {u}",
                                   lambda u=u: c.post("/v1/recommend", json={"user_id": u, "k": 10}), self.budget_s)
                else:
                    check_response(self.counts, "background", f"think {u}", lambda u=u: c.get(f"/v1/users/{u}/think"),
                                   self.budget_s)  # fmt: skip


def run_redis_fuzz(base_url: str, client: redis.Redis, cases: Iterator[RedisCase], healthy_user: int, item: int,
                   api_key: str | None = None, budget_s: float = 0.5) -> tuple[FuzzCounts, FuzzCounts]:  # fmt: skip
    """Apply each case, request the affected user (recommend, think, events) and `healthy_user`, put the key back.
    Returns (counts of these requests, counts of the background requests that ran meanwhile)."""
    counts = FuzzCounts()
    bg = _Background(base_url, [healthy_user], api_key, budget_s)
    headers = {"X-API-Key": api_key} if api_key else {}
    bg.start()
    try:
        with httpx.Client(base_url=base_url, timeout=budget_s + 2.0, headers=headers) as c:
            for case in cases:
                saved = client.dump(case.key)
                case.write(client)
                u, label = case.user, f"{case.target} of {case.user}: {case.what}"
                for method, path, body in (("POST", "/v1/recommend", {"user_id": u}), ("GET", f"/v1/users/{u}/think",
                                           None), ("POST", "/v1/events", {"user_id": u, "items": [item]}),
                                           ("POST", "/v1/recommend", {"user_id": healthy_user})):  # fmt: skip
                    check_response(counts, case.target, label, partial(c.request, method, path, json=body), budget_s)
                client.delete(case.key)
                if saved is not None:
                    client.restore(case.key, 0, saved, replace=True)  # type: ignore[arg-type]
    finally:
        bg.stop.set()
        bg.join(10)
    return counts, bg.counts


# --------------------------------------------------------------------------- write refusals


def _metric(base_url: str, name: str, key: str | None) -> float:
    text = httpx.get(f"{base_url}/metrics", timeout=5).text
    for line in text.splitlines():
        if line.startswith(name) and (key is None or key in line.split(" ", 1)[0]):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def refusal_check(base_url: str, client: redis.Redis, users: list[int], item: int, api_key: str | None = None,
                  per_mode: int = 50, budget_s: float = 0.5) -> dict[str, Any]:  # fmt: skip
    """Events + recommends while Redis refuses writes (OOM, then READONLY); the read breaker must stay shut.
    A user's first event is tried and refused (counted), the next ones queue behind it without a try; the queue
    is written once Redis takes writes again (`pending_after_s`: events still queued 10 s later)."""
    headers = {"X-API-Key": api_key} if api_key else {}
    out: dict[str, Any] = {}
    breaker_before = _metric(base_url, "onerec_fallback_total", 'reason="redis_breaker"')
    with httpx.Client(base_url=base_url, timeout=budget_s + 2.0, headers=headers) as c:
        for mode in ("oom", "readonly"):
            if mode == "oom":
                client.config_set("maxmemory-policy", "noeviction")
                client.config_set("maxmemory", 1)
            else:
                client.execute_command("REPLICAOF", "127.0.0.1", "1")
            events, sources, breaker_open = Counter[str](), Counter[str](), 0
            refused_before = _metric(base_url, "onerec_redis_write_refusals_total", f'reason="{mode}"')
            try:
                for n in range(per_mode):
                    u = users[n % len(users)]
                    e = c.post("/v1/events", json={"user_id": u, "items": [item]})
                    events[f"{e.status_code} stored={e.json().get('stored')}"] += 1
                    r = c.post("/v1/recommend", json={"user_id": u, "k": 10})
                    body = r.json() if r.status_code == 200 else {}
                    sources[f"{r.status_code} {body.get('source')} degraded={body.get('degraded')}"] += 1
                    breaker_open += _metric(base_url, "onerec_redis_breaker_open", None) > 0
            finally:
                if mode == "oom":
                    client.config_set("maxmemory", 0)
                else:
                    client.execute_command("REPLICAOF", "NO", "ONE")
                deadline = time.monotonic() + 10  # the queued events are written once Redis takes writes again
                while _metric(base_url, "onerec_pending_events", None) > 0 and time.monotonic() < deadline:
                    time.sleep(0.05)
            out[mode] = {"events": dict(events), "recommends": dict(sources), "breaker_open_samples": breaker_open,
                         "refusals_counted": _metric(base_url, "onerec_redis_write_refusals_total",
                                                     f'reason="{mode}"') - refused_before,
                         "pending_after_s": _metric(base_url, "onerec_pending_events", None)}  # fmt: skip
    out["breaker_fallbacks"] = _metric(base_url, "onerec_fallback_total", 'reason="redis_breaker"') - breaker_before
    return out
