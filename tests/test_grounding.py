"""Grounded rationales (`model.think.grounding`): the per-user grammar, the teacher's format, and the HF
engine decoding under it (the vLLM engine under the same grammar: tests/test_offline_engine.py)."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

import pytest
from offline_helpers import TinyWorld, build_world
from think_fixtures import tiny_dataset, tiny_sid

from model.think.grounding import Grounding, accepts, parse, short_title
from offline_worker.hf_engine import HFEngine
from services.catalog import load_items


@pytest.fixture(scope="module")
def grounding() -> Grounding:
    return Grounding.build(tiny_dataset().catalog, tiny_sid())


def test_grammar_accepts_own_items_and_rejects_an_invented_one(grounding: Grounding) -> None:
    history = [13, 11, 6]
    g = grounding.grammar(history)
    cat = grounding.category(13)
    other_cat = next(c for c in grounding.categories() if c not in {grounding.category(i) for i in history})
    own = f'recently "{grounding.titles[6]}" and "{grounding.titles[13]}". likes {cat}. next: {cat}.'
    assert accepts(g, own) and accepts(g, own.replace(f"next: {cat}", f"next: {other_cat}"))  # any prediction
    other = next(i for i in grounding.titles if i not in history)  # a real catalogue item, not the user's
    twice = f'recently "{grounding.titles[6]}" and "{grounding.titles[6]}". likes {cat}. next: {cat}.'
    assert not accepts(g, twice) and not accepts(g, own.replace(f"likes {cat}", f"likes {cat} and {cat}"))
    for bad in (own.replace(grounding.titles[6], "olay regenerist"), own.replace(grounding.titles[6],
                grounding.titles[other]), own.replace(f"likes {cat}", "likes lipsticks"),
                own.replace(f"likes {cat}", f"likes {other_cat}"), own[:-1]):  # a taste the history lacks
        assert not accepts(g, bad), bad


def test_likes_names_only_categories_of_the_recent_items(grounding: Grounding) -> None:
    from model.think.grounding import RECENT

    items = sorted(grounding.titles)
    old = items[0]  # bought long ago: its category is not a current taste
    recent = [i for i in items if grounding.category(i) != grounding.category(old)][:RECENT]
    assert len(recent) == RECENT
    g = grounding.grammar([old, *recent])
    now, then = grounding.category(recent[-1]), grounding.category(old)
    named = f'recently "{grounding.titles[recent[-1]]}". '
    assert accepts(g, f"{named}likes {now}. next: {then}.")  # an old taste may still be the prediction
    assert not accepts(g, f"{named}likes {then}. next: {now}.")


def test_grammar_without_known_history_claims_nothing_about_the_user(grounding: Grounding) -> None:
    g = grounding.grammar([999])  # unknown item: nothing to name, no known taste
    cat = grounding.categories()[-1]
    assert accepts(g, f"next: {cat}.") and parse(f"next: {cat}.").well_formed
    assert not accepts(g, f"likes {cat}. next: {cat}.")
    assert not accepts(g, f'recently "{grounding.titles[1]}". likes {cat}. next: {cat}.')


def test_longest_rationale_is_in_the_grammar_and_bounds_every_other(grounding: Grounding) -> None:
    """`longest` (the reasoning budget of a grounded decode) is a rationale of the grammar, and no rationale the
    grammar accepts is longer: here every one the teacher writes, for each grammar shape."""
    ds = tiny_dataset()
    for history in ([999], [13, 11, 6], *(seq[:-1] for seq in ds.splits.train.values())):
        longest = grounding.longest(history)
        assert accepts(grounding.grammar(history), longest), longest
        texts = [grounding.teach(history, history[-k:], t) for k in (1, 2, 3) for t in list(grounding.titles)[:5]]
        assert all(len(t.encode()) <= len(longest.encode()) for t in texts if accepts(grounding.grammar(history), t))
    assert grounding.longest([999]).startswith("next: ")


def test_teacher_rationale_is_in_the_users_grammar_and_parses_back(grounding: Grounding) -> None:
    ds = tiny_dataset()
    for user, seq in ds.splits.train.items():
        history, target = seq[:-1], seq[-1]
        text = grounding.teach(history, history[-3:], target)
        assert accepts(grounding.grammar(history), text), text
        r = parse(text)
        assert r.well_formed and r.next == grounding.category(target)
        items, grounded = grounding.grounded_items(text, history)
        assert grounded and all(s & set(history) for s in items), (user, text)


def test_parse_free_text_counts_mentions_only() -> None:
    r = parse('the user buys "olay regenerist" stuff')
    assert r.mentions == ["olay regenerist"] and not r.well_formed and r.likes == []
    assert short_title("Olay Regenerist, Micro-Sculpting Cream 1.7 oz") == "olay regenerist micro sculpting"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> TinyWorld:
    return build_world(tmp_path_factory.getbasetemp() / "offline_world")  # the one test_offline_engine builds


@pytest.fixture(scope="module")
def grounded_hf(world: TinyWorld) -> HFEngine:
    from offline_worker.engine_interface import EngineConfig

    # a free-reasoning budget far below any rationale: grounded decoding uses its grammar's bound instead
    cfg = EngineConfig(samples=2, prefixes_per_sample=4, beam_a=2, max_reasoning_tokens=4, mode="think",
                       grounded_reasoning=True, grounding_data=str(world.data_dir))
    return HFEngine(world.model_dir, world.sid_dir, cfg, batch_size=8, threads=1)


def test_hf_engine_decodes_rationales_of_the_users_own_items(world: TinyWorld, grounded_hf: HFEngine) -> None:
    from offline_worker.engine_interface import ThinkRequest
    from offline_worker.prompts import PromptBuilder

    engine = grounded_hf
    assert engine.grounding is not None
    users = sorted(world.sequences)[:4]
    pb = PromptBuilder(engine.tokenizer, world.sid)
    res = engine.think([ThinkRequest(u, ids, world.sequences[u]) for u, ids in pb.build(
        (u, world.sequences[u]) for u in users)])
    g = Grounding.build(load_items(world.data_dir / "items.tsv"), world.sid)
    for r in res:  # every path completes its rationale, the sampled one too
        assert r.closed and r.truncated == 0 and accepts(g.grammar(world.sequences[r.user_id]), r.reasoning), r
        assert len(r.reasoning_ids[0]) <= len(g.longest(world.sequences[r.user_id]).encode())
        items, grounded = g.grounded_items(r.reasoning, world.sequences[r.user_id])
        assert items and grounded and all(s & set(world.sequences[r.user_id]) for s in items)
    with pytest.raises(ValueError, match="history"):
        engine.think([ThinkRequest(users[0], pb.ids(world.sequences[users[0]]))])  # no history: no grammar


def test_grounding_report_over_a_grounded_refresh(world: TinyWorld, grounded_hf: HFEngine, redis_client: Any,
                                                  redis_server: Any, ns: str, capsys: pytest.CaptureFixture[str]
                                                  ) -> None:  # fmt: skip
    """A grounded refresh into a real Redis, then ``python -m evaluation reasoning`` over the version: every
    mention is the user's own item; a hand-written entry naming an invented product is counted."""
    from evaluation.reasoning import grounding_report, main
    from offline_worker.refresh import RefreshOptions, plan_refresh, run_shard
    from services.store import ThinkEntry, ThinkStore

    store = ThinkStore(redis_client, ns)
    hist = {u: world.sequences[u] for u in sorted(world.sequences)[:12]}
    opts = RefreshOptions(chunk=6, progress=False)
    plan = plan_refresh(store, hist, grounded_hf.model_id, {"engine": "hf", **asdict(grounded_hf.config)}, opts)
    report = run_shard(store, grounded_hf, world.sid, hist, plan, opts)
    assert report.published and report.computed == 12
    main(["--data", str(world.data_dir), "--sid", str(world.sid_dir), "--redis-url", redis_server.url,
          "--namespace", ns, "--no-write"])
    got = json.loads(capsys.readouterr().out)
    assert got["users"] == 12 and got["grounded_reasoning"] is True
    assert report.unclosed == 0 and report.truncated == 0
    assert got["nonempty_share"] == 1.0 and got["grounded_share"] == 1.0 and got["invented_mentions"] == 0
    assert got["well_formed_share"] == 1.0
    g = grounded_hf.grounding
    assert g is not None
    user = sorted(hist)[0]
    free = ThinkEntry('recently "olay regenerist". likes x. next: y.', [(0, 0, 0.0)], len(hist[user]), [], "m", 0.0)
    bad = grounding_report({user: free}, world.sequences, g)
    assert bad["grounded_share"] == 0.0 and bad["invented_mentions"] == 1 and bad["first_item_category_share"] == 0


def test_activation_samples_teach_the_grounded_format() -> None:
    """The activation stage's rationales are in each sample's own history grammar (what the engine decodes)."""
    from model.think.activate_data import CategoryTeacher, ItemEmbeddings, TeacherInput, activation_samples
    from model.think.align_data import category_labels

    ds, sid = tiny_dataset(), tiny_sid()
    teacher = CategoryTeacher(ds.catalog, sid, category_labels(ds.catalog, sid))
    emb = ItemEmbeddings.build(ds.catalog, "bow")
    samples = activation_samples(ds.splits.train, sid, teacher, emb, per_user=2)
    g = teacher.grounding
    by_codes = {tuple(sid.codes_of(i)): i for i in ds.catalog.item_ids if sid.has_item(i)}
    assert samples
    for s in samples:
        history = [by_codes[c] for c in _codes_in(s.prompt)]
        rationale = s.target.split("</think>")[0].strip()
        assert accepts(g.grammar(history), rationale), rationale
        assert g.grounded_items(rationale, history)[1]
    assert teacher.rationale(TeacherInput([], 3)) == f"next: {g.category(3)}."  # nothing known: prediction only


def _codes_in(prompt: str) -> list[tuple[int, ...]]:
    import re

    return [tuple(int(x) for x in re.findall(r"<[a-z]_(\d+)>", block))
            for block in re.findall(r"<\|item_begin\|>(.*?)<\|item_end\|>", prompt)]

