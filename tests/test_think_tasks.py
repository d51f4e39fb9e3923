"""Task builders read only training parts (no leakage), category labels, and the Rollout-Beam reward."""

from __future__ import annotations

import numpy as np
import pytest
from think_fixtures import tiny_dataset, tiny_sid

from model.semantic_ids import item_string
from model.think.activate_data import CategoryTeacher, ItemEmbeddings, activation_samples, rl_cases
from model.think.align_data import (
    caption_samples,
    category_labels,
    generation_prefix,
    mix,
    persona_samples,
    rec_prompt,
    seq_samples,
)
from model.think.enhance import group_advantages, rollout_beam_reward
from model.think.tokens import THINK_BEGIN

CANARIES = (21, 22, 23, 24)  # only ever the validation / test targets of tiny_dataset


def _texts(samples) -> list[str]:  # type: ignore[no-untyped-def]
    return [s.prompt + s.target for s in samples]


def test_no_leakage_in_training_texts() -> None:
    ds, sid = tiny_dataset(), tiny_sid()
    assert all(set(ds.splits.train[u]).isdisjoint(CANARIES) for u in ds.splits.train)
    labels = category_labels(ds.catalog, sid)
    emb = ItemEmbeddings.build(ds.catalog, "bow")
    built = {
        "seq": seq_samples(ds.splits.train, sid),
        "persona": persona_samples(ds.splits.train, ds.catalog, sid, labels),
        "think": activation_samples(ds.splits.train, sid, CategoryTeacher(ds.catalog, sid, labels), emb, per_user=3),
    }
    for name, samples in built.items():
        assert samples, name
        for text in _texts(samples):
            for c in CANARIES:
                assert sid.item_string(c) not in text, (name, c)
                assert ds.catalog.title(c) not in text, (name, c)
    assert all(not set(h + [t]) & set(CANARIES) for h, t in rl_cases(ds.splits.train, sid))
    with pytest.raises(TypeError, match="Splits.train"):
        seq_samples(ds.splits.test, sid)  # type: ignore[arg-type]


def test_seq_samples_cover_every_training_item_in_order() -> None:
    ds, sid = tiny_dataset(), tiny_sid()
    samples = seq_samples(ds.splits.train, sid, cap=3)
    u = min(ds.splits.train)
    seq = ds.splits.train[u]
    mine = [s.target for s in samples][: max(1, -(-(len(seq) - 1) // 3))]
    assert mine[0].startswith(item_string(sid.codes_of(seq[0])))
    assert all(s.prompt == "history:" for s in samples)


def test_prompt_format() -> None:
    h = [(1, 2, 0), (3, 4, 1)]
    assert rec_prompt(h) == "history:" + item_string(h[0]) + item_string(h[1])
    assert rec_prompt(h, persona="likes nail polish").startswith("persona: likes nail polish\nhistory:")
    assert generation_prefix(h) == rec_prompt(h) + THINK_BEGIN


def test_category_labels_and_captions() -> None:
    ds, sid = tiny_dataset(), tiny_sid()
    labels = category_labels(ds.catalog, sid)
    assert set(labels) == {int(c) for c in np.unique(sid.codes[:, 0])}
    assert all(lab and not lab.startswith("group") for lab in labels.values())
    caps = caption_samples(ds.catalog, sid, labels)
    assert len(caps) == 2 * len(sid)
    mixed = mix({"caption": caps, "seq": seq_samples(ds.splits.train, sid)}, {"caption": 3, "seq": 1}, 40)
    assert len(mixed) == 40 and sum(s.task == "caption" for s in mixed) == 30


def test_rollout_beam_reward_hand_cases() -> None:
    target = (3, 1, 4, 1)
    assert rollout_beam_reward([(3, 1, 4, 1)], target) == 4.0
    assert rollout_beam_reward([(0, 0, 0, 0), (3, 1, 0, 0), (3, 9, 4, 9)], target) == 2.0
    assert rollout_beam_reward([(0, 1, 0, 1)], target) == 2.0  # levels count independently, not only prefixes
    assert rollout_beam_reward([(9, 9, 9, 9)], target) == 0.0
    assert rollout_beam_reward([], target) == 0.0
    with pytest.raises(ValueError):
        rollout_beam_reward([(3, 1)], target)
    adv = group_advantages(np.array([1.0, 3.0, 2.0, 2.0, 0.0, 0.0]), 2)
    assert adv[0] < 0 < adv[1] and adv[2] == adv[3] == 0.0 and adv[4] == adv[5] == 0.0


def test_llm_teacher_over_openai_compatible_endpoint() -> None:
    import httpx

    from model.think.activate_data import LLMTeacher, OpenAIChatBackend, TeacherInput

    ds, seen = tiny_dataset(), []

    def handler(request: httpx.Request) -> httpx.Response:
        body = __import__("json").loads(request.content)
        seen.append(body)
        return httpx.Response(200, json={"choices": [{"message": {"content": "  <think>Loves lip\ncolour.</think> "}}]})

    backend = OpenAIChatBackend("http://teacher/v1", "some-model", api_key="k", transport=httpx.MockTransport(handler))
    teacher = LLMTeacher(ds.catalog, backend)
    out = teacher.rationales([TeacherInput([1, 2], 3)])
    assert out == ["Loves lip colour."]
    assert seen[0]["model"] == "some-model" and ds.catalog.title(3) in seen[0]["messages"][0]["content"]
