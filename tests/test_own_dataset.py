"""A new user's own dataset, through the README's documented commands ("Your own data").

A tiny generated catalogue with a description column and repeat purchases is selected with
``ONEREC_DATA_DIR`` alone; the documented commands then build semantic IDs from title + description, the
MostPopular baseline, a selection run and its refit, the test evaluation, the repeat measurement, and
serve `POST /v1/recommend` from the API built from the same settings. Checks: every artifact lands in the
dataset's own folder, every results file is labelled with the dataset and sits in the dataset's artifacts
folder (``results/`` with its own RESULTS.md), not in the tracked docs (``git status`` unchanged), the refit
reuses the selection run's best epoch, the consumed-item rule recorded on validation is the served one, and
nothing of the Beauty artifacts or results changed. The artifacts root is moved to the test's folder
(``ONEREC_ARTIFACTS_ROOT``); the dataset-derived folder under it is what a user gets under ``artifacts/``.
Commands run in-process (their ``main``) to keep the test fast.
"""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
from pathlib import Path

import pytest
from api_support import running_app
from conftest import RedisServer

from evaluation.repeats import no_entries
from evaluation.think_ahead import ThinkAheadRecommender
from model.onerec import OneRec
from model.policy import PolicyConfig, Popularity
from services.catalog import Example
from services.config import ROOT, Settings, get_settings

pytestmark = pytest.mark.timeout(240)

WORDS = ("drill bit steel brass valve pipe fitting glove nitrile tape seal gasket clamp hose filter "
         "sensor probe meter relay fuse wire cable label marker").split()


def make_dataset(folder: Path, n_items: int = 48, n_users: int = 60, seed: int = 0) -> dict[int, list[int]]:
    """items.tsv with title + description (some empty, some as a Python list) and sequences with repeats."""
    rng = random.Random(seed)
    folder.mkdir(parents=True)
    with (folder / "items.tsv").open("w") as f:
        f.write("item_id\ttitle\tdescription\n")
        for i in range(1, n_items + 1):
            title = " ".join(rng.choice(WORDS) for _ in range(3))
            desc = "" if i % 7 == 0 else str([f"{rng.choice(WORDS)} for {rng.choice(WORDS)} work"])
            f.write(f"{i}\t{title}\t{desc}\n")
    seqs: dict[int, list[int]] = {}
    for u in range(1, n_users + 1):
        seq = [rng.randint(1, n_items) for _ in range(rng.randint(4, 9))]
        if u % 5 == 0:  # a repeat purchase as the validation target
            seq[-2] = seq[0]
        if u % 9 == 0:  # ... and as the test target
            seq[-1] = seq[1]
        seqs[u] = seq
    (folder / "sequences.txt").write_text("".join(" ".join(map(str, [u, *s])) + "\n" for u, s in seqs.items()))
    return seqs


def snapshot(*paths: Path) -> dict[str, str]:
    """Every file under `paths` with a hash of its bytes (symlinks: their target)."""
    out: dict[str, str] = {}
    for root in paths:
        if not root.exists():
            continue
        for p in [root] if root.is_file() else sorted(root.rglob("*")):
            if p.is_symlink():
                out[str(p)] = "-> " + str(p.readlink())
            elif p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def test_own_dataset_documented_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     redis_server: RedisServer) -> None:
    from evaluation.__main__ import main as evaluation
    from model.onerec.__main__ import main as onerec
    from model.semantic_ids.__main__ import main as semantic_ids

    beauty = snapshot(ROOT / "artifacts", ROOT / "docs" / "results", ROOT / "docs" / "RESULTS.md")
    git_status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=ROOT,
                                capture_output=True, text=True, check=True).stdout
    data = tmp_path / "shop"
    seqs = make_dataset(data)
    art_root = tmp_path / "artifacts"
    # what the user sets: the dataset folder (the artifacts root only keeps this test out of the repository)
    for key, value in {"ONEREC_DATA_DIR": data, "ONEREC_ARTIFACTS_ROOT": art_root,
                       "ONEREC_REDIS_URL": redis_server.url, "ONEREC_NAMESPACE": "own-data",
                       "ONEREC_MODEL_PROCESS": "false", "ONEREC_DEFAULT_BUDGET_MS": "5000"}.items():
        monkeypatch.setenv(key, str(value))
    get_settings.cache_clear()
    try:
        st = get_settings()
        assert st.dataset == "shop" and st.artifacts_dir == art_root / "shop"
        art = st.artifacts_dir

        semantic_ids(["build", "--variant", "text", "--text-columns", "title,description", "--levels", "2",
                      "--codebook-size", "8", "--results"])
        sid = (art / "sid" / "current").resolve()
        assert json.loads((sid / "config.json").read_text())["text_columns"] == ["title", "description"]
        evaluation(["mostpop", "--results"])
        small = ["--d-model", "32", "--layers", "1", "--heads", "2", "--batch-size", "16", "--val-users", "60",
                 "--threads", "1"]
        onerec(["train", "--epochs", "3", "--patience", "3", *small])
        selection = (art / "onerec" / "current").resolve()
        sel_meta = json.loads((selection / "meta.json").read_text())
        assert selection.name.startswith("select-") and 1 <= sel_meta["best_epoch"] <= 3, sel_meta
        onerec(["train", "--refit", *small])
        refit = (art / "onerec" / "current").resolve()
        refit_meta = json.loads((refit / "meta.json").read_text())
        assert refit.name.startswith("refit-"), refit.name
        assert refit_meta["epochs"] == sel_meta["best_epoch"] and refit_meta["selection"] == selection.name
        assert all("val_recall@10" not in c for c in json.loads((refit / "curve.json").read_text()))
        evaluation(["onerec", "--split", "test", "--beam", "10", "--results"])
        evaluation(["repeats", "--split", "valid", "--beam", "10", "--results", "--record"])

        # results: labelled, in the dataset's own folder with its own RESULTS.md, not in the tracked docs
        results = art / "results"
        files = sorted(p.name for p in results.glob("*.json"))
        assert files == ["mostpop.json", "onerec_quality.json", "repeats_valid.json", "semantic_ids.json"], files
        assert all(json.loads(p.read_text())["dataset"] == "shop" for p in results.glob("*.json"))
        md = (results / "RESULTS.md").read_text()
        assert "<!-- results:shop:begin -->" in md and "**onerec_quality**" in md
        rep = json.loads((results / "repeats_valid.json").read_text())["metrics"]
        assert rep["repeat_targets"] == sum(s[-2] in s[:-2] for s in seqs.values()) >= 12
        # the exclusive rule never lists a consumed item, so it can never hit a repeat target
        assert rep["exclude_repeat_targets"]["recall@10"] == 0.0
        # auto (the default) serves the rule validation favoured, as recorded with the artifacts
        recorded = json.loads((art / "consumed_rule.json").read_text())
        favoured = (rep["exclude"]["recall@10"], rep["exclude"]["ndcg@10"]) >= (rep["allow"]["recall@10"],
                                                                               rep["allow"]["ndcg@10"])
        assert recorded["exclude_consumed"] is favoured is st.consumed_rule().exclude

        # serve: the API built from the same settings answers from the user's catalogue, with the consumed
        # rule exactly as `evaluation repeats` applied it (its online-only path, the API's popularity)
        onerec_model = OneRec.load(st.resolved("onerec"))
        popularity = Popularity(seqs.values(), {int(i) for i in onerec_model.sid.item_ids})
        evaluated = ThinkAheadRecommender(onerec_model, no_entries, PolicyConfig.from_settings(st), popularity)
        with running_app(Settings()) as client:
            for user in (5, 10, 11, 18):
                history = seqs[user][:-1]
                body = client.post("/v1/recommend", json={"user_id": user, "k": 5, "history": history}).json()
                items = [it["item_id"] for it in body["items"]]
                assert body["source"] == "online-only" and len(items) == 5, body
                if favoured:
                    assert not set(items) & set(history), (user, items)
                assert items == evaluated.recommend([Example(user, history[-50:], -1)], 5)[0]
                assert all(1 <= i <= 48 for i in items)
    finally:
        get_settings.cache_clear()
    assert sorted(p.name for p in art.iterdir()) == ["consumed_rule.json", "dataset.json", "onerec", "results", "sid"]
    assert json.loads((art / "dataset.json").read_text())["data_dir"] == str(data.resolve())
    assert snapshot(ROOT / "artifacts", ROOT / "docs" / "results", ROOT / "docs" / "RESULTS.md") == beauty
    assert subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=ROOT, capture_output=True,
                          text=True, check=True).stdout == git_status


def test_two_dataset_folders_of_the_same_name_do_not_share_artifacts(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """``a/shop`` and ``b/shop`` would both be labelled ``shop``: the second is refused with a way out."""
    monkeypatch.setenv("ONEREC_ARTIFACTS_ROOT", str(tmp_path / "artifacts"))
    first, second = tmp_path / "a" / "shop", tmp_path / "b" / "shop"
    Settings(data_dir=first).claim_artifacts()
    Settings(data_dir=first).claim_artifacts()  # the same folder again: fine
    with pytest.raises(ValueError, match="belongs to the dataset at .*a/shop.*ONEREC_ARTIFACTS_DIR"):
        Settings(data_dir=second).claim_artifacts()
    Settings(data_dir=second, artifacts_dir=tmp_path / "artifacts" / "shop-b").claim_artifacts()
