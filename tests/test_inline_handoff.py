"""``ONEREC_MODEL_HANDOFF=inline`` (`online_api.inline_batcher`): the model answers on the event loop itself (no
child process, no model thread), with the same answers as the model called directly; a job past its deadline
fails before the model runs; and the served app answers think-ahead this way. Also the guard that every BLAS of a
model process runs one thread once the fused engine has run (a second, unlimited BLAS doubled the CPU per
answer)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import redis
from api_support import TinyWorld, build_tiny_world, entry_for, make_settings, publish_entry, running_app
from conftest import RedisServer

from model.onerec import DeadlineExceeded, OneRec
from model.policy import PolicyConfig
from online_api.inline_batcher import InlineBatcher

POLICY = PolicyConfig(beam=10, prefix_weight=0.5, own_prefixes=4, own_prefix_floor=0.0, exclude_consumed=True)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> TinyWorld:
    return build_tiny_world(tmp_path_factory.mktemp("tiny"))


def test_inline_answers_on_the_loop_thread_as_the_model_does(world: TinyWorld) -> None:
    onerec = OneRec.load(world.checkpoint)
    hist = world.sequences[2]
    prefixes = entry_for(world, 2, n_prefixes=4).prefixes
    want = onerec.complete([hist], [prefixes], 5, POLICY, [set(hist)], None)[0]
    full = onerec.decode_full([hist], 5, 10, [set(hist)])[0]
    seen: list[tuple[str, int, float]] = []
    b = InlineBatcher(onerec, batch_max=16, wait_ms=0.0, torch_threads=1, queue_max=8, admit_by_expected=False,
                      on_batch=lambda kind, size, dt: seen.append((kind, size, dt)))

    async def run() -> tuple[object, object]:
        b.start()
        threads = {t.name for t in threading.enumerate()}
        got = await b.submit("complete", hist, 5, time.perf_counter() + 5, POLICY, prefixes, set(hist))
        got_full = await b.submit("full", hist, 5, time.perf_counter() + 5, POLICY, None, set(hist))
        assert {t.name for t in threading.enumerate()} == threads  # no thread started for the model
        with pytest.raises(DeadlineExceeded):
            await b.submit("complete", hist, 5, time.perf_counter() - 0.001, POLICY, prefixes, set(hist))
        with pytest.raises(ValueError, match="prefixes"):
            await b.submit("complete", hist, 5, time.perf_counter() + 5, POLICY, [], set(hist))
        await b.aclose()
        return got, got_full

    got, got_full = asyncio.run(run())
    assert got == want and got_full == full and want
    assert [(kind, size) for kind, size, _ in seen] == [("complete", 1), ("full", 1)]  # the expired job never ran
    assert not b.running


def test_the_app_answers_think_ahead_inline_without_a_child(world: TinyWorld, redis_server: RedisServer,
                                                            redis_client: redis.Redis, ns: str) -> None:
    user = 3
    publish_entry(redis_client, ns, world, user, n_prefixes=6)
    settings = make_settings(world, redis_server.url, ns, model_process=True, model_handoff="inline")
    with running_app(settings) as c:
        body = c.post("/v1/recommend", json={"user_id": user, "k": 5}).json()
        svc = c.app.state.svc  # type: ignore[attr-defined]
        assert isinstance(svc.batcher, InlineBatcher) and svc.loaded.processes == []
    assert body["source"] == "think-ahead" and len(body["items"]) == 5


def test_every_blas_runs_one_thread_after_the_fused_engine_ran(world: TinyWorld) -> None:
    import subprocess
    import sys

    # a fresh process, as the model process is: what its BLAS libraries look like after warm-up and a completion
    code = f"""
from threadpoolctl import threadpool_info
from model.onerec import OneRec
from online_api.model_process import warm_up
from services.config import Settings
from model.policy import PolicyConfig
onerec = OneRec.load({str(world.checkpoint)!r})
settings = Settings(data_dir={str(world.data_dir)!r})
warm_up(onerec, settings, PolicyConfig.from_settings(settings))
assert type(onerec.one_user()).__name__ == "FusedUser"
print(sorted({{i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}}))
print(len([i for i in threadpool_info() if i["user_api"] == "blas"]))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    threads, libraries = out.stdout.split()[-2:]
    assert threads == "[1]" and int(libraries) >= 1, out.stdout
