"""Results files: `docs/results/<name>.json` (the one results format) and their lines in docs/RESULTS.md.

The one owner of the results format. Every writer passes measured metrics; the command, date and
machine are filled in here. The generated part of RESULTS.md (between the markers) is rebuilt from
all JSON files on each write, so it never drifts from them.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shlex
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "docs" / "results"
RESULTS_MD = ROOT / "docs" / "RESULTS.md"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def machine() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cores": os.cpu_count() or 0, "cpu": cpu}


def current_command() -> str:
    """The command line of this process as `python -m module args` when run as a module."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    head = ["python", "-m", spec.name] if spec is not None and spec.name else ["python", sys.argv[0]]
    return " ".join(shlex.quote(a) for a in head + sys.argv[1:])


def write_result(name: str, metrics: dict[str, Any], command: str | None = None, note: str = "",
                 results_dir: Path = RESULTS_DIR, results_md: Path = RESULTS_MD) -> Path:
    """Write `<results_dir>/<name>.json` and refresh the generated table in `results_md`."""
    results_dir.mkdir(parents=True, exist_ok=True)
    doc = {
        "name": name,
        "command": command or current_command(),
        "date": dt.date.today().isoformat(),
        "machine": machine(),
        "metrics": metrics,
    }
    if note:
        doc["note"] = note
    path = results_dir / f"{name}.json"
    path.write_text(json.dumps(doc, indent=2) + "\n")
    refresh_markdown(results_dir, results_md)
    return path


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_fmt(x)}" for k, x in v.items()) + "}"
    return str(v)


def refresh_markdown(results_dir: Path = RESULTS_DIR, results_md: Path = RESULTS_MD) -> None:
    """Rebuild the generated section of RESULTS.md from every results file."""
    lines = []
    for f in sorted(results_dir.glob("*.json")):
        d = json.loads(f.read_text())
        m = ", ".join(f"{k}={_fmt(v)}" for k, v in d["metrics"].items())
        mach = f"{d['machine'].get('cores')} cores, {d['machine'].get('cpu')}"
        lines.append(f"- **{d['name']}** ({d['date']}, {mach}): {m}  \n  `{d['command']}`")
    block = BEGIN + "\n" + "\n".join(lines) + "\n" + END
    text = results_md.read_text() if results_md.exists() else "# Results\n\n" + BEGIN + "\n" + END + "\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        text = head + block + tail
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    results_md.parent.mkdir(parents=True, exist_ok=True)
    results_md.write_text(text)
