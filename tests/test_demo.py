"""The main job end to end on a tiny generated shop: ``python -m scripts.demo --data SHOP --profile tiny`` (what
``make demo DATA=SHOP ARGS="--profile tiny"`` runs after its set-up) trains every stage, refreshes twice with
the real vLLM CPU engine, serves the API, and ends with the quality table on the test split and the
stage-time table; progress lines carry the whole job's ETA. Marked ``demo`` (minutes: not in ``make test``;
``.ci/run`` runs it). Artifacts go to the test's folder (``ONEREC_ARTIFACTS_ROOT``); the repository stays as
it was."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_own_dataset import make_dataset

from services.config import ROOT

pytestmark = [pytest.mark.demo, pytest.mark.timeout(1500)]


def git_status() -> str:
    return subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=ROOT, capture_output=True,
                          text=True, check=True).stdout


def test_main_job_on_a_tiny_shop_prints_quality_and_stage_times(tmp_path: Path) -> None:
    shop = tmp_path / "tinyshop"
    make_dataset(shop)
    before = git_status()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ONEREC_ARTIFACTS_ROOT": str(tmp_path / "artifacts")}
    for key in ("ONEREC_DATA_DIR", "ONEREC_ARTIFACTS_DIR", "ONEREC_EXCLUDE_CONSUMED", "ONEREC_RESULTS_DIR"):
        env.pop(key, None)
    out = subprocess.run([sys.executable, "-m", "scripts.demo", "--data", str(shop), "--profile", "tiny",
                          "--progress-every", "20"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1400)
    text = out.stdout
    assert out.returncode == 0, text[-3000:] + out.stderr[-3000:]
    summary = text.split("=== summary ===", 1)[1]

    # the quality table: profile named and labelled, users counted, the three systems with numbers
    assert "Quality on the test split (profile tiny: tiny smoke run" in summary
    assert re.search(r"\n  40 users \(the first by id\), last item held out, ranked over all 48 items; "
                     r"consumed-item rule: (exclude|keep) consumed items \(chosen on validation", summary), summary
    for system in ("MostPop", "online (OneRec select-demo-tiny-", "think-ahead (OneRec + offline OneRec-Think)"):
        row = next(line for line in summary.splitlines() if line.strip().startswith(system))
        values = [float(v) for v in row.split()[-3:]]
        assert all(0.0 <= v <= 1.0 for v in values), row
    assert "think-ahead coverage: 100%" in summary

    # the stage-time table: every stage measured, a total
    stages = ("semantic IDs", "OneRec", "consumed-item rule", "OneRec-Think", "redis", "refresh for the test",
              "quality table", "serving refresh", "API + samples", "total")
    table = summary.split("Stage times (profile tiny", 1)[1]
    for stage in stages:
        assert re.search(rf"\n  {re.escape(stage)} +\d+(m\d\ds|s) +\d+(m\d\ds|s)\n", table + "\n"), (stage, table)

    # whole-job progress with an ETA after every stage; sample answers served from the think-ahead cache
    assert len(re.findall(r"\[job\] \d/9 stages done; \S+ elapsed, about \S+ left \(estimate\)", text)) == 9
    assert "source=think-ahead" in text and "log-probabilities" in text
    assert "vendor log lines suppressed" in text + out.stderr
    assert "may cause the engine to crash" not in text + out.stderr  # explained instead
    art = tmp_path / "artifacts" / "tinyshop"
    assert (art / "consumed_rule.json").is_file() and (art / "think" / "current" / "config.json").is_file()
    assert git_status() == before
