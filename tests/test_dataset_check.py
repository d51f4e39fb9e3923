"""Bad data fails fast and says what to do: one line per problem (file, line, what to do), exit status 2, no
traceback, before any model loads (under 5 s, and before torch is even imported), from `python -m
services.catalog check` and from every entry point that reads a dataset (the demo, semantic IDs, OneRec
training, the offline refresh, the API)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.catalog import check_dataset
from services.config import ROOT

GOOD_ITEMS = "item_id\ttitle\n1\tred pen\n2\tblue pen\n3\tstapler\n4\tpaper\n"
GOOD_SEQS = "1 1 2 3\n2 2 3 4\n3 4 1 2 3\n"

# bad-data class -> (items.tsv, sequences.txt, file named, line named, words of the message, words of the advice)
CASES: dict[str, tuple[str, str, str, int, str, str]] = {
    "header": ("id\tname\n1\tpen\n", GOOD_SEQS, "items.tsv", 1, "header must contain item_id and title",
               "first line a tab-separated header"),
    "fields": (GOOD_ITEMS + "5\tpen\textra\n", GOOD_SEQS, "items.tsv", 6, "expected 2 tab-separated fields, got 3",
               "may not contain a tab"),
    "item id": (GOOD_ITEMS + "x5\tpen\n", GOOD_SEQS, "items.tsv", 6, "item_id is not an integer: 'x5'",
                "item ids are integers"),
    "duplicate item": (GOOD_ITEMS + "2\tpen again\n", GOOD_SEQS, "items.tsv", 6, "duplicate item_id 2",
                       "one line per item"),
    "blank line": (GOOD_ITEMS, "1 1 2 3\n\n2 2 3 4\n", "sequences.txt", 2, "blank line", "delete it"),
    "not an integer": (GOOD_ITEMS, "1 1 2 3\n2 2 three 4\n", "sequences.txt", 2, "not an integer: 'three'",
                       "integers separated by spaces"),
    "duplicate user": (GOOD_ITEMS, GOOD_SEQS + "2 1 1 1\n", "sequences.txt", 4, "duplicate user_id 2",
                       "all of a user's items on one line"),
    "short user": (GOOD_ITEMS, GOOD_SEQS + "9 1 2\n", "sequences.txt", 4, "user 9 has 2 items, need >= 3",
                   "drop the user or add items"),
    "unknown item": (GOOD_ITEMS, GOOD_SEQS + "9 1 2 77\n", "sequences.txt", 4, "unknown item_id 77",
                     "add it to items.tsv"),
}


def make(folder: Path, items: str | None, seqs: str | None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if items is not None:
        (folder / "items.tsv").write_text(items)
    if seqs is not None:
        (folder / "sequences.txt").write_text(seqs)
    return folder


def run(args: list[str], data: Path, tmp: Path) -> tuple[subprocess.CompletedProcess[str], float]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ONEREC_DATA_DIR": str(data),
           "ONEREC_ARTIFACTS_ROOT": str(tmp / "artifacts"), "ONEREC_REDIS_URL": "redis://127.0.0.1:1/0"}
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, *args], cwd=tmp, env=env, capture_output=True, text=True, timeout=60)
    return out, time.perf_counter() - t0


@pytest.mark.parametrize("case", sorted(CASES))
def test_check_names_file_line_and_advice(case: str, tmp_path: Path) -> None:
    items, seqs, file, line, what, advice = CASES[case]
    data = make(tmp_path / "shop", items, seqs)
    out, took = run(["-m", "services.catalog", "check", str(data)], data, tmp_path)
    assert out.returncode == 2, out
    assert "Traceback" not in out.stderr and out.stdout == ""
    first = out.stderr.splitlines()[0]
    assert first.startswith(f"error: {data / file}:{line}: {what}") and advice in first, first
    assert took < 5.0, took


def test_check_lists_every_problem_and_passes_good_data(tmp_path: Path) -> None:
    bad = make(tmp_path / "bad", GOOD_ITEMS + "x\tpen\n2\tdup\n", "1 1 2 3\n1 2 3 4\n5 1\n")
    lines = check_dataset(bad)
    assert len(lines) == 4 and [ln.split(": ", 1)[0] for ln in lines] == [
        f"{bad / 'items.tsv'}:6", f"{bad / 'items.tsv'}:7", f"{bad / 'sequences.txt'}:2", f"{bad / 'sequences.txt'}:3"]
    missing = make(tmp_path / "missing", GOOD_ITEMS, None)
    assert check_dataset(missing) == [f"sequences file not found: {missing / 'sequences.txt'} (a dataset folder "
                                      "holds items.tsv and sequences.txt)"]
    latin = make(tmp_path / "latin", None, GOOD_SEQS)
    (latin / "items.tsv").write_bytes(b"item_id\ttitle\n1\tcaf\xe9\n")
    assert "not UTF-8" in check_dataset(latin)[0] and "save the file as UTF-8" in check_dataset(latin)[0]
    good = make(tmp_path / "good", GOOD_ITEMS, GOOD_SEQS)
    assert check_dataset(good) == []
    out, _ = run(["-m", "services.catalog", "check", str(good)], good, tmp_path)
    assert out.returncode == 0 and out.stdout.startswith(f"ok: {good}: 4 items") and "3 users" in out.stdout


ENTRY_POINTS = {
    "demo": ["scripts.demo"],
    "semantic_ids build": ["model.semantic_ids", "build"],
    "onerec train": ["model.onerec", "train"],
    "offline refresh": ["offline_worker", "refresh", "--engine", "hf"],
    "api": ["online_api", "--port", "1"],
}
# `python -m MODULE ARGS`, noting at exit whether torch was imported (a loaded model needs it)
RUN_MODULE = ("import atexit, runpy, sys; mark, module, *args = sys.argv[1:]; "
              "atexit.register(lambda: open(mark, 'w').write(str('torch' in sys.modules))); "
              "sys.argv = [module, *args]; runpy.run_module(module, run_name='__main__', alter_sys=True)")


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_entry_points_validate_before_loading_models(entry: str, tmp_path: Path) -> None:
    items, seqs, file, line, what, _ = CASES["unknown item"]
    data = make(tmp_path / "shop", items, seqs)
    mark = tmp_path / "torch_imported"
    out, took = run(["-c", RUN_MODULE, str(mark), *ENTRY_POINTS[entry]], data, tmp_path)
    assert out.returncode == 2, out
    assert "Traceback" not in out.stderr, out.stderr
    assert f"error: {data / file}:{line}: {what}" in out.stderr, out.stderr
    assert "services.catalog check" in out.stderr.splitlines()[-1]
    assert mark.read_text() == "False", f"{entry} imported torch before rejecting bad data"
    assert took < 5.0, f"{entry} took {took:.1f}s to reject bad data"
    assert not (tmp_path / "artifacts").exists()  # nothing was built or claimed
