"""The online tier's work per answer, counted (not timed): a guard that fails when the completion path does
more than it should. One think-ahead request is one model call carrying the app's one policy object; one model
call is one trunk pass and one head pass per code level (cached and own prefixes, all users, decoded together),
the item head once, and one message each way on the model process's pipe. Timings live in
`benchmarks.online_load` (CPU ms per answer against the floor); these counts do not depend on the machine.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import replace

import pytest
import redis
import torch
from api_support import (
    CountingConn,
    CountingKernels,
    CountingNet,
    TinyWorld,
    build_tiny_world,
    count_fused_and_torch,
    make_settings,
    publish_entry,
    running_app,
)
from conftest import RedisServer

from model.onerec import OneRec
from model.policy import PolicyConfig, Prefix, Scored
from online_api.model_process import ProcessModel
from online_api.state import LoadedModel, load_onerec
from services.config import Settings

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> TinyWorld:
    return build_tiny_world(tmp_path_factory.mktemp("tiny"))


class CountingModel:
    """The batcher's `OnlineModel` over a real `OneRec`, counting calls and keeping the policy each one got."""

    def __init__(self, onerec: OneRec) -> None:
        self.onerec, self.calls, self.policies = onerec, Counter[str](), list[PolicyConfig]()

    def complete(self, histories: Sequence[Sequence[int]], prefixes: Sequence[Sequence[Prefix]], k: int,
                 policy: PolicyConfig, exclude: Sequence[set[int]] | None = None,
                 deadline: float | None = None) -> list[Scored]:
        self.calls["complete"] += 1
        self.policies.append(policy)
        return self.onerec.complete(histories, prefixes, k, policy, exclude, deadline)

    def decode_full(self, histories: Sequence[Sequence[int]], k: int, beam: int,
                    exclude: Sequence[set[int]] | None = None, deadline: float | None = None) -> list[Scored]:
        self.calls["decode_full"] += 1
        return self.onerec.decode_full(histories, k, beam, exclude, deadline)


def _all_prefixes(world: TinyWorld) -> list[Prefix]:
    """Every (a, b) of the tiny catalogue (20) as cached prefixes, scored."""
    ab = sorted({(int(a), int(b)) for a, b in world.sid.codes[:, :2].tolist()})
    return [(a, b, -0.1 * n) for n, (a, b) in enumerate(ab)]


@pytest.mark.parametrize("users", [1, 3])
@pytest.mark.parametrize("engine", ["numpy", "torch"])
def test_one_completion_is_one_trunk_pass_and_one_head_pass_per_level(world: TinyWorld, users: int,
                                                                      engine: str) -> None:
    onerec = OneRec.load(world.checkpoint)
    onerec.cfg = replace(onerec.cfg, item_score_weight=1.0)  # the served models use the item head
    onerec.fused_one_user = False  # the fused engine's count: test_fused_completion_is_four_compiled_calls
    if engine == "numpy" and users == 1:  # the numpy engine of one-user calls (`model.onerec.one_user`)
        one = onerec.one_user()
        net = CountingNet(one.net)
        one.net = net  # type: ignore[assignment]  # duck-typed: the same three calls
    else:
        onerec.numpy_one_user = engine == "numpy"
        net = CountingNet(onerec.net)
        onerec.net = net  # type: ignore[assignment]
    policy = PolicyConfig(beam=10, prefix_weight=0.25, own_prefixes=8, own_prefix_floor=0.0, exclude_consumed=True)
    hists = [world.sequences[u] for u in range(1, users + 1)]
    with torch.inference_mode():
        out = onerec.complete(hists, [_all_prefixes(world)] * users, 5, policy, [set(h) for h in hists])
    assert all(out)
    # cached (20) and own (8) prefixes and every user in one pass per level, whatever their number
    assert net.calls == {"encode_last": 1, "level_0": 1, "level_1": 1, "level_2": 1, "level_3": 1, "item_logits": 1}


def test_fused_completion_is_four_compiled_calls(world: TinyWorld) -> None:
    """The served one-user engine (`model.onerec.fused_user`): one trunk call, one call for the users' head terms,
    levels a and b (cached and own prefixes together) in one call, one call per later level; and no numpy or torch
    network call at all."""
    onerec = OneRec.load(world.checkpoint)
    onerec.cfg = replace(onerec.cfg, item_score_weight=1.0)
    kernels, torch_calls = count_fused_and_torch(onerec)
    policy = PolicyConfig(beam=10, prefix_weight=0.25, own_prefixes=8, own_prefix_floor=0.0, exclude_consumed=True)
    hist = world.sequences[1]
    assert onerec.complete([hist], [_all_prefixes(world)], 5, policy, [set(hist)])[0]
    assert kernels.calls == {"encode_last": 1, "head_user": 1, "prefix_beams": 1, "beam_step": 2}
    assert not torch_calls  # no torch trunk pass


def test_one_request_is_one_model_call_with_the_apps_policy(world: TinyWorld, redis_server: RedisServer,
                                                            redis_client: redis.Redis, ns: str) -> None:
    user = 3
    publish_entry(redis_client, ns, world, user, n_prefixes=6)
    models: list[CountingModel] = []
    nets: list[CountingKernels] = []

    def counting(settings: Settings, policy: PolicyConfig) -> LoadedModel:
        real = load_onerec(settings, policy)
        onerec = real.model
        assert isinstance(onerec, OneRec)
        one = onerec.one_user()  # one user per request: the served fused engine answers
        nets.append(CountingKernels(one.kernels))
        one.kernels = nets[-1]  # type: ignore[assignment,union-attr]
        models.append(CountingModel(onerec))
        return LoadedModel(models[-1], real.sid, real.trie, real.model_id)

    with running_app(make_settings(world, redis_server.url, ns), loader=counting) as c:
        nets[0].calls.clear()
        for n in range(1, 4):
            assert c.post("/v1/recommend", json={"user_id": user, "k": 5}).json()["source"] == "think-ahead"
            assert models[0].calls == {"complete": n}  # no second call, no full decode
        served = c.app.state.svc.policy  # type: ignore[attr-defined]
    assert all(p is served for p in models[0].policies)  # the one object the app built, not a copy
    assert nets[0].calls["encode_last"] == 3 and nets[0].calls["prefix_beams"] == 3


def test_one_batch_is_one_message_each_way_on_the_pipe(world: TinyWorld, redis_server: RedisServer,
                                                       ns: str) -> None:
    policy = PolicyConfig(beam=10, prefix_weight=0.25, own_prefixes=4, own_prefix_floor=0.0, exclude_consumed=True)
    pm = ProcessModel(world.checkpoint, make_settings(world, redis_server.url, ns, model_process=True), policy)
    pm.start()
    try:
        conn = CountingConn(pm._conn)
        pm._conn = conn  # type: ignore[assignment]
        hists = [world.sequences[u] for u in (1, 2, 3)]
        got = pm.complete(hists, [_all_prefixes(world)] * 3, 5, policy, [set(h) for h in hists])
        assert len(got) == 3 and all(got)
        assert conn.calls == {"send": 1, "recv": 1}
    finally:
        pm.close()


def test_online_ab_results_are_the_means_of_each_arms_runs() -> None:
    from benchmarks.online_ab import arm_label, arm_means

    rows = [{"arm": a, "rate": 100.0, "p50_ms": p50, "p99_ms": p50 * 2, "server_cpu_ms_per_request": cpu,
             "think_ahead_share": 1.0}
            for a, p50, cpu in (("default", 2.0, 3.0), ("ONEREC_NUMPY_ONE_USER=false", 4.0, 5.0),
                                ("default", 3.0, 4.0), ("ONEREC_NUMPY_ONE_USER=false", 5.0, 6.0))]
    got = arm_means(rows)
    assert arm_label("ONEREC_A=1+ONEREC_B=x") == "a_1__b_x"
    assert got["default_p50_ms"] == 2.5 and got["default_cpu_ms_per_answer"] == 3.5 and got["default_runs"] == 2
    assert got["numpy_one_user_false_p99_ms"] == 9.0 and got["numpy_one_user_false_cpu_ms_per_answer"] == 5.5
