"""Redis key names under one namespace (`ThinkKeys`, the one owner of every key of the store), the live-version
pointer's validation, and how to read Redis's replies: a key of another Redis type (``WRONGTYPE``) and a
write Redis refused while it still answers (`write_refusal`).

Not here: value encoding (`codec.py`), any Redis command (`writer.py`, `reader.py`).
"""

from __future__ import annotations

import re
from typing import Any, cast

import redis

from services.store.codec import _is_int

_NS_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")  # no braces (hash tags) and no glob characters
_VERSION_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")  # no ':' so `ns:think:{version}:*` matches one version
_RESERVED = {"current", "previous", "versions"}
# error prefixes of writes Redis refused while it still answers reads
_REFUSALS = {"OOM": "oom", "READONLY": "readonly", "MISCONF": "misconf", "NOREPLICAS": "noreplicas"}


def _wrong_type(x: object) -> bool:
    """A command's reply said the key holds another Redis type (someone else's value under our key)."""
    return isinstance(x, redis.ResponseError) and "WRONGTYPE" in str(x)


def _reply(x: Any) -> Any:
    """One reply of a pipeline run with ``raise_on_error=False``: WRONGTYPE passes as a value, others raise."""
    if isinstance(x, Exception) and not _wrong_type(x):
        raise x
    return x


def _text(x: bytes | str | None) -> str | None:
    return x.decode() if isinstance(x, bytes | bytearray) else x


def _check_user(user: object) -> int:
    if not _is_int(user):
        raise ValueError(f"user: expected an int id, got {user!r}")
    return cast(int, user)


class ThinkKeys:
    """Key names under one namespace (see the module docstring for the table)."""

    def __init__(self, ns: str) -> None:
        if not isinstance(ns, str) or not _NS_RE.match(ns):
            raise ValueError(f"ns: expected 1-64 chars of [A-Za-z0-9_.:-], got {ns!r}")
        self.ns = ns
        self.current = f"{ns}:think:current"
        self.previous = f"{ns}:think:previous"
        self.versions = f"{ns}:think:versions"
        self.stale = f"{ns}:stale"

    @staticmethod
    def check_version(version: object) -> str:
        if not isinstance(version, str) or not _VERSION_RE.fullmatch(version) or version in _RESERVED:
            raise ValueError(
                f"version: expected 1-64 chars of [A-Za-z0-9_.-] (not {sorted(_RESERVED)}), got {version!r}"
            )
        return version

    def think(self, version: str, user: int) -> str:
        return f"{self.ns}:think:{self.check_version(version)}:{{{_check_user(user)}}}"

    def history(self, user: int) -> str:
        return f"{self.ns}:history:{{{_check_user(user)}}}"

    def appended(self, user: int) -> str:
        return f"{self.ns}:appended:{{{_check_user(user)}}}"

    def meta(self, version: str) -> str:
        return f"{self.ns}:think:{self.check_version(version)}:meta"

    def done(self, version: str, shard: int) -> str:
        if not _is_int(shard) or shard < 0:
            raise ValueError(f"shard: expected a non-negative int, got {shard!r}")
        return f"{self.ns}:think:{self.check_version(version)}:done:{shard}"

    def entry_pattern(self, version: str) -> str:
        """SCAN MATCH pattern for one version's user entries (not its meta/done keys)."""
        return f"{self.ns}:think:{self.check_version(version)}:{{*}}"

    def done_pattern(self, version: str) -> str:
        """SCAN MATCH pattern for one version's done-chunk sets."""
        return f"{self.ns}:think:{self.check_version(version)}:done:*"

    def version_pattern(self, version: str) -> str:
        """SCAN MATCH pattern for every key of one version."""
        return f"{self.ns}:think:{self.check_version(version)}:*"


def check_version_pointer(raw: object) -> tuple[str | None, str | None]:
    """(version, None) for a valid live-version pointer value or a missing one (None, None); (None, why)
    for anything else."""
    if raw is None:
        return None, None
    if _wrong_type(raw):
        return None, "the live-version key holds another Redis type"
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes | bytearray) else raw
    except UnicodeDecodeError:
        return None, "the live-version pointer is not UTF-8"
    try:
        return ThinkKeys.check_version(text), None
    except ValueError:
        shown = text[:40].encode("utf-8", "backslashreplace").decode() if isinstance(text, str) else "?"
        return None, f"the live-version pointer {shown!r} is not a version name"


def write_refusal(e: BaseException) -> str | None:
    """`oom`, `readonly`, `misconf` or `noreplicas` when Redis answered and refused a write; None for
    anything else (unreachable, timeout, a bug). A refusal says nothing about whether reads work."""
    if isinstance(e, redis.exceptions.OutOfMemoryError):
        return "oom"
    if isinstance(e, redis.exceptions.ReadOnlyError):
        return "readonly"
    if not isinstance(e, redis.ResponseError):
        return None
    msg = str(e)
    for prefix, kind in _REFUSALS.items():
        # a refusal inside a script arrives wrapped ("... script: ...: OOM command not allowed ...")
        if msg.startswith(prefix) or f" {prefix} " in msg or f": {prefix}" in msg or f"-{prefix}" in msg:
            return kind
    return None
