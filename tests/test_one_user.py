"""The one-user engines, compiled (`model.onerec.fused_user`, what the API runs per request) and numpy
(`model.onerec.one_user`), against the batched torch path of `OneRec.complete` / `decode_full`: the same items in
the same order with the same scores, over random users, prefix lists and policies; and the dispatch rule (one user
and the serving snapshot: the one-user engine, fused unless switched off; else torch)."""

from __future__ import annotations

import random
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from api_support import CountingNet, TinyWorld, build_tiny_world, count_fused_and_torch

from model.onerec import DeadlineExceeded, OneRec
from model.onerec.fused_user import FusedUser
from model.onerec.serving import ModuleNet
from model.policy import PolicyConfig, Prefix


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> TinyWorld:
    return build_tiny_world(tmp_path_factory.mktemp("tiny"))


def spread_model(folder: Path, item_score_weight: float = 1.0) -> OneRec:
    """The tiny checkpoint with weights drawn wide (std 0.3, not the init's 0.02), so that scores are far apart
    and float rounding cannot swap two items; the item head on."""
    onerec = OneRec.load(folder)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in onerec.model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    onerec.model.cfg = replace(onerec.model.cfg, item_score_weight=item_score_weight)
    return OneRec(onerec.model, onerec.sid)  # a fresh serving snapshot of the new weights


def random_case(world: TinyWorld, rng: random.Random) -> tuple[list[int], list[Prefix], set[int]]:
    """A history (empty, short, past the cap, with unknown ids), cached prefixes (duplicates, codes off the
    codebook or off the trie, -inf scores) and an exclusion set."""
    items = [int(i) for i in world.sid.item_ids]
    hist = [rng.choice(items) for _ in range(rng.choice([0, 1, 5, 30]))]
    if hist and rng.random() < 0.3:
        hist.insert(rng.randrange(len(hist)), -7 if rng.random() < 0.5 else 10**6)
    codes = world.sid.codes
    pre: list[Prefix] = []
    for _ in range(rng.randint(0, 12)):
        a, b = (int(x) for x in codes[rng.randrange(len(codes)), :2])
        pre.append((a, b, -rng.random() * 4))
    if pre and rng.random() < 0.5:
        pre.append((pre[0][0], pre[0][1], pre[0][2] + 1.0))  # a duplicate with a better score
    if rng.random() < 0.3:
        pre += [(99, 0, -1.0), (0, 5, -1.0), (1, 1, float("-inf"))]  # off the codebook, maybe off the trie
    excl = set(rng.sample(items, rng.randint(0, 10))) if rng.random() < 0.7 else set()
    return hist, pre, excl


def torch_path(onerec: OneRec, method: str, *args: Any, **kw: Any) -> Any:
    """`onerec.<method>(...)` through the batched torch path."""
    onerec.numpy_one_user = False
    try:
        return getattr(onerec, method)(*args, **kw)
    finally:
        onerec.numpy_one_user = True


@pytest.mark.parametrize("engine", ["fused", "numpy"])
@pytest.mark.parametrize("item_score_weight", [0.0, 1.0])
def test_one_user_engine_equals_the_torch_path(world: TinyWorld, item_score_weight: float, engine: str) -> None:
    onerec = spread_model(world.checkpoint, item_score_weight)
    onerec.fused_one_user = engine == "fused"
    rng = random.Random(0)
    compared = nonempty = 0
    for _ in range(300):
        hist, pre, excl = random_case(world, rng)
        policy = PolicyConfig(beam=rng.choice([1, 3, 10]), prefix_weight=rng.choice([0.0, 0.5]),
                              own_prefixes=rng.choice([0, 1, 8]), own_prefix_floor=rng.choice([0.0, -2.0]),
                              exclude_consumed=False)
        k = rng.choice([1, 5, 20])
        ex = [excl] if excl else None
        want = torch_path(onerec, "complete", [hist], [pre], k, policy, ex)[0]
        got = onerec.complete([hist], [pre], k, policy, ex)[0]
        assert [i for i, _ in got] == [i for i, _ in want], (hist, pre, policy, k)
        assert np.allclose([s for _, s in got], [s for _, s in want], atol=1e-4)
        assert not set(excl) & {i for i, _ in got}
        beam = max(policy.beam, k)
        want = torch_path(onerec, "decode_full", [hist], k, beam, ex)[0]
        got = onerec.decode_full([hist], k, beam, ex)[0]
        assert [i for i, _ in got] == [i for i, _ in want], (hist, k, beam)
        assert np.allclose([s for _, s in got], [s for _, s in want], atol=1e-4)
        compared += 1
        nonempty += bool(want)
    assert compared == 300 and nonempty > 200  # most cases return items: the comparison is not vacuous


def test_one_user_runs_fused_by_default(world: TinyWorld) -> None:
    onerec = spread_model(world.checkpoint)
    counting, torch_net = count_fused_and_torch(onerec)
    policy = PolicyConfig(beam=5, prefix_weight=0.5, own_prefixes=4, own_prefix_floor=0.0, exclude_consumed=True)
    hists = [world.sequences[u] for u in (1, 2)]
    pre = [(int(a), int(b), -1.0) for a, b in world.sid.codes[:6, :2].tolist()]
    assert onerec.complete(hists[:1], [pre], 5, policy)[0]
    # one trunk pass, levels a and b in one call, one call per later level
    assert counting.calls == {"encode_last": 1, "head_user": 1, "prefix_beams": 1, "beam_step": 2}
    assert onerec.decode_full(hists[:1], 5, 5)[0]
    assert counting.calls["encode_last"] == 2 and counting.calls["beam_step"] == 6
    assert onerec.complete(hists, [pre, pre], 5, policy)[1]  # several users: user by user, still fused
    assert counting.calls["encode_last"] == 4 and counting.calls["prefix_beams"] == 3
    assert not torch_net  # the torch path never ran
    many = [hists[0]] * (onerec.PER_USER_MAX + 1)  # beyond the API's batches: the batched torch path
    assert len(onerec.decode_full(many, 5, 5)) == len(many)
    assert torch_net["encode_last"] == 1 and counting.calls["encode_last"] == 4
    torch_net.clear()
    onerec.fused_one_user = False  # the numpy engine instead, and torch for several users
    onerec.complete(hists[:1], [pre], 5, policy)
    assert counting.calls["encode_last"] == 4 and not torch_net
    onerec.complete(hists, [pre, pre], 5, policy)
    assert torch_net["encode_last"] == 1


def test_one_user_runs_in_numpy_and_batches_in_torch(world: TinyWorld) -> None:
    onerec = spread_model(world.checkpoint)
    onerec.fused_one_user = False
    counting = CountingNet(onerec.one_user().net)
    onerec.one_user().net = counting  # type: ignore[assignment]
    policy = PolicyConfig(beam=5, prefix_weight=0.5, own_prefixes=4, own_prefix_floor=0.0, exclude_consumed=True)
    hists = [world.sequences[u] for u in (1, 2)]
    pre = [(int(a), int(b), -1.0) for a, b in world.sid.codes[:6, :2].tolist()]
    with torch.inference_mode():
        onerec.complete(hists[:1], [pre], 5, policy)
        # one trunk pass and one head pass per level, as the torch path (tests/test_online_cost.py)
        assert counting.calls == {"encode_last": 1, "level_0": 1, "level_1": 1, "level_2": 1, "level_3": 1,
                                  "item_logits": 1}
        onerec.decode_full(hists[:1], 5, 5)
        assert counting.calls["encode_last"] == 2 and counting.calls["level_0"] == 2
        onerec.decode_full(hists, 5, 5)  # two users: torch
        onerec.complete(hists, [pre, pre], 5, policy)  # two users: the batched torch path
        onerec.numpy_one_user = False
        onerec.complete(hists[:1], [pre], 5, policy)
        onerec.numpy_one_user = True
        onerec.net = ModuleNet(onerec.model)  # the module path is a torch reference: never numpy
        onerec.complete(hists[:1], [pre], 5, policy)
    assert counting.calls["encode_last"] == 2


@pytest.mark.parametrize("engine", ["fused", "numpy"])
def test_deadline_and_empty_answers(world: TinyWorld, engine: str) -> None:
    onerec = spread_model(world.checkpoint)
    onerec.fused_one_user = engine == "fused"
    hist = world.sequences[1]
    pre = [(int(a), int(b), -1.0) for a, b in world.sid.codes[:6, :2].tolist()]
    policy = PolicyConfig(beam=5, prefix_weight=0.5, own_prefixes=0, own_prefix_floor=0.0, exclude_consumed=True)
    with pytest.raises(DeadlineExceeded):
        onerec.complete([hist], [pre], 5, policy, deadline=time.perf_counter() - 1.0)
    # nothing valid to complete and no own prefixes: [] (the policy then decodes in full), as in torch
    bad = [[(99, 99, -1.0)]]
    assert onerec.complete([hist], bad, 5, policy) == [[]] == torch_path(onerec, "complete", [hist], bad, 5, policy)
    # every item excluded: an empty list, not an error
    everything = {int(i) for i in world.sid.item_ids}
    assert onerec.complete([hist], [pre], 5, policy, [everything]) == [[]]


def test_fused_kernels_check_bounds(world: TinyWorld) -> None:
    """An index outside a table raises IndexError (which the API answers by its fallback) instead of reading or
    writing past the array: the kernels are compiled with bounds checks."""
    onerec = spread_model(world.checkpoint)
    fused = onerec.one_user()
    assert isinstance(fused, FusedUser)
    h, hc, U = fused._user(world.sequences[1])
    kc, kn = fused.kids[2]
    bad_node = np.array([len(kn) + 5], dtype=np.int64)  # no such level-c node
    with pytest.raises(IndexError):
        fused.kernels.beam_step(2, fused.K, np.zeros((1, 2), np.int64), bad_node, np.zeros(1), 5, kc, kn,
                                np.zeros(0, np.int64), False, 0.0, fused.items, h, hc, U, fused.decc, fused.tdec,
                                fused.c0, fused.w2t, fused.b2)
