"""The online model in a child process, so that the API's event loop and the model never share a GIL.

With the model on a thread of the API process, each request's ~5 ms of model Python (hundreds of small
tensor ops, each holding the GIL between kernels) and its ~3 ms of FastAPI, pydantic and Redis work take
turns on one interpreter lock: the process uses at most one core and requests queue behind each other.
`ProcessModel` implements the batcher's `OnlineModel` protocol by sending each batch to a child process
over a socket pair and waiting for the answer; waiting releases the GIL, so the event loop keeps parsing,
reading Redis and answering meanwhile. The child is a fresh interpreter (``python -m
online_api.model_process FD``), not a fork (torch's thread pools do not survive one) and not a
multiprocessing spawn (that re-imports the parent's ``__main__``, which breaks scripts without a main guard).

- Deadlines cross the pipe as `time.perf_counter()` values; on Linux and macOS that clock is system-wide
  (CLOCK_MONOTONIC / mach_absolute_time), so the child checks the caller's deadline between decode steps.
- The child's exceptions come back and are raised in the caller (`DeadlineExceeded` stays itself).
- A child that dies (OOM kill, segfault) or hangs (no answer `hang_s` after the call's deadline) is
  killed, and a new child starts in the background (load + warm-up, seconds); `healthy` is False until
  it is ready. Meanwhile calls run on the `standby` model in this process if one is given (the API
  gives one: answers stay personalised), else they fail at once with `ModelUnavailable` and the caller
  answers by fallback.
- The child exits when the API process closes the pipe or dies (its `recv` sees end-of-file).

Not here: batching and admission (`batching.py`), what a request does with the answer (`complete.py`).
"""

from __future__ import annotations

import gc
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from contextlib import suppress
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any

from model.policy import PolicyConfig, Prefix, Scored
from online_api.batching import ModelUnavailable, OnlineModel
from services.config import Settings

if TYPE_CHECKING:
    from model.onerec import OneRec

log = logging.getLogger(__name__)

_ROOT = str(Path(__file__).resolve().parent.parent)
_METHODS = ("complete", "decode_full")


def warm_up(onerec: OneRec, settings: Settings, policy: PolicyConfig, calls: int = 3) -> None:
    """Set the serving threads and engine (`Settings.torch_threads`, `Settings.numpy_one_user`,
    `Settings.fused_one_user`), then a few completions and full decodes with the served policy before the API
    reports ready: the first calls of a fresh process are several times slower (allocator, kernel selection; the
    fused engine's compilation, or its load from numba's disk cache) and would otherwise miss the first users'
    budgets."""
    import torch

    from model.onerec.numpy_net import one_blas_thread

    torch.set_num_threads(settings.torch_threads)  # what the model thread will use
    one_blas_thread()  # numpy's BLAS threads would spin between the one-user engine's tiny products
    onerec.numpy_one_user = settings.numpy_one_user
    onerec.fused_one_user = settings.fused_one_user
    items = [int(i) for i in onerec.sid.item_ids[:20].tolist()]
    prefixes = [(int(a), int(b), -1.0) for a, b in onerec.trie.codes[:8, :2].tolist()]
    k = settings.default_k
    with torch.inference_mode():
        for _ in range(calls):
            onerec.complete([items], [prefixes], k, policy, [set(items[:5])], None)
            onerec.decode_full([items], k, policy.beam_for(k), [set(items[:5])])


def _sendable(exc: BaseException) -> BaseException:
    """`exc` if it survives pickling, else a RuntimeError carrying its text."""
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:  # noqa: BLE001 - any pickling problem: send the text instead
        return RuntimeError(f"{type(exc).__name__}: {exc}")
    return exc


def _serve(conn: Connection, folder: str, settings: Settings, policy: PolicyConfig) -> None:
    """Child process: load and warm up the checkpoint, say ready, then answer calls until the pipe closes
    (or breaks: the API process died mid-call)."""
    import torch

    from model.onerec import OneRec

    try:
        torch.set_num_threads(settings.torch_threads)
        onerec = OneRec.load(folder)
        warm_up(onerec, settings, policy)
        gc.collect()
        gc.freeze()  # no full-collection pauses over the model and its tables (see `online_api.app.freeze_heap`)
    except Exception as e:  # noqa: BLE001 - reported to the parent, which reports it on /readyz
        with suppress(OSError):
            conn.send(("error", RuntimeError(f"{type(e).__name__}: {e}")))
        return
    try:
        conn.send(("ready", os.getpid()))
        with torch.inference_mode():
            while True:
                msg = conn.recv()
                if msg is None:
                    return
                name, args, kwargs = msg
                try:
                    if name not in _METHODS:
                        raise ValueError(f"unknown model method {name!r}")
                    reply: tuple[str, Any] = ("ok", getattr(onerec, name)(*args, **kwargs))
                except Exception as e:  # noqa: BLE001 - every error goes back to the caller
                    reply = ("error", _sendable(e))
                conn.send(reply)
    except (EOFError, OSError):  # the API process closed the pipe or died
        return


class ProcessModel:
    """`OnlineModel` whose calls run in a child process; one caller at a time (the batcher's thread)."""

    def __init__(self, folder: Path | str, settings: Settings, policy: PolicyConfig, start_timeout_s: float = 120.0,
                 restart_backoff_s: float = 1.0, hang_s: float = 2.0,
                 standby: OnlineModel | None = None) -> None:
        self.folder = str(folder)
        self.settings = settings
        self.policy = policy  # the served policy, for the child's warm-up (each call carries its own)
        # the same model loaded in this process (a `model.onerec.OneRec`), run on the caller's thread while
        # no child is up: answers stay personalised during a restart, at the old GIL-sharing speed
        self.standby = standby
        self.standby_calls = 0
        self.start_timeout_s = start_timeout_s
        self.hang_s = hang_s  # no answer this long after the call's deadline: the child hangs, replace it
        self.restart_backoff_s = restart_backoff_s
        self.restarts = 0  # children started after the first one
        self._lock = threading.Lock()  # one call on the pipe at a time
        self._conn: Connection | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._restarting = False
        self._closed = False

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Start the child and wait until it has loaded and warmed up the model; raises if it cannot."""
        self._conn, self._proc = self._spawn()

    def _spawn(self) -> tuple[Connection, subprocess.Popen[bytes]]:
        ours, theirs = socket.socketpair()
        try:
            # this checkout first on the child's path, installed or not
            path = os.pathsep.join(p for p in (_ROOT, os.environ.get("PYTHONPATH", "")) if p)
            proc = subprocess.Popen([sys.executable, "-m", "online_api.model_process", str(theirs.fileno())],
                                    pass_fds=(theirs.fileno(),), env={**os.environ, "PYTHONPATH": path})
        finally:
            theirs.close()  # the child holds its end: its recv sees EOF when this process goes
        parent = Connection(ours.detach())
        try:
            parent.send((self.folder, self.settings, self.policy))
            if not parent.poll(self.start_timeout_s):
                raise RuntimeError(f"model process did not get ready within {self.start_timeout_s:.0f} s")
            status, payload = parent.recv()
        except Exception:
            self._kill(parent, proc)
            raise
        if status != "ready":
            self._kill(parent, proc)
            raise payload if isinstance(payload, BaseException) else RuntimeError(str(payload))
        log.info("model process %d ready (%s)", proc.pid, self.folder)
        return parent, proc

    @staticmethod
    def _kill(conn: Connection | None, proc: subprocess.Popen[bytes] | None) -> None:
        if conn is not None:
            conn.close()
        if proc is not None:
            proc.kill()
            proc.wait(5)

    def close(self) -> None:
        """Stop the child (it exits when the pipe closes); no restart after this."""
        self._closed = True
        with self._lock:
            conn, proc, self._conn, self._proc = self._conn, self._proc, None, None
        if conn is not None:
            try:
                conn.send(None)
            except OSError:
                pass
            conn.close()
        if proc is not None:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

    @property
    def healthy(self) -> bool:
        """True while a child is up and answering (False while one restarts, and after `close`). A child
        found dead here is replaced at once: an idle API (say, one a load balancer took out of rotation
        because /readyz said 503) gets no call that would notice it otherwise."""
        proc = self._proc
        if proc is not None and proc.poll() is not None and self._lock.acquire(blocking=False):
            try:
                if self._proc is proc:  # not replaced meanwhile
                    self._died(RuntimeError(f"exited with status {proc.returncode}"))
            finally:
                self._lock.release()
        return self._conn is not None and self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else int(self._proc.pid)

    def _died(self, why: BaseException) -> None:
        """Drop the dead child and start a new one in the background (called with the lock held)."""
        log.error("model process %s died (%s); restarting it", self.pid, why)
        self._kill(self._conn, self._proc)
        self._conn, self._proc = None, None
        if not self._restarting and not self._closed:
            self._restarting = True
            threading.Thread(target=self._restart, name="onerec-model-restart", daemon=True).start()

    def _restart(self) -> None:
        while not self._closed:
            try:
                conn, proc = self._spawn()
            except Exception:  # noqa: BLE001 - logged; tried again after the backoff
                log.exception("model process restart failed")
                time.sleep(self.restart_backoff_s)
                continue
            with self._lock:
                if self._closed:
                    self._kill(conn, proc)
                else:
                    self._conn, self._proc = conn, proc
                    self.restarts += 1
            break
        self._restarting = False

    # ---------------------------------------------------------------- driven by an event loop (`loop_batcher`)
    def connection(self) -> Connection | None:
        """The pipe to the live child (None while one starts): an event loop sends a call on it and reads the
        answer when it is readable (`online_api.loop_batcher`), instead of a thread blocking in `_call`."""
        return self._conn

    def lost(self, conn: Connection, why: BaseException) -> None:
        """The child behind `conn` died or hangs: kill it and start a new one in the background (nothing
        happens if `conn` was already replaced)."""
        with self._lock:
            if self._conn is conn:
                self._died(why)

    def on_standby(self, name: str, args: tuple[Any, ...], why: str) -> list[Scored]:
        """Run one call on the standby model in this process (or raise `ModelUnavailable`)."""
        if name not in _METHODS:
            raise ValueError(f"unknown model method {name!r}")
        return self._on_standby(name, args, {}, why)

    # ---------------------------------------------------------------- OnlineModel
    def _call(self, name: str, deadline: float | None, *args: Any, **kwargs: Any) -> list[Scored]:
        with self._lock:
            if self._conn is None:
                return self._on_standby(name, args, kwargs, "model process is starting")
            # the child checks the deadline between decode steps, so a live child answers soon after it
            wait = max(0.0, deadline - time.perf_counter() if deadline is not None else 0.0) + self.hang_s
            try:
                self._conn.send((name, args, kwargs))
                if not self._conn.poll(wait):
                    raise TimeoutError(f"no answer {wait:.1f} s after the call")
                status, payload = self._conn.recv()
            except (EOFError, OSError) as e:  # TimeoutError is an OSError
                self._died(e)
                return self._on_standby(name, args, kwargs, f"model process died or hangs: {type(e).__name__}")
        if status != "ok":
            raise payload if isinstance(payload, BaseException) else RuntimeError(str(payload))
        return payload  # type: ignore[no-any-return]

    def _on_standby(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], why: str) -> list[Scored]:
        """No child to ask: run the call on the standby model here, or fail with `ModelUnavailable`."""
        if self.standby is None:
            raise ModelUnavailable(why)
        import torch

        self.standby_calls += 1
        with torch.inference_mode():
            return getattr(self.standby, name)(*args, **kwargs)  # type: ignore[no-any-return]  # complete / decode_full

    def decode_full(self, histories: Sequence[Sequence[int]], k: int, beam: int,
                    exclude: Sequence[set[int]] | None = None, deadline: float | None = None) -> list[Scored]:
        return self._call("decode_full", deadline, histories, k, beam, exclude, deadline)

    def complete(self, histories: Sequence[Sequence[int]], prefixes: Sequence[Sequence[Prefix]], k: int,
                 policy: PolicyConfig, exclude: Sequence[set[int]] | None = None,
                 deadline: float | None = None) -> list[Scored]:
        return self._call("complete", deadline, histories, prefixes, k, policy, exclude, deadline)


def main(argv: list[str] | None = None) -> None:
    """Child entry point: ``python -m online_api.model_process FD`` (FD: its end of the socket pair)."""
    args = sys.argv[1:] if argv is None else argv
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the API process decides
    logging.basicConfig(level=logging.WARNING)
    conn = Connection(int(args[0]))
    try:
        folder, settings, policy = conn.recv()
    except (EOFError, OSError):
        return
    _serve(conn, folder, settings, policy)


if __name__ == "__main__":
    main()
