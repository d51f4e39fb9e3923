"""The batcher for model child processes, driven by the event loop: no thread between a request and the child.

`MicroBatcher` hands each job to a model thread (a queue wake-up), which writes it to the child's pipe, blocks
for the answer and hands it back to the loop (a second wake-up); with the model in a child process that thread
only waits. `LoopBatcher` drops it: the loop writes the call on the child's socket and reads the answer when
the socket is readable (`loop.add_reader`), so an answer costs two wake-ups (child, loop) instead of four.
Measured with an ad hoc A/B on one child (docs/PROFILE.md): 0.43-0.56 ms of API-process CPU per call instead
of 0.86-0.97 ms at 100 calls/s.

Batching is by back-pressure: while a child computes, new jobs wait in the loop; when it answers, everything
waiting (up to ``batch_max``, one kind and policy per call) goes in the next call. Admission, deadlines and
the expected-time rule are `MicroBatcher`'s (`_triage`). What the model process bought stays: a child that
dies (end of file on its socket, seen at once, idle or not) or hangs (no answer `hang_s` after the call's
deadline) is replaced in the background by `ProcessModel`, and the call it held, like every call until the new
child is up, runs on the standby model on one worker thread (`ProcessModel.on_standby`).

Everything here runs on the event loop's thread, except the standby calls.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass
from multiprocessing.connection import Connection

from model.policy import PolicyConfig, Scored
from online_api.batching import BatchHook, Kind, MicroBatcher, Overloaded, WaitHook, _Job, _settle
from online_api.model_process import ProcessModel
from services.config import Settings

log = logging.getLogger(__name__)


@dataclass
class _Slot:
    """One child process and the call it is answering (at most one at a time)."""

    model: ProcessModel
    conn: Connection | None = None  # the pipe whose socket the loop watches
    fd: int = -1
    jobs: list[_Job] | None = None  # the call in flight
    kind: Kind = "complete"
    call: tuple[str, tuple[object, ...]] = ("", ())
    t0: float = 0.0
    timer: asyncio.TimerHandle | None = None


class LoopBatcher(MicroBatcher):
    """`MicroBatcher`'s interface (`submit`, `running`, `qsize`, `aclose`) over model child processes, with no
    model thread: `start` and every other method run on the event loop."""

    def __init__(self, models: Sequence[ProcessModel], batch_max: int, queue_max: int, admit_by_expected: bool,
                 torch_threads: int = 1, on_batch: BatchHook | None = None, on_wait: WaitHook | None = None) -> None:
        if not models:
            raise ValueError("LoopBatcher needs at least one model process")
        super().__init__(models[0], batch_max=batch_max, wait_ms=0.0, torch_threads=torch_threads,
                         queue_max=queue_max, admit_by_expected=admit_by_expected, on_batch=on_batch,
                         on_wait=on_wait, extra_models=models[1:])
        self.queue_max = queue_max
        self._slots = [_Slot(m) for m in models]
        self._waiting: deque[_Job] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._standby: ThreadPoolExecutor | None = None

    @classmethod
    def for_processes(cls, models: Sequence[ProcessModel], settings: Settings, on_batch: BatchHook | None = None,
                      on_wait: WaitHook | None = None) -> LoopBatcher:
        """The batcher the API runs for its model processes: every option from the one `Settings`."""
        s = settings
        return cls(models, batch_max=s.batch_max, queue_max=s.batch_queue_max,
                   admit_by_expected=s.batch_admit_expected, torch_threads=s.torch_threads, on_batch=on_batch,
                   on_wait=on_wait)

    # ---------------------------------------------------------------- lifecycle (on the loop)
    def start(self) -> None:
        import torch

        torch.set_num_threads(self.torch_threads)  # the standby model's calls run in this process
        self._loop = asyncio.get_running_loop()
        self._standby = ThreadPoolExecutor(1, thread_name_prefix="onerec-standby")
        self._stopping = False
        for slot in self._slots:
            conn = slot.model.connection()
            if conn is not None:
                self._watch(slot, conn)

    def stop(self, timeout: float = 5.0) -> None:
        """Fail every waiting and in-flight job with `Overloaded` and stop watching the children (the
        children themselves belong to `LoadedModel.close`). Call it on the loop (`aclose`)."""
        self._stopping = True
        while self._waiting:
            self._fail(self._waiting.popleft(), Overloaded("batcher stopped"))
        for slot in self._slots:
            self._unwatch(slot)
            jobs, slot.jobs = slot.jobs, None
            for j in jobs or []:
                self._fail(j, Overloaded("batcher stopped"))
        if self._standby is not None:
            self._standby.shutdown(wait=False, cancel_futures=True)
        self._loop = None

    async def aclose(self) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._loop is not None and not self._stopping

    def qsize(self) -> int:
        return len(self._waiting)

    # ---------------------------------------------------------------- jobs in, calls out
    def _enqueue(self, job: _Job) -> None:
        if len(self._waiting) >= self.queue_max:
            raise Overloaded(f"model queue full ({self.queue_max} jobs)")
        self._waiting.append(job)
        self._dispatch()

    def _post(self, job: _Job, result: Scored | None, exc: BaseException | None) -> None:
        _settle(job.future, result, exc)  # already on the loop

    def _dispatch(self) -> None:
        """Give every idle child the next call: the waiting jobs (up to batch_max) of the first (kind, policy)."""
        for slot in self._slots:
            if slot.jobs is not None:
                continue
            while self._waiting:
                batch = [self._waiting.popleft() for _ in range(min(self.batch_max, len(self._waiting)))]
                groups = self._triage(batch, observe_wait=False)  # the others go back: reported when sent
                if not groups:
                    continue  # all dropped or failed: look at the next ones
                (kind, policy), jobs = groups[0]
                rest = [j for _, g in groups[1:] for j in g]
                self._waiting.extendleft(reversed(rest))  # the other kinds keep their place
                self._send(slot, kind, policy, jobs)
                break
            if not self._waiting:
                return

    def _send(self, slot: _Slot, kind: Kind, policy: PolicyConfig, jobs: list[_Job]) -> None:
        slot.jobs, slot.kind, slot.call, slot.t0 = jobs, kind, self.call_of(kind, policy, jobs), time.perf_counter()
        if self.on_wait is not None:
            for j in jobs:
                self.on_wait(slot.t0 - j.enqueued)
        conn = slot.model.connection()
        if conn is None:
            self._run_on_standby(slot, "model process is starting")
            return
        self._watch(slot, conn)
        try:
            conn.send(slot.call + ({},))
        except OSError as e:
            self._lost(slot, conn, e)
            return
        deadline = max(j.deadline for j in jobs)
        # the child checks the deadline between decode steps, so a live child answers soon after it
        wait = max(0.0, deadline - time.perf_counter()) + slot.model.hang_s
        assert self._loop is not None
        slot.timer = self._loop.call_later(wait, self._hung, slot, conn, wait)

    # ---------------------------------------------------------------- answers in
    def _watch(self, slot: _Slot, conn: Connection) -> None:
        """Read `conn` when it is readable (an answer, or end of file: the child died)."""
        if slot.conn is conn:
            return
        self._unwatch(slot)
        assert self._loop is not None
        slot.conn, slot.fd = conn, conn.fileno()
        self._loop.add_reader(slot.fd, self._readable, slot, conn)

    def _unwatch(self, slot: _Slot) -> None:
        if slot.timer is not None:
            slot.timer.cancel()
            slot.timer = None
        if slot.conn is not None and self._loop is not None:
            with suppress(OSError, ValueError):  # the fd may be closed already (a child found dead elsewhere)
                self._loop.remove_reader(slot.fd)
        slot.conn, slot.fd = None, -1

    def _readable(self, slot: _Slot, conn: Connection) -> None:
        try:
            status, payload = conn.recv()
        except (EOFError, OSError) as e:
            self._lost(slot, conn, e)
            return
        if slot.jobs is None:  # nothing asked (cannot happen with one call at a time); ignore it
            log.warning("model process answered without a call")
            return
        if slot.timer is not None:
            slot.timer.cancel()
            slot.timer = None
        if status == "ok":
            self._answer(slot, payload, None)
        else:
            self._answer(slot, None, payload if isinstance(payload, BaseException) else RuntimeError(str(payload)))

    def _answer(self, slot: _Slot, out: list[Scored] | None, exc: BaseException | None) -> None:
        """The call of `slot` is over: settle its jobs and send the next call."""
        jobs, slot.jobs = slot.jobs or [], None
        self._observe(slot.kind, len(jobs), time.perf_counter() - slot.t0)
        if exc is not None or out is None:
            e = exc or RuntimeError("model returned nothing")
            self._log_failure(slot.kind, len(jobs), e)
            for j in jobs:
                self._fail(j, e)
        else:
            for j, res in zip(jobs, out, strict=True):
                self._post(j, res[: j.k], None)
        if not self._stopping:
            self._dispatch()

    # ---------------------------------------------------------------- a child that dies or hangs
    def _hung(self, slot: _Slot, conn: Connection, wait: float) -> None:
        slot.timer = None
        self._lost(slot, conn, TimeoutError(f"no answer {wait:.1f} s after the call"))

    def _lost(self, slot: _Slot, conn: Connection, why: BaseException) -> None:
        """The child behind `conn` is gone: stop watching it, have it replaced, and answer its call (if any)
        on the standby model."""
        if slot.conn is conn:
            self._unwatch(slot)
        slot.model.lost(conn, why)
        if slot.jobs is not None:
            self._run_on_standby(slot, f"model process died or hangs: {type(why).__name__}")

    def _run_on_standby(self, slot: _Slot, why: str) -> None:
        assert self._loop is not None and self._standby is not None
        name, args = slot.call
        fut = self._loop.run_in_executor(self._standby, slot.model.on_standby, name, args, why)

        def done(f: asyncio.Future[list[Scored]]) -> None:
            if slot.jobs is None:  # stopped meanwhile
                return
            if f.cancelled():
                self._answer(slot, None, Overloaded("batcher stopped"))
            elif (e := f.exception()) is not None:
                self._answer(slot, None, e)
            else:
                self._answer(slot, f.result(), None)

        fut.add_done_callback(done)

