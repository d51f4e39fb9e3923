"""Every OneRec-Think stage runs a step on a tiny model; decoding and evaluation glue behave."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from think_fixtures import run_killed_then_resumed, tiny_dataset, tiny_sid, write_dataset

from model.metrics import evaluate
from model.think.__main__ import main as train_main
from model.think.align_data import direct_prefix
from model.think.checkpoint import load_think
from model.think.decode import Decoder
from model.think.recommender import ThinkRecommender
from model.trie import CodeTrie

TINY = ["--bpe-vocab", "300", "--hidden", "32", "--layers", "1", "--heads", "2", "--kv-heads", "1",
        "--head-dim", "16", "--intermediate", "64"]


@pytest.fixture(scope="module")
def stages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """base -> align -> activate -> enhance, each for one or two steps."""
    root = tmp_path_factory.mktemp("think")
    ds, sid = tiny_dataset(), tiny_sid()
    write_dataset(ds, root / "data")
    sid.save(root / "sid")
    common = ["--data-dir", str(root / "data"), "--sid-dir", str(root / "sid"), "--save-every", "1"]
    out = {k: root / "think" / k for k in ("base", "ia", "act", "rl")}
    torch.manual_seed(0)
    train_main(["base", "--out", str(out["base"]), "--steps", "2", "--batch-size", "4", *TINY, *common])
    train_main(["align", "--init", str(out["base"]), "--out", str(out["ia"]), "--warmup-steps", "1", "--steps", "2",
                "--epochs", "0", "--batch-size", "4", *common])
    train_main(["activate", "--init", str(out["ia"]), "--out", str(out["act"]), "--steps", "1", "--batch-size", "4",
                "--embeddings", "bow", "--lora-r", "4", "--cache-dir", str(root / "cache"), *common])
    train_main(["enhance", "--init", str(out["act"]), "--out", str(out["rl"]), "--steps", "1", "--batch-size", "2",
                "--group", "2", "--beam", "4", "--max-think", "6", "--current", *common])
    return out


def test_stages_write_loadable_folders(stages: dict[str, Path]) -> None:
    names = {"base": ["base"], "ia": ["base", "align"], "act": ["base", "align", "activate"],
             "rl": ["base", "align", "activate", "enhance"]}
    for key, folder in stages.items():
        meta = json.loads((folder / "itemic.json").read_text())
        assert [s["stage"] for s in meta["stages"]] == names[key]
        assert not (folder / "trainer_state.pt").exists() and not (folder / "adapter").exists()
        load_think(folder)
    assert (stages["rl"].parent / "current").resolve() == stages["rl"].resolve()
    log = [json.loads(x) for x in (stages["rl"] / "train_log.jsonl").read_text().splitlines()]
    assert {"reward", "kl", "think_len"} <= set(log[-1])
    align = json.loads((stages["ia"] / "itemic.json").read_text())["stages"][-1]
    assert align["warmup"]["steps"] == 1 and align["multitask"]["steps"] == 2


def test_warmup_moves_only_item_rows(stages: dict[str, Path], tmp_path: Path) -> None:
    root = stages["base"].parent.parent
    out = tmp_path / "wu"
    train_main(["align", "--init", str(stages["base"]), "--out", str(out), "--warmup-steps", "2", "--steps", "0",
                "--epochs", "0", "--data-dir", str(root / "data"), "--sid-dir", str(root / "sid")])
    before, _, tm = load_think(stages["base"])
    after, _, _ = load_think(out)
    changed = (before.get_input_embeddings().weight != after.get_input_embeddings().weight).any(1)
    rows = torch.nonzero(changed).flatten().tolist()
    assert rows and all(tm.is_code(r) or r in (tm.item_begin, tm.item_end) for r in rows)
    for (n, p), (_, q) in zip(before.named_parameters(), after.named_parameters(), strict=True):
        if "embed" not in n and "lm_head" not in n:
            assert torch.equal(p, q), n


def test_resume_continues_from_checkpoint(stages: dict[str, Path], tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    root = stages["base"].parent.parent
    out = tmp_path / "res"
    args = ["align", "--init", str(stages["base"]), "--out", str(out), "--warmup-steps", "0", "--batch-size", "4",
            "--data-dir", str(root / "data"), "--sid-dir", str(root / "sid"), "--save-every", "1", "--tasks", "seq",
            "--steps", "3", "--epochs", "0"]
    real, calls = torch.nn.utils.clip_grad_norm_, []

    def crash_on_second(*a, **kw):  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        train_main(args)
    assert torch.load(out / "trainer_state.pt", weights_only=False)["step"] == 1
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", real)
    train_main([*args, "--resume"])
    stage = json.loads((out / "itemic.json").read_text())["stages"][-1]
    assert stage["multitask"]["steps"] == 2  # steps 2 and 3 only
    assert not (out / "trainer_state.pt").exists()


def test_activation_and_enhancement_resume_after_a_kill(stages: dict[str, Path], tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Reasoning Activation (LoRA) killed at its second step and resumed ends with the weights of an uninterrupted
    run; Reasoning Enhancement (GRPO) killed likewise resumes from its last save and runs each step once."""
    root = stages["base"].parent.parent
    common = ["--data-dir", str(root / "data"), "--sid-dir", str(root / "sid"), "--save-every", "1"]

    def activate(out: Path) -> list[str]:
        return ["activate", "--init", str(stages["ia"]), "--out", str(out), "--steps", "3", "--batch-size", "4",
                "--embeddings", "bow", "--lora-r", "4", "--cache-dir", str(root / "cache"), *common]

    torch.manual_seed(0)
    train_main(activate(tmp_path / "act-whole"))
    torch.manual_seed(0)
    st = run_killed_then_resumed(train_main, activate(tmp_path / "act-killed"), tmp_path / "act-killed", monkeypatch,
                                 kill_at_step=2)
    assert st["desc"] == "activate" and st["step"] == 1  # resumed from the save after step 1
    whole, _, _ = load_think(tmp_path / "act-whole")
    killed, _, _ = load_think(tmp_path / "act-killed")
    init, _, _ = load_think(stages["ia"])
    moved = False
    for (n, p), (_, q), (_, r) in zip(whole.named_parameters(), killed.named_parameters(), init.named_parameters(),
                                      strict=True):
        assert torch.allclose(p, q, atol=1e-6), n
        moved |= not torch.equal(p, r)
    assert moved  # the LoRA updates were merged: the comparison is not between two copies of the init
    assert not (tmp_path / "act-killed" / "trainer_state.pt").exists()
    assert not (tmp_path / "act-killed" / "adapter").exists()

    rl = tmp_path / "rl-killed"
    enhance = ["enhance", "--init", str(stages["act"]), "--out", str(rl), "--steps", "3", "--batch-size", "2",
               "--group", "2", "--beam", "4", "--max-think", "6", *common]
    st = run_killed_then_resumed(train_main, enhance, rl, monkeypatch, kill_at_step=2)
    assert st["desc"] == "enhance" and st["step"] == 1
    steps = [json.loads(x)["step"] for x in (rl / "train_log.jsonl").read_text().splitlines()
             if json.loads(x).get("stage") == "enhance"]
    assert steps == [1, 2, 3]
    assert not (rl / "trainer_state.pt").exists()
    load_think(rl)


def test_item_losses_and_head_reward_need_items(stages: dict[str, Path], tmp_path: Path) -> None:
    """A model without item tokens or item head: the item-aware activation and the head reward say what is missing;
    out-of-range activation settings are refused by name before any work."""
    common = ["--data-dir", str(stages["base"].parent.parent / "data"), "--sid-dir",
              str(stages["base"].parent.parent / "sid")]
    with pytest.raises(SystemExit, match="no item tokens"):
        train_main(["activate", "--init", str(stages["ia"]), "--out", str(tmp_path / "a"), "--steps", "1",
                    "--embeddings", "bow", "--cache-dir", str(tmp_path / "c"), "--item-loss-weight", "1", *common])
    for flag, value in (("--direct-share", "1.0"), ("--dropout", "-0.1")):
        with pytest.raises(SystemExit, match=flag):
            train_main(["activate", "--init", str(stages["ia"]), "--out", str(tmp_path / "b"), "--steps", "1",
                        "--embeddings", "bow", "--cache-dir", str(tmp_path / "c"), flag, value, *common])
    with pytest.raises(SystemExit, match="no item head"):
        train_main(["enhance", "--init", str(stages["act"]), "--out", str(tmp_path / "r"), "--steps", "1",
                    "--reward", "head", *common])


def test_batched_beam_matches_single_and_is_valid(stages: dict[str, Path]) -> None:
    model, tok, tm = load_think(stages["ia"])
    sid = tiny_sid()
    trie = CodeTrie(sid.codes, sid.item_ids, sid.codebook_size)
    dec = Decoder(model, tok, tm, trie)
    hists = [[1, 2, 3, 4, 5], [6], [7, 8]]
    prefixes = [direct_prefix([sid.codes_of(i) for i in h]) for h in hists]
    both, _ = dec.recommend(prefixes, width=6, think=False)
    for j, p in enumerate(prefixes):
        one, _ = dec.recommend([p], width=6, think=False)
        assert one.items[0] == both.items[j]
        assert torch.allclose(torch.tensor(one.scores[0]), torch.tensor(both.scores[j]), atol=1e-4)
    assert all(len(r) == 6 and len(set(r)) == 6 and all(sid.has_item(i) for i in r) for r in both.items)
    # the packed beam's score equals a plain no-cache forward over prompt + path
    for j in range(len(prefixes)):
        ids = tok(prefixes[j], add_special_tokens=False)["input_ids"]
        path = [tm.token_id(lv, int(c)) for lv, c in enumerate(both.codes[j][0])]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids + path])).logits[0].float(), -1)
        ref = sum(float(logp[len(ids) - 1 + i, t]) for i, t in enumerate(path))
        assert abs(ref - float(both.scores[j][0])) < 1e-3
    assert all((both.scores[j][:-1] >= both.scores[j][1:]).all() for j in range(3))


def test_think_recommender_on_harness(stages: dict[str, Path]) -> None:
    ds = tiny_dataset()
    rec = ThinkRecommender.load(stages["rl"], beam=10, max_think=5, batch_size=4)
    assert rec.think
    metrics = evaluate(rec, ds.splits.test, k=10, progress=False)
    assert set(metrics) == {"recall@5", "recall@10", "ndcg@5", "ndcg@10"}
    assert len(rec.reasoning) == len(ds.splits.test)
    with pytest.raises(ValueError, match="beam"):
        rec.recommend(ds.splits.test[:1], 11)
