"""Operator-facing logging of the offline worker: vendor noise filtered, our own messages untouched.

vLLM, transformers and torch log a lot an operator cannot act on: start-up INFO lines, and the same
warning once per engine, model load or chunk (e.g. one dtype line per config load). `quiet_vendor_logs`
keeps what matters: vendor records at WARNING and above, each distinct message once (digits ignored when
comparing), a count of what was suppressed (`RepeatFilter.summary`), and no vendor Future/Deprecation
warnings. ``--verbose`` keeps everything. Not a logging framework: one filter on the root handlers.
"""

from __future__ import annotations

import logging
import os
import re
import warnings

VENDORS = ("vllm", "transformers", "torch", "triton", "huggingface_hub", "safetensors")
_DIGITS = re.compile(r"\d+")


def is_vendor(name: str) -> bool:
    return any(name == v or name.startswith(v + ".") for v in VENDORS)


class RepeatFilter(logging.Filter):
    """Drops vendor records below `level` and every repeat of a vendor message already shown."""

    def __init__(self, level: int = logging.WARNING) -> None:
        super().__init__()
        self.level = level
        self.seen: set[tuple[str, str]] = set()
        self.suppressed = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if not is_vendor(record.name):
            return True
        key = (record.name, _DIGITS.sub("#", record.getMessage()))
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
