"""The model called on the event loop itself: no thread, no child process, no wake-up between a request and its
answer (``ONEREC_MODEL_HANDOFF=inline``).

With the fused one-user engine (`model.onerec.fused_user`) a completion costs a few tenths of a millisecond of
CPU, about what handing it to a model thread or a child process costs (docs/PROFILE.md: the socket write that
wakes a sleeping child, the child's read and write, the loop's wake-up). Called inline, an answer pays none of
that; the loop is blocked for the completion's time, the same as any synchronous handler. What it gives up, and
why it is not the default (measured: 2.48 vs 2.67 ms of CPU per answer at 100/s, lower in two pairs of four;
docs/PROFILE.md): a model that crashes the process (a bug in compiled code) takes the API down with it
(the child-process hand-offs survive that: the child is replaced while the standby answers), and there is no
batching (one call per request; the one-user engine gains nothing from company).

`InlineBatcher` keeps `MicroBatcher`'s interface and rules that still apply: jobs past their deadline fail before
the model runs, `complete` needs prefixes, batch hooks see every call (size 1).
"""

from __future__ import annotations

import time

from model.onerec import DeadlineExceeded
from model.policy import PolicyConfig, Prefix, Scored
from online_api.batching import Kind, MicroBatcher, Overloaded, _Job


class InlineBatcher(MicroBatcher):
    """`MicroBatcher`'s interface; `submit` runs the model on the caller's thread (the event loop)."""

    _started = False

    def start(self) -> None:
        import torch

        torch.set_num_threads(self.torch_threads)
        self._stopping = False
        self._started = True

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping = True

    @property
    def running(self) -> bool:
        return self._started and not self._stopping

    def qsize(self) -> int:
        return 0

    async def submit(self, kind: Kind, history: list[int], k: int, deadline: float, policy: PolicyConfig,
                     prefixes: list[Prefix] | None = None, exclude: set[int] | None = None) -> Scored:
        """Run one user through the model now; raises `DeadlineExceeded`, `Overloaded` or the model's error."""
        if kind == "complete" and not prefixes:
            raise ValueError("prefixes: required (non-empty) for kind='complete'")
        if not self.running:
            raise Overloaded("model not running")
        if deadline - time.perf_counter() <= 0:
            raise DeadlineExceeded("no budget left for the model")
        job = _Job(kind, history, prefixes, policy, k, exclude or set(), deadline, None, None)  # type: ignore[arg-type]
        name, args = self.call_of(kind, policy, [job])
        t0 = time.perf_counter()
        try:
            with self._inference():
                out: list[Scored] = getattr(self.models[0], name)(*args)
        except Exception as e:
            self._log_failure(kind, 1, e)
            raise
        finally:
            self._observe(kind, 1, time.perf_counter() - t0)
        return out[0][:k]

    async def aclose(self) -> None:
        self.stop()
