"""Grounded rationales (`model.think.grounding`): the per-user grammar, the teacher's format, and the HF
engine decoding under it (the vLLM engine under the same grammar: tests/test_offline_engine.py)."""

from __future__ import annotations

import pytest
from offline_helpers import TinyWorld, build_world
from think_fixtures import tiny_dataset, tiny_sid

from model.think.grounding import Grounding, accepts, parse, short_title
from services.catalog import load_items


@pytest.fixture(scope="module")
def grounding() -> Grounding:
    return Grounding.build(tiny_dataset().catalog, tiny_sid())


def test_grammar_accepts_own_items_and_rejects_an_invented_one(grounding: Grounding) -> None:
    history = [13, 11, 6]
    g = grounding.grammar(history)
    cat = grounding.categories()[0]
    own = f'recently "{grounding.titles[6]}" and "{grounding.titles[13]}". likes {cat}. next: {cat}.'
    assert accepts(g, own)
    other = next(i for i in grounding.titles if i not in history)  # a real catalogue item, not the user's
    for bad in (own.replace(grounding.titles[6], "olay regenerist"), own.replace(grounding.titles[6],
                grounding.titles[other]), own.replace(f"likes {cat}", "likes lipsticks"), own[:-1]):
        assert not accepts(g, bad), bad


def test_grammar_without_titled_history_names_categories_only(grounding: Grounding) -> None:
    g = grounding.grammar([999])  # unknown item: nothing to name
    cat = grounding.categories()[-1]
    assert accepts(g, f"likes {cat}. next: {cat}.")
    assert not accepts(g, f'recently "{grounding.titles[1]}". likes {cat}. next: {cat}.')


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


def test_hf_engine_decodes_rationales_of_the_users_own_items(world: TinyWorld) -> None:
    from offline_worker.engine_interface import EngineConfig, ThinkRequest
    from offline_worker.hf_engine import HFEngine
    from offline_worker.prompts import PromptBuilder

    cfg = EngineConfig(samples=2, prefixes_per_sample=4, beam_a=2, max_reasoning_tokens=128, mode="think",
                       grounded_reasoning=True, grounding_data=str(world.data_dir))
    engine = HFEngine(world.model_dir, world.sid_dir, cfg, batch_size=8, threads=1)
    assert engine.grounding is not None
    users = sorted(world.sequences)[:4]
    pb = PromptBuilder(engine.tokenizer, world.sid)
    res = engine.think([ThinkRequest(u, ids, world.sequences[u]) for u, ids in pb.build(
        (u, world.sequences[u]) for u in users)])
    g = Grounding.build(load_items(world.data_dir / "items.tsv"), world.sid)
    for r in res:
        assert r.closed and accepts(g.grammar(world.sequences[r.user_id]), r.reasoning), r.reasoning
        items, grounded = g.grounded_items(r.reasoning, world.sequences[r.user_id])
        assert items and grounded and all(s & set(world.sequences[r.user_id]) for s in items)
    with pytest.raises(ValueError, match="history"):
        engine.think([ThinkRequest(users[0], pb.ids(world.sequences[users[0]]))])  # no history: no grammar
