"""Micro-batcher: runs the online model on one dedicated thread, batching concurrent requests.

The model behind it is either the `OneRec` itself (torch on this thread) or a
`online_api.model_process.ProcessModel` (this thread then only waits on the model's child process).

The event loop never runs torch: `MicroBatcher.submit` puts a job on a bounded queue and awaits a
future with the job's deadline. The model thread takes the first job and everything else already
queued; when the previous batch held several jobs it also waits at most ``wait_ms`` for more (up to
``batch_max``). Jobs whose caller gave up or whose deadline passed are dropped before the model runs;
the rest are grouped by kind (``full`` = `decode_full`, ``complete`` = think-ahead completion) and
policy (the `model.policy.PolicyConfig` each job carries: the API builds one, so in practice one group per
kind) and answered with one model call per group; the batcher keeps no policy options of its own. A job
whose remaining budget is below the model time the batcher expects (a running average per kind, at least
one measured batch) is failed at once with `BelowExpected`: under overload the model then spends no time on
answers that would arrive after their caller gave up, and those callers fall back at once instead of at their
deadline. A kind's job with the most budget left always runs, so the estimate keeps following the model
after a slow spell.
Torch threads are set explicitly once, on start. This module knows nothing about HTTP or Redis.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Literal, Protocol

from model.onerec import DeadlineExceeded
from model.policy import PolicyConfig, Prefix, Scored
from services.config import Settings

log = logging.getLogger(__name__)

Kind = Literal["full", "complete"]


class OnlineModel(Protocol):
    """What the batcher needs from `model.onerec.OneRec`."""

    def decode_full(self, histories: Sequence[Sequence[int]], k: int, beam: int,
                    exclude: Sequence[set[int]] | None = None, deadline: float | None = None) -> list[Scored]: ...

    def complete(self, histories: Sequence[Sequence[int]], prefixes: Sequence[Sequence[Prefix]], k: int,
                 policy: PolicyConfig, exclude: Sequence[set[int]] | None = None,
                 deadline: float | None = None) -> list[Scored]: ...


class BelowExpected(DeadlineExceeded):
    """The job's budget left was below the model time of recent batches: failed before the model ran."""


class ModelUnavailable(RuntimeError):
    """The model cannot run now (its child process died or is restarting); the caller answers without it."""


class Overloaded(RuntimeError):
    """The model queue is full (or the batcher is stopped); the caller answers without the model."""


@dataclass
class _Job:
    kind: Kind
    history: list[int]
    prefixes: list[Prefix] | None
    policy: PolicyConfig
    k: int
    exclude: set[int]
    deadline: float  # time.perf_counter() seconds
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Scored]
    enqueued: float = field(default_factory=time.perf_counter)


BatchHook = Callable[[Kind, int, float], None]  # (kind, size, model seconds)
Group = tuple[Kind, PolicyConfig]  # jobs answered by one model call
WaitHook = Callable[[float], None]  # queue wait in seconds


def _settle(fut: asyncio.Future[Scored], result: Scored | None, exc: BaseException | None) -> None:
    """Runs on the event loop: resolve `fut` unless its caller already gave up."""
    if fut.done():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result if result is not None else [])


class MicroBatcher:
    """One model thread serving every request of the process; with `extra_models` (model processes: each
    its own child, so they can run at once) one more thread per extra model, all taking jobs from the
    same queue."""

    def __init__(self, model: OnlineModel, batch_max: int, wait_ms: float, torch_threads: int,
                 queue_max: int, admit_by_expected: bool, on_batch: BatchHook | None = None,
                 on_wait: WaitHook | None = None, extra_models: Sequence[OnlineModel] = ()) -> None:
        if batch_max < 1 or queue_max < 1 or torch_threads < 1 or wait_ms < 0:
            raise ValueError(f"bad batcher settings: batch_max={batch_max} queue_max={queue_max} "
                             f"torch_threads={torch_threads} wait_ms={wait_ms}")
        self.models = [model, *extra_models]
        self.batch_max = batch_max
        self.wait_s = wait_ms / 1000.0
        self.torch_threads = torch_threads
        self.on_batch = on_batch
        self.on_wait = on_wait
        self.admit_by_expected = admit_by_expected
        self.expected_s: dict[Kind, float] = {}  # running average model seconds per batch, by kind
        self.skipped = 0  # jobs failed before the model because their budget was below the expected time
        self._q: queue.Queue[_Job | None] = queue.Queue(maxsize=queue_max)
        self._threads: list[threading.Thread] = []
        self._stopping = False
        self._last_size = 1

    @classmethod
    def from_settings(cls, model: OnlineModel, settings: Settings, on_batch: BatchHook | None = None,
                      on_wait: WaitHook | None = None, extra_models: Sequence[OnlineModel] = ()) -> MicroBatcher:
        """The batcher the API runs: every option from the one `Settings`."""
        s = settings
        return cls(model, batch_max=s.batch_max, wait_ms=s.batch_wait_ms,
                   torch_threads=s.torch_threads, queue_max=s.batch_queue_max, admit_by_expected=s.batch_admit_expected,
                   on_batch=on_batch, on_wait=on_wait, extra_models=extra_models)

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> None:
        import torch

        # process-wide; the API process runs torch only on this thread
        torch.set_num_threads(self.torch_threads)
        self._stopping = False
        self._threads = [threading.Thread(target=self._run, args=(m,), name="onerec-model" + (f"-{i}" if i else ""),
                                          daemon=True) for i, m in enumerate(self.models)]
        for t in self._threads:
            t.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop after the batches in progress; queued jobs are failed with `Overloaded`."""
        self._stopping = True
        if not self._threads:
            return
        for _ in self._threads:  # one stop mark per thread
            try:
                self._q.put(None, timeout=timeout)
            except queue.Full:
                pass
        for t in self._threads:
            t.join(timeout)
        self._threads = []
        while True:
            try:
                job = self._q.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                self._fail(job, Overloaded("batcher stopped"))

    @property
    def running(self) -> bool:
        return any(t.is_alive() for t in self._threads) and not self._stopping

    def qsize(self) -> int:
        return self._q.qsize()

    # ---------------------------------------------------------------- caller side (event loop)
    async def submit(self, kind: Kind, history: list[int], k: int, deadline: float, policy: PolicyConfig,
                     prefixes: list[Prefix] | None = None, exclude: set[int] | None = None) -> Scored:
        """Run one user through the model with `policy` (beam, completion weights); raises
        `DeadlineExceeded`, `Overloaded` or the model's error."""
        if kind == "complete" and not prefixes:
            raise ValueError("prefixes: required (non-empty) for kind='complete'")
        if not self.running:
            raise Overloaded("model thread not running")
        remaining = deadline - time.perf_counter()
        if remaining <= 0:
            raise DeadlineExceeded("no budget left for the model")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Scored] = loop.create_future()
        self._enqueue(_Job(kind, history, prefixes, policy, k, exclude or set(), deadline, loop, fut))
        try:
            return await asyncio.wait_for(fut, timeout=remaining)
        except TimeoutError:
            raise DeadlineExceeded("model answer did not arrive within the budget") from None

    def _enqueue(self, job: _Job) -> None:
        try:
            self._q.put_nowait(job)
        except queue.Full:
            raise Overloaded(f"model queue full ({self._q.maxsize} jobs)") from None

    async def aclose(self) -> None:
        """`stop` from the event loop (the lifespan's shutdown)."""
        await asyncio.to_thread(self.stop)

    # ---------------------------------------------------------------- model thread
    @staticmethod
    def _inference() -> AbstractContextManager[object]:
        import torch

        return torch.inference_mode()  # cheaper than the model's own no_grad (no version counters)

    def _fail(self, job: _Job, exc: BaseException) -> None:
        self._post(job, None, exc)

    def _post(self, job: _Job, result: Scored | None, exc: BaseException | None) -> None:
        try:
            job.loop.call_soon_threadsafe(_settle, job.future, result, exc)
        except RuntimeError:  # loop closed during shutdown
            pass

    def _collect(self, first: _Job) -> tuple[list[_Job], bool]:
        """First job + everything queued + what arrives within wait_s, up to batch_max. (batch, stop)."""
        batch, stop = [first], False
        # wait for company only when requests have been overlapping: alone, a job must not idle
        end = time.perf_counter() + (self.wait_s if self._last_size > 1 else 0.0)
        while len(batch) < self.batch_max:
            try:
                job = self._q.get_nowait()
            except queue.Empty:
                remaining = end - time.perf_counter()
                if remaining <= 0:
                    break
                try:
                    job = self._q.get(timeout=remaining)
                except queue.Empty:
                    break
            if job is None:
                stop = True
                break
            batch.append(job)
        return batch, stop

    def _run(self, model: OnlineModel) -> None:
        while True:
            first = self._q.get()
            if first is None:
                return
            batch, stop = self._collect(first)
            self._last_size = len(batch)
            for (kind, policy), group in self._triage(batch):
                self._run_group(model, kind, policy, group)
            if stop or self._stopping:
                return

    def _triage(self, batch: list[_Job], observe_wait: bool = True) -> list[tuple[Group, list[_Job]]]:
        """Drop the jobs whose caller gave up, fail the expired ones and those below the expected model time;
        group the rest by (kind, policy), "complete" jobs (think-ahead answers) first. `observe_wait`: report
        each kept job's queue wait now (a caller that runs only some groups reports them itself)."""
        now = time.perf_counter()
        live: list[_Job] = []
        for job in batch:
            if job.future.done():  # caller timed out or was cancelled
                continue
            if job.deadline <= now:
                self._fail(job, DeadlineExceeded("deadline passed while queued"))
                continue
            if observe_wait and self.on_wait is not None:
                self.on_wait(now - job.enqueued)
            live.append(job)
        if self.admit_by_expected:
            live = self._admit(live, now)
        groups: dict[Group, list[_Job]] = {}
        for job in live:
            groups.setdefault((job.kind, job.policy), []).append(job)
        return sorted(groups.items(), key=lambda kv: kv[0][0] != "complete")

    def _admit(self, jobs: list[_Job], now: float) -> list[_Job]:
        """Fail the jobs whose budget left is below the expected model time of their kind. If that would
        leave a kind without any job, its job with the most budget left runs anyway: the estimate only
        moves when the model runs, so a kind that never ran again could never be admitted again."""
        keep: list[_Job] = []
        kinds: tuple[Kind, ...] = ("complete", "full")
        for kind in kinds:
            group = [j for j in jobs if j.kind == kind]
            expected = self.expected_s.get(kind, 0.0)
            ok = [j for j in group if j.deadline - now >= expected]
            if group and not ok:
                ok = [max(group, key=lambda j: j.deadline)]
            admitted = {id(j) for j in ok}
            for j in group:
                if id(j) not in admitted:
                    self.skipped += 1
                    self._fail(j, BelowExpected(f"budget left is below the expected model time ({expected:.4f} s)"))
            keep += ok
        return keep

    @staticmethod
    def call_of(kind: Kind, policy: PolicyConfig, jobs: Sequence[_Job]) -> tuple[str, tuple[object, ...]]:
        """The one model call (method name, arguments) that answers `jobs` (one kind, one policy)."""
        k = max(j.k for j in jobs)
        deadline = max(j.deadline for j in jobs)  # each caller enforces its own; one late job must not fail all
        histories = [j.history for j in jobs]
        exclude = [j.exclude for j in jobs]
        if kind == "complete":
            return "complete", (histories, [j.prefixes or [] for j in jobs], k, policy, exclude, deadline)
        return "decode_full", (histories, k, policy.beam_for(k), exclude, deadline)

    def _observe(self, kind: Kind, size: int, dt: float) -> None:
        """A batch of `kind` took `dt` model seconds: update the expected time and report it."""
        old = self.expected_s.get(kind)  # one stall (GC, a busy host) moves it by at most 4x old / 5
        self.expected_s[kind] = dt if old is None else 0.8 * old + 0.2 * min(dt, 4 * old)
        if self.on_batch is not None:
            self.on_batch(kind, size, dt)

    @staticmethod
    def _log_failure(kind: Kind, size: int, e: BaseException) -> None:
        if isinstance(e, ModelUnavailable):
            log.warning("model %s unavailable for a batch of %d: %s", kind, size, e)
        elif not isinstance(e, DeadlineExceeded):
            log.error("model %s failed on a batch of %d", kind, size, exc_info=e)

    def _run_group(self, model: OnlineModel, kind: Kind, policy: PolicyConfig, jobs: list[_Job]) -> None:
        name, args = self.call_of(kind, policy, jobs)
        t0 = time.perf_counter()
        try:
            with self._inference():
                out: list[Scored] = getattr(model, name)(*args)
        except Exception as e:  # noqa: BLE001 - every job gets the error; callers fall back
            self._log_failure(kind, len(jobs), e)
            for j in jobs:
                self._fail(j, e)
            return
        finally:
            self._observe(kind, len(jobs), time.perf_counter() - t0)
        for j, res in zip(jobs, out, strict=True):
            self._post(j, res[: j.k], None)
