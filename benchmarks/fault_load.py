"""Open-loop load that keeps every answer on a timeline, and the bookkeeping of `benchmarks.faults`.

`benchmarks.online_load` measures latency and returns aggregates; a fault run needs each answer with its
time instead (was it degraded? when did answers become think-ahead again after Redis came back?), on the
clock of the fault injector. `LoadProcess` runs the generator in its own process (so that on a starved
machine the injector is not held up behind it) and times everything with ``time.monotonic()``, one clock
for every process on Linux. Request i of `POST /v1/recommend` is sent at ``t0 + i / rate`` whatever
happened before (open loop), and one `POST /v1/events` every ``1 / event_rate`` seconds appends one known
item to one of the event users in turn (so one user's events are seconds apart and their order is defined).

`event_ledger` then compares what the API acknowledged (200 stored, 202 queued) with what Redis holds;
`recovery_after` finds when answers became good again after a fault. Not a benchmark by itself.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Outcome:
    kind: str  # "recommend" | "event"
    user: int
    sched: float  # time.monotonic() of the scheduled send
    done: float  # time.monotonic() of the answer (or the error)
    status: int  # HTTP status; 0: no answer (connection error, timeout)
    source: str = ""
    degraded: bool = False
    item: int | None = None  # events: the item appended
    stored: bool | None = None  # events: written to Redis (True) or queued by the API (False)
    error: str = ""

    @property
    def good(self) -> bool:
        """A full-quality answer: think-ahead, not degraded."""
        return self.status == 200 and self.source == "think-ahead" and not self.degraded


class OpenLoopLoad:
    """Recommend requests at `rate` per second over `users`, plus events from `events` at `event_rate`;
    `await run()` until `stop` is set, then the answers in flight are awaited (`outcomes`)."""

    def __init__(self, base_url: str, users: Sequence[int], rate: float, events: Iterator[tuple[int, int]] | None,
                 event_rate: float, api_key: str | None = None, budget_ms: float | None = None, k: int = 10,
                 timeout_s: float = 5.0) -> None:  # fmt: skip
        self.base_url, self.users, self.rate, self.k = base_url, list(users), rate, k
        self.events, self.event_rate, self.budget_ms, self.timeout_s = events, event_rate, budget_ms, timeout_s
        self.headers = {"content-type": "application/json", **({"X-API-Key": api_key} if api_key else {})}
        self.outcomes: list[Outcome] = []
        self.stop = False

    async def run(self) -> None:
        await self._main()

    async def _main(self) -> None:
        import aiohttp

        conn = aiohttp.TCPConnector(limit=512, keepalive_timeout=2.0)  # below uvicorn's keep-alive: no races
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        async with aiohttp.ClientSession(connector=conn, timeout=timeout, headers=self.headers) as session:
            tasks: set[asyncio.Task[None]] = set()
            t0 = time.monotonic() + 0.05
            i, n_events = 0, 0
            while not self.stop:
                sched = t0 + i / self.rate
                next_event = t0 + n_events / self.event_rate if self.events is not None else float("inf")
                at = min(sched, next_event)
                if (delay := at - time.monotonic()) > 0:
                    await asyncio.sleep(delay)
                if next_event <= sched and self.events is not None:
                    user, item = next(self.events)
                    body: dict[str, Any] = {"user_id": user, "items": [item]}
                    coro = self._one(session, "event", user, "/v1/events", body, next_event, item)
                    n_events += 1
                else:
                    user = self.users[i % len(self.users)]
                    body = {"user_id": user, "k": self.k}
                    if self.budget_ms is not None:
                        body["budget_ms"] = self.budget_ms
                    coro = self._one(session, "recommend", user, "/v1/recommend", body, sched, None)
                    i += 1
                task = asyncio.create_task(coro)
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            await asyncio.gather(*tasks)

    async def _one(self, session: Any, kind: str, user: int, path: str, body: dict[str, Any], sched: float,
                   item: int | None) -> None:  # fmt: skip
        out = Outcome(kind, user, sched, 0.0, 0, item=item)
        try:
            async with session.post(self.base_url + path, data=json.dumps(body)) as resp:
                out.status = resp.status
                data = await resp.read()
            if out.status in (200, 202):
                got = json.loads(data)
                out.source = got.get("source", "")
                out.degraded = bool(got.get("degraded", False))
                out.stored = got.get("stored")
        except Exception as e:  # noqa: BLE001 - counted, never fatal
            out.error = type(e).__name__
        out.done = time.monotonic()
        self.outcomes.append(out)


class LoadProcess:
    """`OpenLoopLoad` in a child process (``python -m benchmarks.fault_load SPEC``); `stop` returns outcomes."""

    def __init__(self, workdir: Path, url: str, users: Sequence[int], rate: float, event_users: Sequence[int],
                 items: Sequence[int], event_rate: float, api_key: str | None, budget_ms: float | None,
                 timeout_s: float = 5.0) -> None:  # fmt: skip
        self.spec_path, self.out_path = workdir / "load_spec.json", workdir / "load_outcomes.jsonl"
        self.spec: dict[str, Any] = {"url": url, "users": list(users), "rate": rate, "event_users": list(event_users),
                     "items": list(items), "event_rate": event_rate, "api_key": api_key, "budget_ms": budget_ms,
                     "timeout_s": timeout_s, "out": str(self.out_path)}  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.spec_path.write_text(json.dumps(self.spec))
        self.out_path.unlink(missing_ok=True)
        self.proc = subprocess.Popen([sys.executable, "-m", "benchmarks.fault_load", str(self.spec_path)], cwd=ROOT,
                                     env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip

    def stop(self) -> list[Outcome]:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGINT)
        if self.proc.wait(self.spec["timeout_s"] + 60) != 0:
            raise RuntimeError(f"load generator exited with {self.proc.returncode}")
        return [Outcome(**json.loads(line)) for line in self.out_path.read_text().splitlines()]


def _child(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    events = round_robin_events(spec["event_users"], spec["items"]) if spec["event_users"] else None
    load = OpenLoopLoad(spec["url"], spec["users"], spec["rate"], events, spec["event_rate"], spec["api_key"],
                        spec["budget_ms"], timeout_s=spec["timeout_s"])  # fmt: skip

    def stop(*_: Any) -> None:
        load.stop = True

    signal.signal(signal.SIGINT, stop)
    asyncio.run(load.run())
    with open(spec["out"], "w") as f:
        for o in load.outcomes:
            f.write(json.dumps(asdict(o)) + "\n")


def round_robin_events(users: Sequence[int], items: Sequence[int]) -> Iterator[tuple[int, int]]:
    """(user, item): users in turn; each user's j-th event is a different item (items wrap after len(items))."""
    j = 0
    while True:
        for n, u in enumerate(users):
            yield u, items[(n * 7919 + j) % len(items)]
        j += 1


def recovery_after(outcomes: Sequence[Outcome], start: float, end: float, streak: int = 1) -> float | None:
    """Seconds from `start` until the first good recommend answer that opens a run of `streak` good ones
    (answers scheduled in [start, end), by scheduled time); None if answers never recovered.

    One good answer suffices by default: a think-ahead answer needs a Redis read that worked, so it cannot
    happen by chance while Redis is still away (how good the answers stay afterwards is `good_share`)."""
    recs = sorted((o for o in outcomes if o.kind == "recommend" and start <= o.sched < end), key=lambda o: o.sched)
    for j in range(len(recs)):
        run = recs[j : j + streak]
        if len(run) == streak and all(o.good for o in run):
            return max(0.0, recs[j].done - start)
    return None


def event_ledger(outcomes: Sequence[Outcome], initial: dict[int, list[int]], stored: dict[int, list[int]],
                 history_max: int) -> dict[str, Any]:  # fmt: skip
    """Acknowledged events vs the histories Redis holds at the end.

    lost: acknowledged items missing; duplicate: items stored more often than acknowledged; reordered: users
    whose history has the right items in another order. Events without an answer (timeout) may or may not
    have been applied: they are removed from both sides before comparing.
    """
    acked: dict[int, list[tuple[float, int]]] = {u: [] for u in initial}
    unsure: dict[int, Counter[int]] = {u: Counter() for u in initial}
    answer: dict[tuple[int, int], str] = {}
    for o in outcomes:
        if o.kind != "event" or o.item is None:
            continue
        answer[(o.user, o.item)] = f"{o.status} stored={o.stored}"
        if o.status in (200, 202):
            acked[o.user].append((o.sched, o.item))
        elif o.status == 0:
            unsure[o.user][o.item] += 1
    lost = duplicate = reordered = n_acked = 0
    dup_answers: Counter[str] = Counter()  # how the API had answered the events that were stored twice
    for u, hist in initial.items():
        want = list(hist) + [item for _, item in sorted(acked[u])]
        want = want[-history_max:]
        got, maybe = [], unsure[u]
        for x in stored.get(u, []):
            if maybe[x] > 0:  # an unanswered event that was applied after all: not counted either way
                maybe[x] -= 1
                continue
            got.append(x)
        n_acked += len(acked[u])
        missing = Counter(want) - Counter(got)
        extra = Counter(got) - Counter(want)
        lost += sum(missing.values())
        duplicate += sum(extra.values())
        dup_answers.update(answer.get((u, x), "initial") for x in extra.elements())
        if not missing and not extra and got != want:
            reordered += 1
    return {"events_acked": n_acked, "lost_events": lost, "duplicate_events": duplicate, "reordered_users": reordered,
            "duplicate_event_answers": dict(dup_answers)}  # fmt: skip


def good_share(outcomes: Sequence[Outcome], start: float, end: float) -> float | None:
    """Share of good recommend answers among those scheduled in [start, end)."""
    recs = [o.good for o in outcomes if o.kind == "recommend" and start <= o.sched < end]
    return round(sum(recs) / len(recs), 4) if recs else None


def dump(outcomes: Sequence[Outcome], path: Any, t0: float, marks: Sequence[tuple[str, float, float]]) -> None:
    """Every outcome as a JSON line (times relative to `t0`), then the fault marks: for later inspection."""
    with open(path, "w") as f:
        for kind, a, b in marks:
            f.write(json.dumps({"fault": kind, "start": round(a - t0, 4), "end": round(b - t0, 4)}) + "\n")
        for o in sorted(outcomes, key=lambda o: o.sched):
            f.write(json.dumps({**asdict(o), "sched": round(o.sched - t0, 4), "done": round(o.done - t0, 4)}) + "\n")


if __name__ == "__main__":
    _child(sys.argv[1])
