"""Results files: `<name>.json` in the one results format, and their generated lines in a RESULTS.md.

The one owner of the results format and of where results go. Every writer passes measured metrics; the
command, date, machine and dataset label are filled in here. Results are kept per dataset:
- the bundled Beauty: ``docs/results/<name>.json``, listed in ``docs/RESULTS.md`` between
  ``results:begin``/``results:end``;
- the other bundled dataset (``data/industrial``): ``docs/results/<dataset>/<name>.json``, a section of its own
  in ``docs/RESULTS.md`` (``results:<dataset>:begin``/``end``);
- any other dataset (your own data): the dataset's artifacts folder, ``<artifacts_dir>/results/<name>.json`` and
  ``<artifacts_dir>/results/RESULTS.md``, so a run on your data never edits the tracked files (``git status``
  stays clean); setting ``ONEREC_RESULTS_DIR`` asks for the tracked layout (``<dir>/<dataset>/``) instead.
The dataset is the selected one (`Settings.dataset`, from ``ONEREC_DATA_DIR``) unless a command's own
``--data-dir`` names another. Each generated part is rebuilt from its JSON files on every write.
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
DEFAULT_DATASET = "beauty"  # the bundled dataset: its results sit at the top of the results folder


def markers(dataset: str) -> tuple[str, str]:
    """Begin/end markers of a dataset's generated section in RESULTS.md."""
    if dataset == DEFAULT_DATASET:
        return BEGIN, END
    return f"<!-- results:{dataset}:begin -->", f"<!-- results:{dataset}:end -->"


def results_location(dataset: str | None = None) -> tuple[Path, Path, str]:
    """(folder of the dataset's results files, its RESULTS.md, dataset label): see the module docstring."""
    from services.config import BUNDLED_DATASETS, get_settings

    st = get_settings()
    dataset = dataset or st.dataset
    root = st.results_dir
    if dataset == DEFAULT_DATASET:
        return root, root.parent / "RESULTS.md", dataset
    bundled = st.bundled if dataset == st.dataset else dataset in BUNDLED_DATASETS
    if bundled or "results_dir" in st.model_fields_set:
        return root / dataset, root.parent / "RESULTS.md", dataset
    folder = (st.artifacts_dir if dataset == st.dataset else st.artifacts_root / dataset) / "results"
    return folder, folder / "RESULTS.md", dataset


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
    name = spec.name.removesuffix(".__main__") if spec is not None and spec.name else None
    head = ["python", "-m", name] if name else ["python", sys.argv[0]]
    return " ".join(shlex.quote(a) for a in head + sys.argv[1:])


def dataset_env(dataset: str) -> str:
    """``ONEREC_DATA_DIR=... `` in front of a command run on another dataset than Beauty (else "")."""
    from services.config import get_settings

    data_dir = get_settings().data_dir.resolve()
    if dataset == DEFAULT_DATASET or data_dir.name != dataset:
        return ""
    shown = data_dir.relative_to(ROOT) if data_dir.is_relative_to(ROOT) else data_dir
    return f"ONEREC_DATA_DIR={shlex.quote(str(shown))} "


def write_result(name: str, metrics: dict[str, Any], command: str | None = None, note: str = "",
                 dataset: str | None = None, results_dir: Path | None = None, results_md: Path | None = None) -> Path:
    """Write `<name>.json` into the dataset's results folder and refresh its generated section of RESULTS.md.

    `dataset`: the label (default: the selected dataset); `results_dir` / `results_md` override the folder
    and the markdown file (tests)."""
    folder, md, dataset = results_location(dataset)
    results_dir = results_dir or folder
    results_md = results_md or md
    results_dir.mkdir(parents=True, exist_ok=True)
    doc = {
        "name": name,
        "dataset": dataset,
        "command": command or dataset_env(dataset) + current_command(),
        "date": dt.date.today().isoformat(),
        "machine": machine(),
        "metrics": metrics,
    }
    if note:
        doc["note"] = note
    path = results_dir / f"{name}.json"
    path.write_text(json.dumps(doc, indent=2) + "\n")
    refresh_markdown(results_dir, results_md, dataset)
    return path


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_fmt(x)}" for k, x in v.items()) + "}"
    return str(v)


def refresh_markdown(results_dir: Path = RESULTS_DIR, results_md: Path = RESULTS_MD,
                     dataset: str = DEFAULT_DATASET) -> None:
    """Rebuild the dataset's generated section of RESULTS.md from every results file of its folder (a new
    dataset's section is appended with a heading)."""
    begin, end = markers(dataset)
    lines = []
    for f in sorted(results_dir.glob("*.json")):
        d = json.loads(f.read_text())
        m = ", ".join(f"{k}={_fmt(v)}" for k, v in d["metrics"].items())
        mach = f"{d['machine'].get('cores')} cores, {d['machine'].get('cpu')}"
        lines.append(f"- **{d['name']}** ({d['date']}, {mach}): {m}  \n  `{d['command']}`")
    block = begin + "\n" + "\n".join(lines) + "\n" + end
    text = results_md.read_text() if results_md.exists() else "# Results\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        tail = rest.split(end, 1)[1]
        text = head + block + tail
    else:
        heading = "" if dataset == DEFAULT_DATASET else f"## Results files: dataset `{dataset}` (generated)\n\n"
        text = text.rstrip() + "\n\n" + heading + block + "\n"
    results_md.parent.mkdir(parents=True, exist_ok=True)
    results_md.write_text(text)
