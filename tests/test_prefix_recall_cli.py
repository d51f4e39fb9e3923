"""`python -m evaluation prefix-recall` on the online model alone: its own top-P from the fresh history and,
with `--onerec-stale`, from the history without its newest item (what staleness alone costs), paired."""

from __future__ import annotations

import json
from pathlib import Path

from api_support import build_tiny_world

from evaluation.prefix_recall import main, onerec_prefixes
from model.metrics import prefix_recall
from model.onerec import OneRec
from services.catalog import load_dataset


def test_online_model_alone_fresh_and_stale(tmp_path: Path) -> None:
    world = build_tiny_world(tmp_path / "tiny")
    out = tmp_path / "pr.json"
    main(["--checkpoint", "", "--onerec", str(world.checkpoint), "--onerec-stale", "--data-dir", str(world.data_dir),
          "--p", "2,4", "--out-json", str(out)])
    doc = json.loads(out.read_text())
    assert doc["think_mode"] is None and set(doc["seconds"]) == {"onerec"}
    assert {"onerec@2", "onerec_stale@2", "onerec@4", "onerec_stale@4"} <= set(doc["recall"])
    assert "onerec_stale_vs_onerec@4" in doc["paired"]
    # the stale set is the model's own top-P from each history without its newest item, checked by hand
    ex = load_dataset(world.data_dir).splits.test
    onerec = OneRec.load(world.checkpoint)
    stale = onerec_prefixes(onerec, [e.history[:-1] if len(e.history) > 1 else e.history for e in ex], 4)
    targets = [(int(world.sid.codes_of(e.target)[0]), int(world.sid.codes_of(e.target)[1])) for e in ex]
    assert abs(doc["recall"]["onerec_stale@4"]["recall"] - prefix_recall(stale, targets)["recall"]) < 1e-6
