"""The consumed-item rule chosen per dataset on validation (``ONEREC_EXCLUDE_CONSUMED=auto``, the default).

Two generated shops with a tiny OneRec and the real commands: on a shop whose validation targets are repeat
purchases, `python -m evaluation repeats --split valid --record` measures that keeping consumed items wins and
records ``false``; on a shop without repeats it records whichever rule its validation numbers favour. ``auto``
then serves the recorded rule (the one policy, and ``GET /readyz`` says which and why); ``true``/``false``
still force it. Real redis-server for the API; no downloads."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from api_support import running_app
from conftest import RedisServer

from evaluation.repeats import main as repeats
from model.onerec import OneRecConfig, build_model, save_checkpoint
from model.policy import PolicyConfig
from model.semantic_ids import SemanticIDConfig, SemanticIDs
from services.config import CONSUMED_RULE_FILE, Settings, get_settings

pytestmark = pytest.mark.timeout(180)

RADIX = (4, 5, 3, 2)  # 120 unique codes
ITEMS = list(range(1, 121))


def make_shop(root: Path, repeats: bool, users: int = 160, seed: int = 0) -> tuple[Path, Path]:
    """(data folder, OneRec checkpoint): sequences whose validation target is (or never is) a repeat."""
    rng = random.Random(seed)
    data = root / "data" / ("repeats" if repeats else "fresh")
    data.mkdir(parents=True)
    (data / "items.tsv").write_text("item_id\ttitle\n" + "".join(f"{i}\titem {i}\n" for i in ITEMS))
    lines = []
    for u in range(1, users + 1):
        if repeats:  # a user rebuys the same three items: every target is in the history
            a, b, c = rng.sample(ITEMS, 3)
            seq = [a, b, c, a, b, c, a, b]
        else:
            seq = rng.sample(ITEMS, rng.randint(4, 9))
        lines.append(" ".join(map(str, [u, *seq])) + "\n")
    (data / "sequences.txt").write_text("".join(lines))
    codes = np.array(list(np.ndindex(*RADIX)), dtype=np.int64)
    sid = SemanticIDs(np.array(ITEMS), codes, SemanticIDConfig(variant="text", levels=3, codebook_size=6))
    ckpt = root / "onerec"
    cfg = OneRecConfig(d_model=32, n_layers=1, n_heads=2, d_ff=64, max_len=20, dropout=0.0)
    save_checkpoint(build_model(cfg, sid, seed=0), sid, ckpt)
    return data, ckpt


@pytest.mark.parametrize("shop_repeats", [True, False], ids=["repeats", "no-repeats"])
def test_auto_picks_the_rule_validation_favours(shop_repeats: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                redis_server: RedisServer, capsys: pytest.CaptureFixture[str]) -> None:
    data, ckpt = make_shop(tmp_path, shop_repeats)
    art = tmp_path / "artifacts" / data.name
    for key, value in {"ONEREC_DATA_DIR": data, "ONEREC_ARTIFACTS_DIR": art, "ONEREC_ONEREC_DIR": ckpt,
                       "ONEREC_REDIS_URL": redis_server.url, "ONEREC_NAMESPACE": f"rule-{data.name}",
                       "ONEREC_MODEL_PROCESS": "false", "ONEREC_BEAM": "10"}.items():
        monkeypatch.setenv(key, str(value))
    get_settings.cache_clear()
    try:
        before = Settings().consumed_rule()
        assert before.exclude and "not measured" in before.source  # auto, nothing recorded yet
        repeats(["--split", "valid", "--record"])
        printed = capsys.readouterr().out
        doc = json.loads((art / CONSUMED_RULE_FILE).read_text())
        m = doc["measured"]
        assert m["repeat_share"] == (1.0 if shop_repeats else 0.0)
        keep_wins = (m["allow"]["recall@10"], m["allow"]["ndcg@10"]) > (m["exclude"]["recall@10"],
                                                                         m["exclude"]["ndcg@10"])
        if shop_repeats:  # every target is a repeat: the exclusive rule cannot hit one, keeping must win
            assert m["exclude"]["recall@10"] == 0.0 < m["allow"]["recall@10"] and keep_wins, m
        # without repeats either may win (a beam that skips history items explores other codes): the pick follows
        exclude = not keep_wins
        assert doc["exclude_consumed"] is exclude
        assert f"favours: {'exclude consumed items (true)' if exclude else 'keep consumed items (false)'}" in printed

        auto = Settings()
        assert auto.exclude_consumed == "auto"
        rule = auto.consumed_rule()
        assert rule.exclude is exclude and rule.source.startswith("chosen on validation")
        assert PolicyConfig.from_settings(auto).exclude_consumed is exclude
        for forced in (True, False):  # true / false still force it
            assert PolicyConfig.from_settings(Settings(exclude_consumed=forced)).exclude_consumed is forced
        with running_app(auto) as client:
            body = client.get("/readyz").json()
        assert body["consumed_rule"]["exclude"] is exclude
        assert body["consumed_rule"]["source"].startswith("chosen on validation"), body
    finally:
        get_settings.cache_clear()


def test_forced_values_parse_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ONEREC_ARTIFACTS_DIR", str(tmp_path))
    (tmp_path / CONSUMED_RULE_FILE).write_text(json.dumps({"exclude_consumed": False, "reason": "r"}))
    for text, expected in (("true", True), ("false", False), ("auto", False)):
        monkeypatch.setenv("ONEREC_EXCLUDE_CONSUMED", text)
        assert Settings().consumed_rule().exclude is expected
    (tmp_path / CONSUMED_RULE_FILE).write_text("{broken")
    with pytest.raises(ValueError, match="consumed_rule.json: unreadable consumed-item rule"):
        Settings().consumed_rule()
    monkeypatch.setenv("ONEREC_EXCLUDE_CONSUMED", "maybe")
    with pytest.raises(ValueError, match="exclude_consumed"):
        Settings()


def test_industrial_validation_measurement_chooses_keep() -> None:
    """The rule `choose` takes from the measured Industrial validation run (docs/results/industrial, 1,987 users,
    5.2% repeat targets): keeping consumed items (R@10 .1112 vs .0815)."""
    from evaluation.repeats import choose
    from services.config import ROOT

    measured = json.loads((ROOT / "docs" / "results" / "industrial" / "repeats_valid.json").read_text())["metrics"]
    exclude, reason = choose(measured)
    assert exclude is False
    assert reason.startswith("R@10 exclude 0.0815 vs keep 0.1112") and "1987 users, 5.2% repeat targets" in reason
