"""The epoch recipe of OneRec-Think: selection + refit runs, the item head, resume after a kill, defaults."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from think_fixtures import run_killed_then_resumed, tiny_dataset, tiny_sid, write_dataset

from model.think.__main__ import build_parser
from model.think.__main__ import main as train_main
from model.think.base_model import TinyBaseConfig
from model.think.checkpoint import load_think
from model.think.fit import FitConfig
from model.think.itemhead import ItemHead, rerank, targets_at_item_begin
from model.think.recommender import ThinkRecommender
from model.trie import TokenMap

TINY = ["--bpe-vocab", "300", "--hidden", "32", "--layers", "1", "--heads", "2", "--kv-heads", "1",
        "--head-dim", "16", "--intermediate", "64"]
README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("recipe")
    ds, sid = tiny_dataset(n_users=16), tiny_sid()
    write_dataset(ds, root / "data")
    sid.save(root / "sid")
    torch.manual_seed(0)
    train_main(["base", "--out", str(root / "base"), "--steps", "1", "--batch-size", "4", *TINY, *common(root)])
    return root


@pytest.fixture(scope="module")
def selected(root: Path) -> Path:
    """A finished selection run (3 epochs, patience beyond the schedule)."""
    sel = root / "seq-select"
    train_main(recipe(root, sel, "--patience", "9"))
    return sel


def common(root: Path) -> list[str]:
    return ["--data-dir", str(root / "data"), "--sid-dir", str(root / "sid")]


def recipe(root: Path, out: Path, *extra: str) -> list[str]:
    return ["align", "--init", str(root / "base"), "--out", str(out), "--tasks", "seq", "--warmup-steps", "0",
            "--epochs", "3", "--batch-size", "4", "--val-users", "8", "--save-every", "2", *common(root), *extra]


def stage(folder: Path) -> dict:
    return json.loads((folder / "itemic.json").read_text())["stages"][-1]


def test_selection_then_refit(root: Path, selected: Path) -> None:
    sel, ref = selected, root / "seq-refit"
    s = stage(sel)
    assert s["run"] == "selection" and 1 <= s["best_epoch"] <= 3 and s["epochs"] == 3
    assert [c["epoch"] for c in s["fit"]["curve"]] == [1, 2, 3]
    assert all(0.0 <= c["val_recall@10"] <= 1.0 for c in s["fit"]["curve"])
    assert (sel / "item_head" / "weight.safetensors").is_file() and not (sel / "trainer_state.pt").exists()
    # vLLM loads every *.safetensors at the root as model weights: only the model's may be there
    assert sorted(p.name for p in sel.glob("*.safetensors")) == ["model.safetensors"]
    # the folder holds the best epoch: its head re-ranks leaves inside the think recommender
    rec = ThinkRecommender.load(sel, beam=6, think=False, batch_size=4)
    assert rec.decoder.item_head is not None
    out = rec.recommend(tiny_dataset(n_users=16).splits.test[:5], 5)
    assert all(len(r) == 5 and len(set(r)) == 5 for r in out)

    train_main(recipe(root, ref, "--refit-of", str(sel)))
    r = stage(ref)
    assert r["run"] == "refit" and r["best_epoch"] == s["best_epoch"]
    assert r["fit"]["epochs_trained"] == s["best_epoch"] and r["fit"]["epochs"] == 3
    assert all("val_recall@10" not in c for c in r["fit"]["curve"])  # no validation, no "nan"
    assert r["fit"]["refit_of"] == str(sel)
    with pytest.raises(SystemExit, match="no selection run"):
        train_main(recipe(root, root / "bad", "--refit-of", str(ref)))


def test_refit_learns_from_validation_targets(root: Path, selected: Path) -> None:
    from model.think.stages import load_context, refit_source

    args = build_parser().parse_args(recipe(root, root / "x", "--refit-of", str(selected)))
    ctx = load_context(root / "data", root / "sid", None)
    src, sel = refit_source(args, ctx)
    for e in ctx.ds.splits.valid:
        assert src[e.user_id][-1] == e.target and e.target not in ctx.train[e.user_id][-1:]
    assert sel["run"] == "selection"


def test_killed_fit_resumes_to_the_same_weights(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    whole, killed = root / "whole", root / "killed"
    args = ["--patience", "9", "--no-bf16"]
    train_main(recipe(root, whole, *args))
    # killed mid epoch 2 (4 steps per epoch), after the step-6 checkpoint
    st = run_killed_then_resumed(train_main, recipe(root, killed, *args), killed, monkeypatch)
    assert (st["epoch"], st["step"]) == (1, 2)
    a, b = load_think(whole)[0], load_think(killed)[0]
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6), n
    assert [c["val_recall@10"] for c in stage(whole)["fit"]["curve"]] == \
        [c["val_recall@10"] for c in stage(killed)["fit"]["curve"]]


def test_item_begin_targets_and_rerank_by_hand() -> None:
    tm = TokenMap(10, 2, 4, 8, 9)  # codes: level 0 -> ids 10..13, level 1 -> 14..17; begin 8, end 9
    row_of = {(1, 2): 0, (3, 0): 1}
    ids = torch.tensor([[5, 8, 11, 16, 9, 8, 13, 14, 9]])  # prompt 5, then items (1,2) and (3,0)
    labels = torch.tensor([[-100, 8, 11, 16, 9, 8, 13, 14, 9]])
    pos, rows = targets_at_item_begin(ids, labels, tm, row_of)
    assert pos.tolist() == [[0, 1], [0, 5]] and rows.tolist() == [0, 1]
    labels[0, :5] = -100  # the first item is prompt: no target there
    pos, rows = targets_at_item_begin(ids, labels, tm, row_of)
    assert pos.tolist() == [[0, 5]] and rows.tolist() == [1]
    # leaves: rows 2, 0, none; item logits favour row 0 by 3 -> it overtakes row 2 (code gap 1)
    order, new = rerank(torch.tensor([[3.0, 0.0, 0.0]]), np.array([[2, 0, -1]]), np.array([[-1.0, -2.0, -3.0]]), 1.0)
    assert order.tolist() == [[1, 0, 2]] and new[0, :2].tolist() == [1.0, -1.0] and new[0, 2] == -np.inf


def test_head_save_load_refuses_other_items(root: Path, tmp_path: Path) -> None:
    model, _, tm = load_think(root / "base")
    sid = tiny_sid()
    head = ItemHead.from_codes(model, tm, sid)
    head.save(tmp_path, sid)
    back = ItemHead.load(tmp_path, sid)
    assert back is not None and torch.equal(back.weight, head.weight)
    other = tiny_sid(n_items=20)
    with pytest.raises(ValueError, match="another item order"):
        ItemHead.load(tmp_path, other)
    assert ItemHead.load(tmp_path / "nothing") is None


def _readme_commands(stage_name: str) -> list[list[str]]:
    out = []
    for m in re.finditer(r"`python -m model\.think ([^`]+)`", README.read_text()):
        argv = shlex.split(m.group(1))
        if argv[0] == stage_name:
            out.append(argv)
    return out


def test_readme_commands_use_the_recipe_defaults() -> None:
    base = _readme_commands("base")
    align = _readme_commands("align")
    assert base and align
    for argv in base:
        args = build_parser().parse_args(argv)
        d = TinyBaseConfig()
        assert args.steps > 0, "the README's base command must train (a default of --steps 0 once trained nothing)"
        assert (args.hidden, args.layers, args.intermediate) == (d.hidden, d.layers, d.intermediate)
    f = FitConfig()
    for argv in align:
        args = build_parser().parse_args(argv)
        assert (args.epochs, args.batch_size, args.lr, args.bf16) == (f.epochs, f.batch_size, f.lr, f.bf16)
        assert args.item_loss_weight == f.item_loss_weight and args.val_users == f.val_users
    assert any("--refit-of" in a for a in align), "the README refits on train+valid"


def test_prefix_recall_by_hand() -> None:
    from model.metrics import prefix_hits, prefix_recall

    cached = [[(1, 2), (3, 4)], [(1, 2)], [], [(5, 5), (5, 5), (0, 7)]]
    targets = [(3, 4), (2, 1), (1, 2), (0, 7)]
    assert prefix_hits(cached, targets) == [True, False, False, True]
    r = prefix_recall(cached, targets)
    assert (r["users"], r["hits"], r["recall"], r["mean_set_size"]) == (4, 2, 0.5, 1.25)
    with pytest.raises(ValueError, match="prefix sets"):
        prefix_hits(cached, targets[:2])


def test_think_prefixes_are_valid_and_ranked(selected: Path) -> None:
    rec = ThinkRecommender.load(selected, think=False)
    sid = tiny_sid()
    valid = {tuple(int(x) for x in c[:2]) for c in sid.codes}
    hists = [e.history for e in tiny_dataset(n_users=16).splits.test[:5]]
    sets = rec.top_prefixes(hists, 6, batch_size=2)
    assert set(sets) == {"codes", "item_head"}
    for name, per_user in sets.items():
        for c in per_user:
            assert c and len(c) == len(set(c)) <= 6 and set(c) <= valid, name
    # the code beam's prefixes are the top pairs by log p(a) + log p(b|a): check user 0 against a plain forward
    dec = rec.decoder
    b = dec.prefill(dec.encode_prefixes([rec.prefix(hists[0])]))
    beams = dec.beam_codes(b, 6, levels=2)
    assert beams.items == [[]] and [tuple(int(x) for x in c) for c in beams.codes[0]][: len(sets["codes"][0])] == \
        sets["codes"][0]
    assert (beams.scores[0][:-1] >= beams.scores[0][1:]).all()


def test_head_candidates_score_exact_code_logprobs(selected: Path) -> None:
    rec = ThinkRecommender.load(selected, think=False)
    dec, tm, tok = rec.decoder, rec.decoder.tm, rec.decoder.tok
    hists = [e.history for e in tiny_dataset(n_users=16).splits.test[:3]]
    prefixes = [rec.prefix(h) for h in hists]
    b = dec.prefill(dec.encode_prefixes(prefixes))
    both = dec.head_candidates(b, 5, code_weight=1.0)
    head_only = dec.head_candidates(dec.prefill(dec.encode_prefixes(prefixes)), 5, code_weight=0.0)
    assert [set(r) for r in both.items] == [set(r) for r in head_only.items]  # same candidates, other order
    for j, p in enumerate(prefixes):
        ids = tok(p, add_special_tokens=False)["input_ids"]
        path = [tm.token_id(lv, int(c)) for lv, c in enumerate(both.codes[j][0])]
        with torch.no_grad():
            model = dec.model
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids + path])).logits[0].float(), -1)
            il = torch.log_softmax(dec.item_head.logits(model.base_model(input_ids=torch.tensor([ids]))
                                                        .last_hidden_state[0, -1]), -1)
        code = sum(float(logp[len(ids) - 1 + i, t]) for i, t in enumerate(path))
        row = list(rec.sid.item_ids).index(both.items[j][0])
        assert abs(code + float(il[row]) - float(both.scores[j][0])) < 1e-3
        assert (both.scores[j][:-1] >= both.scores[j][1:]).all()


def test_offline_engine_ranks_prefixes_by_the_item_head(root: Path, selected: Path) -> None:
    """The refresh engine's item-head prefixes are the top (a, b) by the head's probability mass, checked
    against an unpadded forward per user; `codes` keeps the code beam; `item_head` without a head fails."""
    import math

    from offline_worker.engine_interface import EngineConfig, ThinkRequest
    from offline_worker.hf_engine import HFEngine
    from offline_worker.prompts import PromptBuilder, answer_ids

    m = 4
    # think mode on purpose (`auto` serves this align-only model in direct mode): the head reads the context
    # after the reasoning
    opts = dict(samples=1, prefixes_per_sample=m, beam_a=2, max_reasoning_tokens=4, greedy=True, mode="think")
    eng = HFEngine(selected, root / "sid", EngineConfig(prefix_scores="auto", **opts), batch_size=2, threads=1)
    assert eng.head_prefixes is not None
    codes = HFEngine(selected, root / "sid", EngineConfig(prefix_scores="codes", **opts), batch_size=2)
    assert codes.head_prefixes is None
    with pytest.raises(ValueError, match="no item head"):
        HFEngine(root / "base", root / "sid", EngineConfig(prefix_scores="item_head", **opts))
    sid, ds = tiny_sid(), tiny_dataset(n_users=16)
    users = sorted(ds.sequences)[:5]
    reqs = [ThinkRequest(u, ids) for u, ids in PromptBuilder(eng.tokenizer, sid).build(
        (u, ds.sequences[u]) for u in users)]
    results = eng.think(reqs)
    assert eng.timings["head_s"] > 0 and eng.timings["level_a_s"] == 0
    for req, res in zip(reqs, results, strict=True):
        ctx = req.prompt_ids + res.reasoning_ids[0] + answer_ids(eng.tokenizer)
        with torch.no_grad():
            h = eng.model.base_model(input_ids=torch.tensor([ctx])).last_hidden_state[0, -1]
            p = torch.log_softmax(eng.head_prefixes.head.logits(h), -1).exp()
        mass: dict[tuple[int, int], float] = {}
        for row, c in enumerate(sid.codes):
            mass[(int(c[0]), int(c[1]))] = mass.get((int(c[0]), int(c[1])), 0.0) + float(p[row])
        want = sorted(mass.values(), reverse=True)[:m]
        got = res.prefixes
        assert len(got) == m and len({g[:2] for g in got}) == m
        for (a, b, s), w in zip(got, want, strict=True):
            assert abs(s - math.log(mass[(a, b)])) < 1e-4 and abs(s - math.log(w)) < 1e-4
    # a batch of mixed lengths (left padding) scores like one context at a time
    ctxs = [r.prompt_ids + answer_ids(eng.tokenizer) for r in reqs]
    assert eng.head_prefixes is not None
    batched = eng.head_prefixes.top(ctxs, m)
    for c, row in zip(ctxs, batched, strict=True):
        alone = eng.head_prefixes.top([c], m)[0]
        assert [x[:2] for x in row] == [x[:2] for x in alone]
        assert all(abs(x[2] - y[2]) < 1e-4 for x, y in zip(row, alone, strict=True))
