"""Helpers of the online-API tests: a tiny dataset + code table + randomly initialised OneRec checkpoint,
settings pointing at the session's redis-server, and a started app (TestClient runs the lifespan, or a real
uvicorn server in a thread when the test needs HTTP on a socket)."""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from fastapi.testclient import TestClient

from model.onerec import OneRecConfig, build_model, save_checkpoint
from model.policy import PolicyConfig
from model.semantic_ids import SemanticIDConfig, SemanticIDs
from online_api.app import create_app
from online_api.model_process import ProcessModel
from online_api.state import ModelLoader
from services.config import Settings
from services.harness import serve_in_thread
from services.store import ThinkEntry, ThinkStore

N_ITEMS = 120
N_USERS = 40
FIRST_ITEM = 1000
RADIX = (4, 5, 3, 2)  # codes per level; 4*5*3*2 = 120 unique codes


class CountingNet:
    """Wraps a serving network (torch `FrozenOneRec` or numpy `NumpyNet`: the same three calls) and counts its
    forward calls by kind: ``encode_last``, ``level_<L>``, ``item_logits``."""

    def __init__(self, net: Any) -> None:
        self.net, self.calls = net, Counter[str]()

    def encode_last(self, rows: Any) -> Any:
        self.calls["encode_last"] += 1
        return self.net.encode_last(rows)

    def level_logits(self, h: Any, prev: Any, level: int, *cols: Any) -> Any:
        self.calls[f"level_{level}"] += 1
        return self.net.level_logits(h, prev, level, *cols)

    def item_logits(self, h: Any, rows: Any) -> Any:
        self.calls["item_logits"] += 1
        return self.net.item_logits(h, rows)


class CountingKernels:
    """Wraps the fused engine's kernels (`model.onerec.fused_kernels`, reached as `FusedUser.kernels`) and counts
    its compiled calls by name: ``encode_last``, ``head_user``, ``prefix_beams``, ``beam_step``."""

    def __init__(self, kernels: Any) -> None:
        self.kernels, self.calls = kernels, Counter[str]()

    def __getattr__(self, name: str) -> Any:
        fn = getattr(self.kernels, name)

        def counted(*args: Any) -> Any:
            self.calls[name] += 1
            return fn(*args)

        return counted


@dataclass
class TinyWorld:
    data_dir: Path
    checkpoint: Path
    sid: SemanticIDs
    sequences: dict[int, list[int]]


def build_tiny_world(root: Path) -> TinyWorld:
    rng = random.Random(0)
    item_ids = list(range(FIRST_ITEM, FIRST_ITEM + N_ITEMS))
    codes = np.array(list(np.ndindex(*RADIX)), dtype=np.int64)  # (120, 4), unique rows
    sid = SemanticIDs(np.array(item_ids), codes, SemanticIDConfig(variant="text", levels=3, codebook_size=6))
    data = root / "data"
    data.mkdir(parents=True)
    (data / "items.tsv").write_text("item_id\ttitle\n" + "".join(f"{i}\tTiny item {i}\n" for i in item_ids))
    sequences = {u: [rng.choice(item_ids) for _ in range(rng.randint(4, 12))] for u in range(1, N_USERS + 1)}
    (data / "sequences.txt").write_text("".join(f"{u} {' '.join(map(str, s))}\n" for u, s in sequences.items()))
    cfg = OneRecConfig(d_model=32, n_layers=1, n_heads=2, d_ff=64, max_len=20, dropout=0.0)
    ckpt = root / "onerec"
    save_checkpoint(build_model(cfg, sid, seed=0), sid, ckpt)
    return TinyWorld(data, ckpt, sid, sequences)


def make_settings(world: TinyWorld, redis_url: str, ns: str, **over: Any) -> Settings:
    base: dict[str, Any] = dict(
        data_dir=world.data_dir, onerec_dir=world.checkpoint, redis_url=redis_url, namespace=ns,
        default_budget_ms=2000.0,  # shared CI cores: the budget tests set their own
        redis_timeout_ms=1000, redis_backoff_ms=50.0, current_ttl_s=0.0, beam=10, batch_wait_ms=0.5,
        model_process=False,  # a child process per app would add seconds to every test: its own tests set True
    )  # fmt: skip
    base.update(over)
    return Settings(**base)


def wait_ready(client: TestClient, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if client.get("/readyz").status_code == 200:
            return
        time.sleep(0.02)
    raise AssertionError(f"app not ready after {timeout_s}s: {client.get('/readyz').json()}")


@contextmanager
def running_app(settings: Settings, loader: ModelLoader | None = None, ready: bool = True) -> Iterator[TestClient]:
    with TestClient(create_app(settings, loader=loader), raise_server_exceptions=False) as client:
        if ready:
            wait_ready(client)
        yield client


@contextmanager
def serving_http(settings: Settings, timeout_s: float = 30.0) -> Iterator[str]:
    """The app under a real uvicorn server on a free localhost port (a thread); yields its base URL once ready."""
    with serve_in_thread(create_app(settings), "/readyz", timeout_s) as base:
        yield base


def entry_for(world: TinyWorld, user: int, n_prefixes: int = 3, reasoning: str = "likes tiny items") -> ThinkEntry:
    """An entry whose prefixes are the (a, b) codes of a few catalogue items not in the user's history."""
    hist = set(world.sequences.get(user, []))
    prefixes: list[tuple[int, int, float]] = []
    for item in world.sid.item_ids.tolist():
        a, b = world.sid.codes_of(int(item))[:2]
        if item not in hist and (a, b) not in {(p[0], p[1]) for p in prefixes}:
            prefixes.append((a, b, -0.5 * (len(prefixes) + 1)))
        if len(prefixes) == n_prefixes:
            break
    seq = world.sequences.get(user, [])
    return ThinkEntry(reasoning, prefixes, len(seq), seq[-5:], "think-test", time.time())


def publish_entry(redis_client: Any, ns: str, world: TinyWorld, user: int, n_prefixes: int = 3) -> None:
    """Version "v1" published with one entry (`entry_for`) for `user`, and the user's history stored."""
    store = ThinkStore(redis_client, ns)
    store.begin_version("v1", {"model": "think-test"})
    store.write_entries("v1", {user: entry_for(world, user, n_prefixes=n_prefixes)}, 3600)
    store.publish("v1", 1)
    store.write_histories({user: world.sequences[user]}, 50)


def count_fused_and_torch(onerec: Any) -> tuple[CountingKernels, Counter[str]]:
    """Count the compiled calls of `onerec`'s fused engine and the torch path's trunk passes (`encode_last` of its
    serving snapshot, wrapped on the instance so that the dispatch still sees a `FrozenOneRec`)."""
    fused = onerec.one_user()
    kernels = CountingKernels(fused.kernels)
    fused.kernels = kernels
    torch_calls = Counter[str]()
    encode = onerec.net.encode_last
    onerec.net.encode_last = lambda rows: torch_calls.update(["encode_last"]) or encode(rows)
    return kernels, torch_calls


@contextmanager
def started_model_process(world: TinyWorld, redis_url: str, ns: str, policy: PolicyConfig,
                          **kw: Any) -> Iterator[ProcessModel]:
    """A started `ProcessModel` (the model in a child process) on the tiny checkpoint, with fast restarts;
    closed afterwards."""
    pm = ProcessModel(world.checkpoint, make_settings(world, redis_url, ns, model_process=True), policy,
                      **{"restart_backoff_s": 0.1, **kw})
    pm.start()
    try:
        yield pm
    finally:
        pm.close()


class CountingConn:
    """Wraps the parent's end of a model child's pipe and counts the messages each way."""

    def __init__(self, conn: Any) -> None:
        self.conn, self.calls = conn, Counter[str]()

    def send(self, obj: Any) -> None:
        self.calls["send"] += 1
        self.conn.send(obj)

    def recv(self) -> Any:
        self.calls["recv"] += 1
        return self.conn.recv()

    def poll(self, timeout: float) -> bool:
        return bool(self.conn.poll(timeout))

    def fileno(self) -> int:
        return int(self.conn.fileno())

    def close(self) -> None:
        self.conn.close()
