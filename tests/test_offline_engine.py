"""Offline engines: prefix selection, the HF reference, and vLLM (real CPU engine) == HF under greedy settings.

One vLLM engine is started for the whole session (about 30-60 s on 2 cores); every vLLM test shares it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
from offline_helpers import TinyWorld, build_world

from offline_worker.engine_interface import (
    EngineConfig,
    Prefix,
    ThinkRequest,
    ThinkResult,
    select_prefixes,
    union_prefixes,
)
from offline_worker.hf_engine import HFEngine
from offline_worker.prompts import PromptBuilder, answer_ids

CFG = EngineConfig(samples=2, prefixes_per_sample=6, beam_a=3, max_reasoning_tokens=12, greedy=True,
                   mode="think")  # a tiny base model has no reasoning training: auto would serve direct
SCORE_TOL = 1e-4


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory) -> TinyWorld:
    return build_world(tmp_path_factory.getbasetemp() / "offline_world")


@pytest.fixture(scope="session")
def hf(world: TinyWorld) -> HFEngine:
    return HFEngine(world.model_dir, world.sid_dir, CFG, batch_size=8, threads=1)


@pytest.fixture(scope="session")
def requests_(world: TinyWorld, hf: HFEngine) -> list[ThinkRequest]:
    pb = PromptBuilder(hf.tokenizer, world.sid)
    users = sorted(world.sequences)[:10]
    return [ThinkRequest(u, ids) for u, ids in pb.build((u, world.sequences[u]) for u in users)]


@pytest.fixture(scope="session")
def hf_results(hf: HFEngine, requests_: list[ThinkRequest]) -> list[ThinkResult]:
    return hf.think(requests_)


@pytest.fixture(scope="session")
def vllm_engine(world: TinyWorld) -> Iterator[object]:
    pytest.importorskip("vllm")
    from offline_worker.vllm_engine import VLLMEngine, VLLMOptions, cpu_defaults

    cpu_defaults()
    # multiprocess: a single-process CPU engine would lock torch's thread count for the whole test session
    opts = VLLMOptions(dtype="float32", enforce_eager=True, max_model_len=512, trie_processor=True,
                       single_process=False)  # fmt: skip
    engine = VLLMEngine(world.model_dir, world.sid_dir, CFG, opts)
    try:
        yield engine
    finally:
        engine.close()


def assert_same_prefixes(got: list[Prefix], want: list[Prefix], tol: float = SCORE_TOL) -> None:
    """Same (a, b) in the same order, scores within `tol`; neighbours closer than `tol` may swap."""
    assert len(got) == len(want)
    ga, wa = {(a, b): s for a, b, s in got}, {(a, b): s for a, b, s in want}
    boundary = want[-1][2] if want else 0.0
    for key in set(ga) ^ set(wa):  # only a tie at the cut-off may differ
        s = ga.get(key, wa.get(key))
        assert s is not None and abs(s - boundary) < tol, f"prefix {key} differs ({got} vs {want})"
    for key in set(ga) & set(wa):
        assert abs(ga[key] - wa[key]) < tol, f"score of {key}: {ga[key]} vs {wa[key]}"
    for (g, w) in zip(got, want, strict=True):
        if g[:2] != w[:2]:
            assert abs(g[2] - w[2]) < tol, f"order differs beyond ties: {got} vs {want}"


# --------------------------------------------------------------------------- pure logic


def test_select_prefixes_scores_and_cut() -> None:
    a = [(1, -0.1), (2, -0.5)]
    b = [[(7, -0.2), (8, -1.0)], [(3, -0.01)]]
    got = select_prefixes(a, b, 2)
    assert [(x, y) for x, y, _ in got] == [(1, 7), (2, 3)]
    assert got[0][2] == pytest.approx(-0.3) and got[1][2] == pytest.approx(-0.51)


def test_union_keeps_best_score_per_prefix() -> None:
    u = union_prefixes([[(1, 2, -1.0), (3, 4, -2.0)], [(1, 2, -0.5), (5, 6, -3.0)]])
    assert u == [(1, 2, -0.5), (3, 4, -2.0), (5, 6, -3.0)]


def test_vllm_max_logprobs_covers_direct_modes_one_ranking() -> None:
    """Direct mode ranks T x m prefixes in one request (2 x 16 = 32 with the defaults): vLLM refused 32 log-probs
    under its default cap of 20 ('Requested sample logprobs of 32'), found by a direct-mode refresh on Beauty."""
    from offline_worker.vllm_engine import max_logprobs

    assert max_logprobs(EngineConfig(samples=2, prefixes_per_sample=16, beam_a=8, mode="direct")) == 32
    assert max_logprobs(EngineConfig(samples=1, prefixes_per_sample=6, beam_a=40)) == 40
    assert max_logprobs(EngineConfig(samples=1, prefixes_per_sample=4, beam_a=2)) == 20


def test_engine_config_validates() -> None:
    with pytest.raises(ValueError, match="samples"):
        EngineConfig(samples=0)
    with pytest.raises(ValueError, match="beam_a"):
        EngineConfig(beam_a=0)


def test_answer_ids_are_the_two_markers(hf: HFEngine) -> None:
    ids = answer_ids(hf.tokenizer)
    assert ids == [hf.think_end, hf.tokmap.item_begin]


# --------------------------------------------------------------------------- HF reference


def test_hf_results_are_valid(world: TinyWorld, hf: HFEngine, hf_results: list[ThinkResult]) -> None:
    trie = hf.trie
    assert [r.user_id for r in hf_results] == sorted(world.sequences)[:10]
    for r in hf_results:
        assert len(r.reasoning_ids) == CFG.samples and len(r.per_sample) == CFG.samples
        assert all(len(ids) <= CFG.max_reasoning_tokens for ids in r.reasoning_ids)
        assert all(hf.think_end not in ids for ids in r.reasoning_ids)
        for path in r.per_sample:
            assert 0 < len(path) <= CFG.prefixes_per_sample
            assert len({a for a, _, _ in path}) <= CFG.k_a
        assert r.prefixes == sorted(r.prefixes, key=lambda p: (-p[2], p[0], p[1]))
        assert len({(a, b) for a, b, _ in r.prefixes}) == len(r.prefixes)
        for a, b, s in r.prefixes:
            assert trie.has_prefix([a, b]), (a, b)
            assert s <= 0 and math.isfinite(s)


def test_hf_level_scores_are_renormalised_over_the_trie(hf: HFEngine, requests_: list[ThinkRequest]) -> None:
    """exp(level-a log-probs) over every valid code sums to 1: post-mask probabilities, not raw ones."""
    ctx = requests_[0].prompt_ids + hf.answer_ids
    root = hf.allowed_ids([])
    top = hf._top_next([ctx], [root], len(root))[0]
    assert {t for t, _ in top} == set(root)
    assert sum(math.exp(lp) for _, lp in top) == pytest.approx(1.0, abs=1e-5)


def test_hf_batching_does_not_change_results(world: TinyWorld, hf_results: list[ThinkResult]) -> None:
    one = HFEngine(world.model_dir, world.sid_dir, CFG, batch_size=1, threads=1)
    pb = PromptBuilder(one.tokenizer, world.sid)
    u = hf_results[3].user_id
    (res,) = one.think([ThinkRequest(u, pb.ids(world.sequences[u]))])
    assert res.reasoning_ids == hf_results[3].reasoning_ids
    assert_same_prefixes(res.per_sample[0], hf_results[3].per_sample[0])


# --------------------------------------------------------------------------- vLLM vs HF


@pytest.mark.slow
def test_vllm_equals_hf_under_greedy(vllm_engine: object, requests_: list[ThinkRequest],
                                     hf_results: list[ThinkResult]) -> None:  # fmt: skip
    from offline_worker.vllm_engine import VLLMEngine

    assert isinstance(vllm_engine, VLLMEngine)
    got = vllm_engine.think(requests_)
    assert [r.user_id for r in got] == [r.user_id for r in hf_results]
    for v, h in zip(got, hf_results, strict=True):
        assert v.reasoning_ids == h.reasoning_ids, f"user {v.user_id}: reasoning tokens differ"
        assert v.reasoning == h.reasoning
        for pv, ph in zip(v.per_sample, h.per_sample, strict=True):
            assert_same_prefixes(pv, ph)
        assert_same_prefixes(v.prefixes, h.prefixes)


@pytest.mark.slow
def test_vllm_prefix_beam_paths_agree(vllm_engine: object, requests_: list[ThinkRequest]) -> None:
    """Three ways to score the prefixes give the same post-mask scores: the two-step level-a request
    (level a + level b under the best a in one request) with ``allowed_token_ids`` for the other a's,
    the trie processor for every step (used above the 1024-id cap), and one request per level."""
    from offline_worker.vllm_engine import VLLMEngine

    assert isinstance(vllm_engine, VLLMEngine) and vllm_engine.processor_registered
    ctxs = [r.prompt_ids + vllm_engine.answer_ids for r in requests_[:4]]
    sizes: list[int] = []
    generate = vllm_engine._generate

    def counting(prompts: list[list[int]], params: list[object]) -> list[object]:
        sizes.append(len(prompts))
        return generate(prompts, params)

    vllm_engine._generate = counting  # type: ignore[method-assign]
    try:
        two_step = vllm_engine.prefix_beam(ctxs)
        vllm_engine.force_processor = True
        via_processor = vllm_engine.prefix_beam(ctxs)
        vllm_engine.force_processor = False
        vllm_engine.processor_registered = False  # the fallback: level a alone, then one request per kept a
        per_level = vllm_engine.prefix_beam(ctxs)
    finally:
        vllm_engine.force_processor = False
        vllm_engine.processor_registered = True
        del vllm_engine._generate
    for t, p, d in zip(two_step, via_processor, per_level, strict=True):
        assert_same_prefixes(p, t, tol=1e-5)
        assert_same_prefixes(d, t, tol=1e-5)
    # the best a's level b came with level a: one level-b request fewer per context
    assert sizes[:2] == [len(ctxs), len(ctxs) * (CFG.k_a - 1)]
    assert sizes[4:] == [len(ctxs), len(ctxs) * CFG.k_a]


@pytest.mark.slow
def test_vllm_sampled_paths_are_seeded(vllm_engine: object, requests_: list[ThinkRequest]) -> None:
    """Sampled paths (t >= 1) are reproducible per (seed, user, path): a resumed chunk writes the same values."""
    from offline_worker.vllm_engine import VLLMEngine

    assert isinstance(vllm_engine, VLLMEngine)
    vllm_engine.config = EngineConfig(samples=3, prefixes_per_sample=6, beam_a=3, max_reasoning_tokens=12,
                                      temperature=1.5, mode="think")  # fmt: skip
    try:
        first = vllm_engine.think(requests_[:3])
        again = vllm_engine.think(requests_[:3])
    finally:
        vllm_engine.config = CFG
    for x, y in zip(first, again, strict=True):
        assert x.reasoning_ids == y.reasoning_ids
        assert x.prefixes == y.prefixes
    assert any(r.reasoning_ids[1] != r.reasoning_ids[0] for r in first)  # sampling did something


@pytest.mark.slow
def test_vllm_grounded_rationales_name_the_users_own_items(world: TinyWorld, vllm_engine: object) -> None:
    """Under each user's grammar (vLLM structured outputs) the greedy rationale parses back into items of
    that user's history, and equals the HF engine's under the same grammar (xgrammar logits processor)."""
    from model.think.grounding import Grounding, accepts
    from offline_worker.vllm_engine import VLLMEngine
    from services.catalog import load_items

    assert isinstance(vllm_engine, VLLMEngine)
    cfg = EngineConfig(samples=1, prefixes_per_sample=4, beam_a=2, max_reasoning_tokens=128, greedy=True,
                       mode="think", grounded_reasoning=True, grounding_data=str(world.data_dir))
    grounding = Grounding.build(load_items(world.data_dir / "items.tsv"), world.sid)
    users = sorted(world.sequences)[10:14]
    pb = PromptBuilder(vllm_engine.tokenizer, world.sid)
    reqs = [ThinkRequest(u, ids, world.sequences[u]) for u, ids in pb.build((u, world.sequences[u]) for u in users)]
    vllm_engine.config, vllm_engine.grounding = cfg, grounding
    try:
        got = vllm_engine.think(reqs)
    finally:
        vllm_engine.config, vllm_engine.grounding = CFG, None
    want = HFEngine(world.model_dir, world.sid_dir, cfg, batch_size=8, threads=1).think(reqs)
    for v, h in zip(got, want, strict=True):
        history = world.sequences[v.user_id]
        assert v.closed and accepts(grounding.grammar(history), v.reasoning), v.reasoning
        items, grounded = grounding.grounded_items(v.reasoning, history)
        assert items and grounded and all(s & set(history) for s in items)
        assert v.reasoning == h.reasoning
