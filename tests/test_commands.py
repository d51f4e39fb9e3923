"""Every documented command runs as written: each ``python -m ...`` of the README's pipeline table, of
docs/RESULTS.md and each results file's ``command`` (docs/results/**/*.json) answers ``--help``.

Cheap on purpose: only the module and its sub-command words are kept (``python -m evaluation think run``),
then ``--help``; a moved or renamed module, a dropped sub-command or a parser that crashes fails the test.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_WORD = re.compile(r"^[a-z][a-z0-9-]*$")  # a sub-command word (not a flag, a path or a value)
# runs each (module, words) with --help in one interpreter and prints the failures as JSON
_RUNNER = """
import contextlib, io, json, runpy, sys
failed = []
for module, words in json.loads(sys.argv[1]):
    sys.argv = [module, *words, "--help"]
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        code = "returned without printing help" if "usage" not in out.getvalue() else 0
    except SystemExit as e:
        code = e.code
    except BaseException as e:
        code = repr(e)
    if code not in (0, None):
        failed.append([module, *words, str(code), out.getvalue()[-300:]])
print(json.dumps(failed))
"""


def command_heads(text: str) -> list[tuple[str, tuple[str, ...]]]:
    """(module, sub-command words) of every ``python -m`` command in `text` (``&&`` chains included)."""
    heads = []
    for m in re.finditer(r"python -m ([\w.]+)([^`&|\n]*)", text):
        words = []
        for tok in shlex.split(m[2].replace("<", " ").replace(">", " "), posix=True):
            if not _WORD.match(tok):
                break
            words.append(tok)
        heads.append((m[1], tuple(words)))
    return heads


def readme_pipeline_commands() -> list[tuple[str, tuple[str, ...]]]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Pipeline, one command per stage", 1)[1]
    table = [line for line in section.splitlines()[:60] if line.startswith("|")]
    return command_heads("\n".join(line.split("|")[2] for line in table if line.count("|") >= 3))


def results_commands() -> list[tuple[str, tuple[str, ...]]]:
    """The results files' commands and every other ``python -m`` that docs/RESULTS.md shows."""
    heads = command_heads((ROOT / "docs" / "RESULTS.md").read_text())
    for f in sorted((ROOT / "docs" / "results").rglob("*.json")):
        heads += command_heads(json.loads(f.read_text()).get("command", ""))
    return heads


def test_command_heads_keep_module_and_sub_commands() -> None:
    text = "`python -m evaluation think run --checkpoint a/b && python -m model.think align --init x` " \
           "`python -m evaluation.tune --checkpoint artifacts/onerec/<selection run>` `python -m model.onerec train`"
    assert command_heads(text) == [("evaluation", ("think", "run")), ("model.think", ("align",)),
                                   ("evaluation.tune", ()), ("model.onerec", ("train",))]


def test_documented_commands_answer_help() -> None:
    readme = readme_pipeline_commands()
    assert len(readme) >= 15 and ("evaluation", ("think", "run")) in readme  # the table was found and parsed
    heads = sorted(set(readme) | set(results_commands()))
    run = subprocess.run([sys.executable, "-c", _RUNNER, json.dumps(heads)], cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    failed = json.loads(run.stdout.strip().splitlines()[-1])
    assert failed == [], failed


def test_a_missing_command_fails() -> None:
    """The runner itself can fail: a module that does not exist and a sub-command that does not exist."""
    heads = [("model.think.train", ("base",)), ("evaluation", ("no-such-mode",))]
    run = subprocess.run([sys.executable, "-c", _RUNNER, json.dumps(heads)], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    failed = json.loads(run.stdout.strip().splitlines()[-1])
    assert [f[:2] for f in failed] == [["model.think.train", "base"], ["evaluation", "no-such-mode"]]
