"""A think model that reads items like the online OneRec: one token per item, tied to the item head.

Checks the whole path on tiny data: the align stage adds the item tokens (contiguous, recorded in itemic.json),
warm-starts their rows from a OneRec checkpoint (dot products kept), trains them as the item head (the head's
logits are the LM's logits on the item rows), prompts carry each history item's token, and the offline
engine ranks prefixes with the tied head.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from think_fixtures import run_killed_then_resumed, tiny_dataset, tiny_sid, write_dataset

from model.onerec.config import OneRecConfig
from model.onerec.modeling import build_model, save_checkpoint
from model.semantic_ids import item_id_token
from model.think.__main__ import main as train_main
from model.think.align_data import direct_prefix
from model.think.checkpoint import load_think
from model.think.itemhead import TiedItemHead, load_head
from model.think.warm_start import onerec_item_table, project_items

TINY = ["--bpe-vocab", "300", "--hidden", "32", "--layers", "1", "--heads", "2", "--kv-heads", "1",
        "--head-dim", "16", "--intermediate", "64"]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("items")
    ds, sid = tiny_dataset(n_users=16), tiny_sid()
    write_dataset(ds, root / "data")
    sid.save(root / "sid")
    common = ["--data-dir", str(root / "data"), "--sid-dir", str(root / "sid")]
    torch.manual_seed(0)
    train_main(["base", "--out", str(root / "base"), "--steps", "1", "--batch-size", "4", *TINY, *common])
    onerec = build_model(OneRecConfig(d_model=16, n_layers=1, n_heads=2, d_ff=32), sid, seed=0)
    save_checkpoint(onerec, sid, root / "onerec")
    train_main(["align", "--init", str(root / "base"), "--out", str(root / "items"), "--tasks", "seq",
                "--warmup-steps", "0", "--refit-epochs", "2", "--batch-size", "4", "--save-every", "2",
                "--item-tokens", "--item-init", str(root / "onerec"), "--max-len", "400", *common])
    return root


def align_one_epoch(world: Path, name: str, *extra: str) -> Path:
    """One refit epoch of the item-token align stage from the world's base into ``world / name``, plus `extra`."""
    out = world / name
    train_main(["align", "--init", str(world / "base"), "--out", str(out), "--tasks", "seq", "--warmup-steps", "0",
                "--refit-epochs", "1", "--batch-size", "4", "--no-bf16", "--item-tokens", "--item-init",
                str(world / "onerec"), "--max-len", "400", "--data-dir", str(world / "data"),
                "--sid-dir", str(world / "sid"), *extra])
    return out


def test_item_tokens_are_recorded_and_tied(world: Path) -> None:
    model, tok, tm = load_think(world / "items")
    sid = tiny_sid()
    assert tm.has_items and tm.num_items == len(sid)
    meta = json.loads((world / "items" / "itemic.json").read_text())
    assert meta["item_offset"] == tm.item_offset and meta["num_items"] == len(sid)
    assert meta["stages"][-1]["fit"]["run"] == "refit"
    ids = tok.convert_tokens_to_ids([item_id_token(c) for c in sid.codes])
    assert ids == list(range(int(tm.item_offset or 0), int(tm.item_offset or 0) + len(sid)))
    head = load_head(world / "items", sid, model, tm)
    assert isinstance(head, TiedItemHead)
    h = torch.randn(3, model.config.hidden_size)
    lm = model.get_output_embeddings()(h)[:, ids]  # the LM head on the item rows ...
    assert torch.allclose(head.logits(h), lm, atol=1e-5)  # ... is the item head
    assert not (world / "items" / "item_head" / "weight.safetensors").exists()  # no second copy of the rows


def test_prompt_reads_each_history_item_token(world: Path) -> None:
    _, tok, tm = load_think(world / "items")
    sid = tiny_sid()
    hist = [sid.codes_of(i) for i in (3, 5, 7)]
    text = direct_prefix(hist, item_ids=True)
    got = tok(text, add_special_tokens=False)["input_ids"]
    items = [t for t in got if tm.item_offset <= t < tm.item_offset + tm.num_items]  # type: ignore[operator]
    assert items == [int(tm.item_offset or 0) + sid._row[i] for i in (3, 5, 7)]
    assert got[-1] == tm.item_begin  # the answer still starts with the code block


def test_warm_start_keeps_the_online_models_geometry(world: Path) -> None:
    sid = tiny_sid()
    table = onerec_item_table(world / "onerec", sid)
    out = project_items(table, 32, target_norm=2.0)
    assert out.shape == (len(sid), 32)
    assert abs(float(out.norm(dim=1).mean()) - 2.0) < 1e-4
    scale = float(out.norm(dim=1).mean() / table.norm(dim=1).mean())
    assert torch.allclose(out @ out.T, scale**2 * (table @ table.T), atol=1e-4)
    from model.semantic_ids import SemanticIDs

    other = SemanticIDs(sid.item_ids, np.asarray(sid.codes)[::-1].copy(), sid.config)  # same items, other codes
    with pytest.raises(ValueError, match="other semantic IDs"):
        onerec_item_table(world / "onerec", other)


def test_offline_engine_ranks_prefixes_with_the_tied_head(world: Path) -> None:
    from offline_worker.engine_interface import EngineConfig, ThinkRequest
    from offline_worker.hf_engine import HFEngine
    from offline_worker.prompts import PromptBuilder

    opts = dict(samples=1, prefixes_per_sample=4, beam_a=2, max_reasoning_tokens=4, greedy=True)
    eng = HFEngine(world / "items", world / "sid", EngineConfig(prefix_scores="auto", **opts), batch_size=2,
                   threads=1)
    assert eng.head_prefixes is not None and isinstance(eng.head_prefixes.head, TiedItemHead)
    ds, sid = tiny_dataset(n_users=16), tiny_sid()
    pb = PromptBuilder(eng.tokenizer, sid)
    assert pb.item_ids
    reqs = [ThinkRequest(u, ids) for u, ids in pb.build((u, ds.sequences[u]) for u in sorted(ds.sequences)[:3])]
    for res in eng.think(reqs):
        pairs = [p[:2] for p in res.prefixes]
        assert len(pairs) == 4 and len(set(pairs)) == 4
        valid = {(int(c[0]), int(c[1])) for c in np.asarray(sid.codes)}
        assert set(pairs) <= valid


def test_direct_mode_serves_a_model_without_reasoning(world: Path) -> None:
    """`auto` resolves to direct for an align-only model; direct results carry no reasoning and the prefixes
    of the direct prompt (history -> <|item_begin|>), the same as ranking that context by hand."""
    from offline_worker.engine_interface import EngineConfig, ThinkRequest, served_mode
    from offline_worker.hf_engine import HFEngine
    from offline_worker.prompts import PromptBuilder

    assert served_mode("auto", world / "items") == "direct" and served_mode("think", world / "items") == "think"
    opts = dict(samples=2, prefixes_per_sample=4, beam_a=2, max_reasoning_tokens=4, greedy=True)
    eng = HFEngine(world / "items", world / "sid", EngineConfig(mode="auto", **opts), batch_size=2, threads=1)
    assert eng.config.mode == "direct"
    ds, sid = tiny_dataset(n_users=16), tiny_sid()
    users = sorted(ds.sequences)[:3]
    reqs = [ThinkRequest(u, ids) for u, ids in PromptBuilder(eng.tokenizer, sid).build((u, ds.sequences[u])
                                                                                        for u in users)]
    res = eng.think(reqs)
    assert all(r.reasoning == "" and r.closed and r.truncated == 0 for r in res)
    _, tok, _ = load_think(world / "items")
    for u, r in zip(users, res, strict=True):
        hist = [sid.codes_of(i) for i in ds.sequences[u]]
        ctx = tok(direct_prefix(hist, item_ids=True), add_special_tokens=False)["input_ids"]
        assert eng.head_prefixes is not None
        # one deterministic path keeps the T x m cache budget (2 x 4)
        assert [p[:2] for p in r.prefixes] == [p[:2] for p in eng.head_prefixes.top([ctx], 8)[0]]
    with pytest.raises(ValueError, match="mode"):
        EngineConfig(mode="fast")


def test_offline_engine_stores_the_heads_top_items(world: Path) -> None:
    """With `items` = N the engine returns, per user, the item head's top-N items and their log-probs (the item
    log-softmax over the catalogue), as the think model scores them itself from the direct prompt (the decoder of
    `ThinkRecommender`, not the engine's pass); the refresh writes them into the entries; items=0 stores none."""
    from model.think.recommender import ThinkRecommender
    from offline_worker.engine_interface import EngineConfig, ThinkRequest
    from offline_worker.hf_engine import HFEngine
    from offline_worker.prompts import PromptBuilder
    from offline_worker.refresh import _entries

    opts = dict(samples=2, prefixes_per_sample=3, beam_a=2, max_reasoning_tokens=4, greedy=True, mode="direct")
    eng = HFEngine(world / "items", world / "sid", EngineConfig(items=5, **opts), batch_size=2, threads=1)
    ds, sid = tiny_dataset(n_users=16), tiny_sid()
    users = sorted(ds.sequences)[:4]
    reqs = [ThinkRequest(u, ids, ds.sequences[u])
            for u, ids in PromptBuilder(eng.tokenizer, sid).build((u, ds.sequences[u]) for u in users)]
    res = eng.think(reqs)
    rec = ThinkRecommender.load(world / "items", think=False, sid_dir=world / "sid")
    dec = rec.decoder
    assert dec.item_head is not None
    for u, r in zip(users, res, strict=True):
        b = dec.prefill(dec.encode_prefixes([rec.prefix(ds.sequences[u], think=False)], rec.max_len))
        assert b.hidden is not None
        lp, ix = torch.log_softmax(dec.item_head.logits(b.hidden), -1)[0].topk(5)
        assert [i for i, _ in r.items] == [int(sid.item_ids[j]) for j in ix.tolist()]
        assert [v for _, v in r.items] == pytest.approx(lp.tolist(), abs=1e-4)
    entries = _entries(res, {u: ds.sequences[u] for u in users}, "m")
    assert [entries[u].items for u in users] == [r.items for r in res]
    from offline_worker.__main__ import _settings_key

    assert _settings_key("hf", eng.config, world / "sid")["items"] == 5  # a version with items is another version
    assert "items" not in _settings_key("hf", EngineConfig(**opts), world / "sid")  # off: version names unchanged
    plain = HFEngine(world / "items", world / "sid", EngineConfig(**opts), batch_size=2, threads=1).think(reqs)
    assert all(r.items == [] for r in plain)
    assert [r.prefixes for r in plain] == [r.prefixes for r in res]  # the items change nothing else
    with pytest.raises(ValueError, match="items"):
        EngineConfig(items=-1)


def test_direct_mode_explains_with_the_think_prompts_rationale_and_the_same_prefixes(world: Path) -> None:
    """`explain` in direct mode stores, per user, the greedy rationale the think mode decodes from the same
    history (think mode's path 0, token for token), while the prefixes stay exactly the direct ranking's; the
    version is named apart only when on; think mode rejects it (it stores its own reasoning)."""
    from offline_worker.__main__ import _settings_key
    from offline_worker.engine_interface import EngineConfig, ThinkRequest
    from offline_worker.hf_engine import HFEngine
    from offline_worker.prompts import PromptBuilder
    from offline_worker.refresh import UNCLOSED_REASONING, _entries

    opts = dict(samples=2, prefixes_per_sample=3, beam_a=2, max_reasoning_tokens=6, greedy=True)
    ds, sid = tiny_dataset(n_users=16), tiny_sid()
    users = sorted(ds.sequences)[:4]

    def think(**cfg: object) -> list:
        eng = HFEngine(world / "items", world / "sid", EngineConfig(**{**opts, **cfg}), batch_size=2, threads=1)  # type: ignore[arg-type]
        reqs = [ThinkRequest(u, ids, ds.sequences[u])
                for u, ids in PromptBuilder(eng.tokenizer, sid).build((u, ds.sequences[u]) for u in users)]
        return eng.think(reqs)

    plain, explained, thought = think(mode="direct"), think(mode="direct", explain=True), think(mode="think")
    assert [r.prefixes for r in explained] == [r.prefixes for r in plain]
    assert all(r.reasoning == "" for r in plain)
    assert [r.reasoning_ids[0] for r in explained] == [r.reasoning_ids[0] for r in thought]
    assert [r.reasoning for r in explained] == [r.reasoning for r in thought]
    assert any(r.reasoning for r in explained)
    assert [(r.closed, r.truncated) for r in explained] == [(r.closed, int(not r.closed)) for r in thought]
    entries = _entries(explained, {u: ds.sequences[u] for u in users}, "m")
    assert [entries[u].reasoning for u in users] == [r.reasoning if r.closed else UNCLOSED_REASONING for r in explained]
    # grounded: every rationale closes under the user's grammar, and is the think mode's, word for word
    grounded = dict(grounded_reasoning=True, grounding_data=str(world / "data"))
    g_explained, g_thought = think(mode="direct", explain=True, **grounded), think(mode="think", **grounded)
    assert all(r.closed and r.reasoning for r in g_explained)
    assert [r.reasoning for r in g_explained] == [r.reasoning for r in g_thought]
    assert [r.prefixes for r in g_explained] == [r.prefixes for r in plain]
    assert _settings_key("hf", EngineConfig(mode="direct", explain=True, **opts), world / "sid")["explain"] is True
    assert "explain" not in _settings_key("hf", EngineConfig(mode="direct", **opts), world / "sid")
    with pytest.raises(ValueError, match="explain"):
        EngineConfig(mode="think", explain=True)


def test_ahead_loss_pairs_each_item_with_the_one_after_next(world: Path) -> None:
    """The ahead term asks position k for target k+1 within one text, never across texts; `next_weight` scales
    the next-item term (0: the after-next item only)."""
    import torch.nn.functional as F

    from model.think.align_data import HISTORY_TAG
    from model.think.fit import lm_and_item_loss
    from model.think.itemhead import item_loss, targets_at_item_begin
    from model.think.sft import collate

    model, tok, tm = load_think(world / "items")
    sid = tiny_sid()
    row_of = {tuple(int(x) for x in c): r for r, c in enumerate(sid.codes)}
    texts = [[3, 5, 7], [2, 9]]
    rows = []
    for t in texts:
        prompt = tok(HISTORY_TAG, add_special_tokens=False)["input_ids"]
        body = tok(direct_prefix([sid.codes_of(i) for i in t], item_ids=True)[len(HISTORY_TAG):-len("<|item_begin|>")],
                   add_special_tokens=False)["input_ids"]
        rows.append((prompt + body, len(prompt)))
    ids, att, labels = collate(rows, int(tok.pad_token_id))
    head = load_head(world / "items", sid, model, tm)
    assert head is not None
    with torch.no_grad():
        _, plain = lm_and_item_loss(model, head, ids, att, labels, tm, row_of, 1.0, 0.0)
        _, both = lm_and_item_loss(model, head, ids, att, labels, tm, row_of, 1.0, 0.5)
        _, after_only = lm_and_item_loss(model, head, ids, att, labels, tm, row_of, 1.0, 0.5, next_weight=0.0)
        h = model.base_model(input_ids=ids, attention_mask=att).last_hidden_state
        pos, tgt = targets_at_item_begin(ids, labels, tm, row_of)
        assert tgt.tolist() == [sid._row[i] for t in texts for i in t]
        pairs = [0, 1, 3]  # 3 -> 5, 5 -> 7 and 2 -> 9; 7 -> 2 would cross texts
        want = [sid._row[i] for i in (5, 7, 9)]
        logits = head.logits(h[pos[pairs, 0], pos[pairs, 1]])
        ahead = F.cross_entropy(logits, torch.tensor(want))
    assert torch.allclose(plain, item_loss(head, h, pos, tgt))
    assert torch.allclose(both, plain + 0.5 * ahead, atol=1e-5)
    assert torch.allclose(after_only, 0.5 * ahead, atol=1e-5)  # `--next-weight 0`: the after-next item only


def test_killed_item_token_run_resumes_to_the_same_weights(world: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The align stage with item tokens resumes after a kill: the item tokens are added again, the trainer state
    (item rows included) is restored, and the result equals an uninterrupted run."""
    common = ["--data-dir", str(world / "data"), "--sid-dir", str(world / "sid")]

    def args(out: Path) -> list[str]:
        return ["align", "--init", str(world / "base"), "--out", str(out), "--tasks", "seq", "--warmup-steps", "0",
                "--refit-epochs", "2", "--batch-size", "4", "--save-every", "2", "--no-bf16", "--item-tokens",
                "--item-init", str(world / "onerec"), "--ahead-weight", "0.5", "--max-len", "400", *common]

    whole, killed = world / "whole", world / "killed"
    train_main(args(whole))
    # killed mid epoch 2 (4 steps per epoch), after the step-6 checkpoint
    st = run_killed_then_resumed(train_main, args(killed), killed, monkeypatch)
    assert (st["epoch"], st["step"]) == (1, 2)
    a, b = load_think(whole), load_think(killed)
    assert a[2] == b[2] and b[2].has_items
    for (n, p), (_, q) in zip(a[0].named_parameters(), b[0].named_parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6), n


def test_item_step_scale_keeps_or_slows_the_item_rows(world: Path) -> None:
    """`--item-step-scale 0` trains everything but the warm-started item rows; a scale s moves the rows s of
    the way of the optimizer's step (`model.think.fit.scaled_item_step`)."""
    from model.think.fit import scaled_item_step

    out = align_one_epoch(world, "fixed-rows", "--item-step-scale", "0")
    fixed, _, tm = load_think(out)
    moved, _, _ = load_think(world / "items")  # the same recipe with the plain step (scale 1)
    sid = tiny_sid()
    fixed_rows = load_head(out, sid, fixed, tm).weight  # type: ignore[union-attr]
    moved_rows = load_head(world / "items", sid, moved, tm).weight  # type: ignore[union-attr]
    table = onerec_item_table(world / "onerec", sid)

    def is_warm_start(rows: torch.Tensor) -> bool:
        """The warm start keeps every dot product of the OneRec table up to one scale (`project_items`)."""
        gram, want = rows.detach() @ rows.detach().T, table @ table.T
        return torch.allclose(gram, want * (gram.trace() / want.trace()), atol=1e-4)

    assert is_warm_start(fixed_rows)  # never moved
    assert not is_warm_start(moved_rows)  # the plain step moves them
    base, _, _ = load_think(world / "base")
    norm_w = "model.norm.weight"
    assert not torch.equal(dict(fixed.named_parameters())[norm_w], dict(base.named_parameters())[norm_w])

    # one step, by hand: s = 0.5 lands half way
    head = TiedItemHead(fixed, tm)
    before = head.weight.detach().clone()
    opt = torch.optim.SGD([fixed.get_input_embeddings().weight], lr=1.0)
    fixed.get_input_embeddings().weight.grad = torch.ones_like(fixed.get_input_embeddings().weight)
    with scaled_item_step(head, 0.5):
        opt.step()
    assert torch.allclose(head.weight, before - 0.5, atol=1e-6)


def test_dropout_acts_in_training_only_and_leaves_a_plain_model(world: Path, monkeypatch: pytest.MonkeyPatch
                                                                  ) -> None:
    """`--dropout p` drops the input embeddings and every layer's attention / MLP output while training
    (`model.think.fit.residual_dropout`); eval-mode outputs are unchanged, the hooks come off after training and
    the saved folder loads as a plain HF model (what vLLM reads)."""
    from model.think.fit import residual_dropout

    model, _, _ = load_think(world / "items")
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    model.eval()
    plain = model(ids).logits
    hooks = residual_dropout(model, 0.5)
    assert len(hooks) == 1 + 2 * model.config.num_hidden_layers  # embeddings + attention and MLP per layer
    assert torch.equal(model(ids).logits, plain)  # eval: no dropout
    model.train()
    torch.manual_seed(0)
    assert not torch.allclose(model(ids).logits, plain)
    for h in hooks:
        h.remove()
    assert torch.equal(model(ids).logits, plain)  # hooks off: training mode computes the same as eval again
    with pytest.raises(ValueError):
        residual_dropout(model, 1.0)

    # the training run registers the hooks on its model and takes them off when it ends (`fit`'s finally)
    import model.think.fit as fit_module

    seen: list[tuple[torch.nn.Module, list]] = []

    def recording(m: torch.nn.Module, p: float) -> list:
        handles = residual_dropout(m, p)
        seen.append((m, handles))
        return handles

    monkeypatch.setattr(fit_module, "residual_dropout", recording)
    out = align_one_epoch(world, "dropout", "--dropout", "0.3")
    (trained_in_memory, handles), = seen
    assert len(handles) == 1 + 2 * trained_in_memory.config.num_hidden_layers
    assert all(not m._forward_hooks for m in trained_in_memory.modules())
    load_think(out)  # the saved folder loads as a plain model
    with pytest.raises(SystemExit):
        align_one_epoch(world, "bad", "--dropout", "1.5")


def test_prefix_mixture_of_the_think_head_and_the_online_model(world: Path) -> None:
    """`OneRec.prefix_logprobs` is a distribution over the trie's (a, b) prefixes (the rule of `own_prefixes`);
    `evaluation.prefix_recall.online_ranked_prefixes` at weight 1 is the think head's own ranking, at 0 the online
    model's; `prefix-recall --mix W` reports the mixture."""
    from evaluation.prefix_recall import main as pr_main
    from evaluation.prefix_recall import online_ranked_prefixes
    from model.onerec import OneRec
    from model.think.recommender import ThinkRecommender
    from services.catalog import load_dataset

    onerec = OneRec.load(world / "onerec")
    rec = ThinkRecommender.load(world / "items", think=False, sid_dir=world / "sid")
    hist = [e.history for e in load_dataset(world / "data").splits.test][:6]
    pref = np.unique(np.asarray(tiny_sid().codes)[:, :2], axis=0)
    lp = onerec.prefix_logprobs(hist, pref)  # (6, M)
    assert torch.allclose(lp.exp().sum(1), torch.ones(len(hist)), atol=1e-5)  # every trie prefix, once
    own = onerec.own_prefixes(hist, 3)
    col = {(int(a), int(b)): i for i, (a, b) in enumerate(pref)}
    for u, pairs in enumerate(own):  # own_prefixes' pairs come out best first under the same scores
        scores = [float(lp[u, col[p]]) for p in pairs]
        assert scores == sorted(scores, reverse=True)
    # by hand for user 0, prefix 0: log p(a) + log p(b | a), both renormalised over the trie
    h = onerec._last_hidden(hist[:1])
    a, b = int(pref[0][0]), int(pref[0][1])
    lb, _ = onerec._level_b(h, torch.tensor([a]))
    assert abs(float(onerec._level_a(h)[0, a] + lb[0, b]) - float(lp[0, 0])) < 1e-5

    head_only = rec.top_prefixes(hist, 4)["item_head"]
    assert online_ranked_prefixes(rec, onerec, hist, 4, weight=1.0, batch_size=4) == head_only
    online_only = online_ranked_prefixes(rec, onerec, hist, 4, weight=0.0)
    assert [p[0] for p in online_only] == [max(col, key=lambda c: float(lp[u, col[c]])) for u in range(len(hist))]
    mixed = online_ranked_prefixes(rec, onerec, hist, 4, weight=0.5)
    assert all(len(m) == 4 and len(set(m)) == 4 for m in mixed)

    out = world / "mix.json"
    pr_main(["--checkpoint", str(world / "items"), "--onerec", str(world / "onerec"), "--mode", "direct", "--stale",
             "--mix", "0.5", "--data-dir", str(world / "data"), "--p", "2,4", "--out-json", str(out)])
    doc = json.loads(out.read_text())
    assert doc["mix"] == 0.5 and "think_mix@4" in doc["recall"] and "think_mix_vs_onerec@4" in doc["paired"]


def test_offline_engine_caches_the_contrasted_ranking(world: Path) -> None:
    """With `contrast` > 0 the refresh engine caches the prefixes `prefix-recall --contrast` measures
    (`online_ranked_prefixes` with `contrast`: log p_think - B log p_online), in that order, each stored with the
    head's own log mass (not the ranking score); `--union-own` reports the served reach; a contrast without an online
    model is refused."""
    from evaluation.prefix_recall import main as pr_main
    from evaluation.prefix_recall import online_ranked_prefixes
    from model.onerec import OneRec
    from model.think.recommender import ThinkRecommender
    from offline_worker.__main__ import _settings_key
    from offline_worker.engine_interface import EngineConfig, ThinkRequest
    from offline_worker.hf_engine import HFEngine
    from offline_worker.prompts import PromptBuilder

    opts = dict(samples=2, prefixes_per_sample=3, beam_a=2, max_reasoning_tokens=4, greedy=True, mode="direct")
    eng = HFEngine(world / "items", world / "sid", EngineConfig(mix_onerec=str(world / "onerec"), contrast=2.0, **opts),
                   batch_size=2, threads=1)
    ds = tiny_dataset(n_users=16)
    users = sorted(ds.sequences)[:5]
    pb = PromptBuilder(eng.tokenizer, tiny_sid())
    reqs = [ThinkRequest(u, ids, ds.sequences[u]) for u, ids in pb.build((u, ds.sequences[u]) for u in users)]
    res = eng.think(reqs)
    got = [[p[:2] for p in r.prefixes] for r in res]
    rec = ThinkRecommender.load(world / "items", think=False, sid_dir=world / "sid")
    hist = [ds.sequences[u] for u in users]
    assert got == online_ranked_prefixes(rec, OneRec.load(world / "onerec"), hist, 6, contrast=2.0)
    head_only = [[p[:2] for p in r.prefixes] for r in HFEngine(world / "items", world / "sid", EngineConfig(**opts),
                                                               batch_size=2, threads=1).think(reqs)]
    assert got != head_only  # the contrast moved the ranking (the test can tell the two apart)
    pref, mass = rec.prefix_logmass(hist)
    row = {(int(a), int(b)): j for j, (a, b) in enumerate(pref)}
    for i, r in enumerate(res):  # stored: the think head's log mass of each cached prefix
        assert [p[2] for p in r.prefixes] == pytest.approx([float(mass[i, row[p[:2]]]) for p in r.prefixes], abs=1e-4)
    assert _settings_key("hf", eng.config, world / "sid")["contrast"] == 2.0
    assert "contrast" not in _settings_key("hf", EngineConfig(**opts), world / "sid")  # off: version names unchanged
    with pytest.raises(ValueError, match="mix_onerec is empty"):
        EngineConfig(contrast=0.5)
    with pytest.raises(ValueError, match="contrast"):
        EngineConfig(mix_onerec=str(world / "onerec"), contrast=-1.0)
    out = world / "contrast.json"
    pr_main(["--checkpoint", str(world / "items"), "--onerec", str(world / "onerec"), "--mode", "direct", "--stale",
             "--contrast", "2", "--union-own", "2", "--data-dir", str(world / "data"), "--p", "2,4", "--out-json",
             str(out)])
    doc = json.loads(out.read_text())
    assert doc["contrast"] == 2.0 and "think_contrast@4" in doc["recall"]
    union = doc["union"]["think_contrast+own2_vs_onerec@6"]
    assert union["users"] == doc["users"] and "recall@6_diff_ci95" in union
    from evaluation.prefix_recall import result_metrics

    assert result_metrics(doc)["think_contrast+own2_vs_onerec_diff@6"] == union["recall@6_diff"]


def test_offline_engine_caches_the_mixed_ranking(world: Path) -> None:
    """With `mix_onerec` the refresh engine caches the same prefixes, in the same order, as the mixture that
    `prefix-recall --mix` measures (`online_ranked_prefixes`), from each request's own history; a request without its
    history is refused, as is a mixture without an item head."""
    from evaluation.prefix_recall import online_ranked_prefixes
    from model.onerec import OneRec
    from model.think.recommender import ThinkRecommender
    from offline_worker.engine_interface import EngineConfig, ThinkRequest
    from offline_worker.hf_engine import HFEngine
    from offline_worker.prompts import PromptBuilder

    opts = dict(samples=2, prefixes_per_sample=3, beam_a=2, max_reasoning_tokens=4, greedy=True, mode="direct")
    eng = HFEngine(world / "items", world / "sid",
                   EngineConfig(mix_onerec=str(world / "onerec"), mix_weight=0.3, **opts), batch_size=2, threads=1)
    ds, sid = tiny_dataset(n_users=16), tiny_sid()
    users = sorted(ds.sequences)[:5]
    pb = PromptBuilder(eng.tokenizer, sid)
    reqs = [ThinkRequest(u, ids, ds.sequences[u]) for u, ids in pb.build((u, ds.sequences[u]) for u in users)]
    got = [[p[:2] for p in r.prefixes] for r in eng.think(reqs)]
    rec = ThinkRecommender.load(world / "items", think=False, sid_dir=world / "sid")
    want = online_ranked_prefixes(rec, OneRec.load(world / "onerec"), [ds.sequences[u] for u in users], 6, weight=0.3)
    assert got == want
    head_only = [[p[:2] for p in r.prefixes] for r in HFEngine(world / "items", world / "sid", EngineConfig(**opts),
                                                               batch_size=2, threads=1).think(reqs)]
    assert got != head_only  # the online model moved the ranking (the test can tell the two apart)
    with pytest.raises(ValueError, match="history"):
        eng.think([ThinkRequest(users[0], reqs[0].prompt_ids)])
    # think mode: T sampled paths per user share one history; the online model runs once per distinct history
    think = HFEngine(world / "items", world / "sid", EngineConfig(**{**opts, "mode": "think", "greedy": False},
                     mix_onerec=str(world / "onerec")), batch_size=2, threads=1)
    assert think.head_prefixes is not None and think.head_prefixes.mix is not None
    online = think.head_prefixes.mix[0]
    seen: list[int] = []
    real = online.prefix_logprobs
    online.prefix_logprobs = lambda h, pref: (seen.append(len(h)), real(h, pref))[1]  # type: ignore[method-assign]
    res = think.think(reqs)
    assert seen == [len(users)] and all(len(r.per_sample) == 2 for r in res)
    # a version names the online model by content, like the think model (shards on other mounts agree)
    from offline_worker.__main__ import _settings_key
    from offline_worker.engine_interface import model_id

    key = _settings_key("hf", eng.config, world / "sid")
    assert key["mix_onerec"] == model_id(world / "onerec") and key["mix_weight"] == 0.3
    with pytest.raises(ValueError, match="mix"):
        EngineConfig(mix_onerec=str(world / "onerec"), prefix_scores="codes")
    # an online model trained on other codes is refused, not mixed row by wrong row
    other = tiny_sid()
    other.codes[[0, 1]] = other.codes[[1, 0]]
    save_checkpoint(build_model(OneRecConfig(d_model=16, n_layers=1, n_heads=2, d_ff=32), other, seed=0), other,
                    world / "onerec-other-codes")
    with pytest.raises(ValueError, match="semantic IDs differ"):
        HFEngine(world / "items", world / "sid", EngineConfig(mix_onerec=str(world / "onerec-other-codes"), **opts),
                 batch_size=2, threads=1)
    with pytest.raises(ValueError, match="mix_weight"):
        EngineConfig(mix_onerec=str(world / "onerec"), mix_weight=1.5)


def test_choose_mode_records_the_better_validation_mode_for_these_weights_only(world: Path, tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """`evaluation think choose-mode` runs both modes on the same validation users and records the better one;
    `auto` (the refresh and the evaluation alike) then serves it; a later stage's copy does not inherit it."""
    import shutil

    from evaluation.think import main as eval_main
    from model.think.checkpoint import chosen_mode, read_itemic, record_mode
    from model.think.recommender import ThinkRecommender
    from offline_worker.engine_interface import served_mode

    folder = tmp_path / "items"
    shutil.copytree(world / "items", folder)
    assert served_mode("auto", folder) == "direct"  # align-only: direct, nothing chosen yet
    common = ["--checkpoint", str(folder), "--data-dir", str(world / "data"), "--beam", "10", "--max-think", "4",
              "--code-weight", "0", "--threads", "1", "--limit", "12"]
    runs = {}
    for m in ("direct", "think"):
        out = tmp_path / f"{m}.json"
        eval_main(["run", *common, "--mode", m, "--split", "valid", "--show", "0", "--out-json", str(out)])
        runs[m] = json.loads(out.read_text())
    assert {r["split"] for r in runs.values()} == {"valid"} and runs["direct"]["users"] == 12
    eval_main(["choose-mode", *common, "--out-json", str(tmp_path / "choice.json")])
    rec = read_itemic(folder)["served_mode"]
    key = {m: (r["metrics"]["recall@10"], r["metrics"]["ndcg@10"]) for m, r in runs.items()}
    assert rec["mode"] == ("think" if key["think"] > key["direct"] else "direct")
    assert rec["metrics"] == {m: r["metrics"] for m, r in runs.items()} and rec["users"] == 12
    assert rec["valid_seen"] is True  # the world's folder was refit on train + valid: its choice says so
    assert json.loads((tmp_path / "choice.json").read_text())["mode"] == rec["mode"]
    # the rule itself, both ways: the better R@10 wins, then N@10; a tie goes to direct
    import evaluation.think as et

    for think_m, want in (((0.3, 0.1), "think"), ((0.2, 0.2), "think"), ((0.2, 0.1), "direct"), ((0.1, 0.3), "direct")):
        fake = {"direct": (0.2, 0.1), "think": think_m}
        monkeypatch.setattr(et, "run", lambda a, f=fake: {**runs[a.mode], "metrics": {
            "recall@10": f[a.mode][0], "ndcg@10": f[a.mode][1]}})
        eval_main(["choose-mode", *common, "--dry-run", "--out-json", str(tmp_path / "fake.json")])
        assert json.loads((tmp_path / "fake.json").read_text())["mode"] == want, (think_m, want)
    monkeypatch.undo()
    assert read_itemic(folder)["served_mode"] == rec  # --dry-run wrote nothing
    # the record wins over the training history, in the refresh and in the evaluation's auto mode
    for mode in ("think", "direct"):
        record_mode(folder, {"mode": mode})
        assert served_mode("auto", folder) == mode and served_mode("direct", folder) == "direct"
        assert ThinkRecommender.load(folder, beam=10).think is (mode == "think")
    # a later stage copies the folder and adds a stage: the choice was for other weights
    meta = read_itemic(folder)
    meta["stages"] = meta["stages"] + [{"stage": "activate"}]
    assert chosen_mode(meta) is None
    with pytest.raises(ValueError, match="mode must be one of"):
        record_mode(folder, {"mode": "auto"})
    # the ablation file names each arm's mode, and keeps the +IA+R weights' other mode when given
    import services.results

    monkeypatch.setattr(services.results, "results_location",
                        lambda dataset=None: (tmp_path / "results", tmp_path / "RESULTS.md", "beauty"))
    d, t = str(tmp_path / "direct.json"), str(tmp_path / "think.json")
    eval_main(["ablation", "--base-json", d, "--ia-json", d, "--ia-r-json", d, "--ia-r-other-json", t])
    doc = json.loads((tmp_path / "results" / "think_ablation.json").read_text())
    assert doc["metrics"]["mode"] == {"base": "direct", "ia": "direct", "ia_r": "direct", "ia_r_other_mode": "think"}
    assert doc["metrics"]["ia_r_other_mode"] == {k: runs["think"]["metrics"][k] for k in doc["metrics"]["ia_r"]}
    assert "ia_r direct" in doc["note"] and "ia_r_other_mode think" in doc["note"]


def test_activation_loss_trains_the_item_head_after_the_rationale(world: Path) -> None:
    """With item tokens, the activation loss is LM + item cross-entropy at the ``<|item_begin|>`` that follows
    ``</think>`` (the position think mode ranks from), through a LoRA wrapper, and its item term reaches the adapter."""
    from peft import LoraConfig, get_peft_model

    from model.think.align_data import Sample, generation_prefix, think_target
    from model.think.fit import item_aware_loss, lm_and_item_loss, row_index
    from model.think.itemhead import targets_at_item_begin
    from model.think.sft import collate, tokenize
    from model.think.stages import LORA_TARGETS

    model, tok, tm = load_think(world / "items")
    sid = tiny_sid()
    hist, target = [3, 5, 7], 9
    sample = Sample(generation_prefix([sid.codes_of(i) for i in hist], item_ids=True),
                    think_target("likes nail art. next: nail art.", sid.codes_of(target)), "think")
    ids, att, labels = collate(tokenize([sample], tok, 400), int(tok.pad_token_id))
    pos, rows = targets_at_item_begin(ids, labels, tm, row_index(sid))
    think_end = int(tok.convert_tokens_to_ids("</think>"))
    assert rows.tolist() == [sid._row[target]]  # one labelled block: the target after the rationale ...
    assert int(ids[0, int(pos[0, 1]) - 1]) == think_end  # ... right after </think>
    head = load_head(world / "items", sid, model, tm)
    assert head is not None
    with torch.no_grad():
        lm, il = lm_and_item_loss(model, head, ids, att, labels, tm, row_index(sid), 1.0)
    assert float(il) > 0
    wrapped = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LORA_TARGETS,
                                               task_type="CAUSAL_LM"))
    loss = item_aware_loss(tm, sid, 0.5)(wrapped, ids, att, labels)
    assert torch.allclose(loss, lm + 0.5 * il, atol=1e-5)  # a fresh adapter (B = 0) changes nothing

    def lora_b_grads(value: torch.Tensor) -> list[torch.Tensor]:
        wrapped.zero_grad(set_to_none=True)
        value.backward()
        return [p.grad.clone() for n, p in wrapped.named_parameters() if "lora_B" in n and p.grad is not None]

    with_item = lora_b_grads(loss)
    hf = wrapped.get_base_model()
    lm_only = lora_b_grads(lm_and_item_loss(hf, TiedItemHead(hf, tm), ids, att, labels, tm, row_index(sid), 0.0)[0])
    assert with_item and len(with_item) == len(lm_only)
    assert any(not torch.allclose(a, b) for a, b in zip(with_item, lm_only, strict=True))  # the item term moves it


def test_activation_rehearses_direct_sequences_with_the_item_loss(world: Path, monkeypatch: pytest.MonkeyPatch
                                                                  ) -> None:
    """`activate --direct-share S --item-loss-weight W`: the mix holds S of sequence texts in the direct layout, every
    step goes through the item-aware loss, and the stage record says so; without the flags the LM loss alone runs."""
    import model.think.fit as fit_mod
    from model.think.activate_data import rehearsal_samples

    calls = {"n": 0}
    real = fit_mod.lm_and_item_loss

    def counted(*a: object, **k: object) -> tuple[torch.Tensor, torch.Tensor]:
        calls["n"] += 1
        return real(*a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(fit_mod, "lm_and_item_loss", counted)
    common = ["--data-dir", str(world / "data"), "--sid-dir", str(world / "sid"), "--embeddings", "bow",
              "--cache-dir", str(world / "cache"), "--lora-r", "4", "--batch-size", "4", "--max-len", "400"]
    out = world / "act-rehearse"
    train_main(["activate", "--init", str(world / "items"), "--out", str(out), "--steps", "3", "--item-loss-weight",
                "1.0", "--ahead-weight", "1.0", "--direct-share", "0.5", "--dropout", "0.2", *common])
    rec = json.loads((out / "itemic.json").read_text())["stages"][-1]
    assert calls["n"] == 3
    assert rec["rehearsal"] == rec["samples"] > 0  # share 0.5: as many sequence texts as reasoning samples
    assert rec["direct_share"] == 0.5 and rec["item_loss_weight"] == 1.0 and rec["dropout"] == 0.2
    seqs = rehearsal_samples({u: [1, 2, 3] for u in range(4)}, tiny_sid(), n_think=12, share=0.75)
    assert len(seqs) == 36 and all(s.task == "seq" for s in seqs)  # with replacement past the 4 sequences
    with pytest.raises(ValueError, match="share"):
        rehearsal_samples({}, tiny_sid(), 10, 1.0)
    calls["n"] = 0
    train_main(["activate", "--init", str(world / "items"), "--out", str(world / "act-plain"), "--steps", "2", *common])
    plain = json.loads((world / "act-plain" / "itemic.json").read_text())["stages"][-1]
    assert calls["n"] == 0 and plain["rehearsal"] == 0


def test_enhance_rewards_what_the_served_think_mode_ranks(world: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`enhance --reward head` scores the item head's top --beam items after each rationale (what think mode serves
    with --code-weight 0), never the code beam; the default scores the code beam, never the head."""
    from model.think.decode import Decoder

    common = ["--data-dir", str(world / "data"), "--sid-dir", str(world / "sid"), "--max-len", "400"]
    act = world / "act-for-rl"
    train_main(["activate", "--init", str(world / "items"), "--out", str(act), "--steps", "1", "--batch-size", "4",
                "--embeddings", "bow", "--cache-dir", str(world / "cache"), "--lora-r", "4", *common])
    used: list[str] = []
    real_head, real_beam = Decoder.head_candidates, Decoder.beam_codes

    def head(self: Decoder, *a: object, **k: object) -> object:
        used.append("head")
        return real_head(self, *a, **k)  # type: ignore[arg-type]

    def beam(self: Decoder, *a: object, **k: object) -> object:
        used.append("beam")
        return real_beam(self, *a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(Decoder, "head_candidates", head)
    monkeypatch.setattr(Decoder, "beam_codes", beam)
    rl = ["enhance", "--init", str(act), "--steps", "2", "--batch-size", "2", "--group", "2", "--beam", "4",
          "--max-think", "6", *common]
    train_main([*rl, "--out", str(world / "rl-head"), "--reward", "head"])
    assert used == ["head", "head"]
    rec = json.loads((world / "rl-head" / "itemic.json").read_text())["stages"][-1]
    assert rec["reward"] == "head" and rec["reward_first"] is not None
    used.clear()
    train_main([*rl, "--out", str(world / "rl-beam")])
    assert used == ["beam", "beam"]
