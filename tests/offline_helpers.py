"""Shared test data for the offline worker tests: a tiny catalogue, codes, sequences and think model.

Everything is made in the test session's temporary folder (no downloads): 160 items with 4-level codes
over a codebook of 16, 40 users, and a random-init Qwen3 from `model.think.base_model.build_tiny_base`
(2 layers, hidden 64: loads in vLLM's CPU build in seconds). Built once per session and shared.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from model.semantic_ids import SemanticIDConfig, SemanticIDs

WORDS = ("hydrating face cream serum lip gloss matte nail polish red pink shampoo conditioner argan oil brush "
         "mascara black volume eyeliner sunscreen spf gentle cleanser foam toner rose night repair mask clay").split()


@dataclass
class TinyWorld:
    root: Path
    model_dir: Path
    sid_dir: Path
    data_dir: Path
    sid: SemanticIDs
    sequences: dict[int, list[int]]


def _codes(n: int, levels: int, k: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    seen: set[tuple[int, ...]] = set()
    rows = []
    # few level-a groups so that level b has several children per a (a realistic trie shape)
    while len(rows) < n:
        c = (int(rng.integers(0, 6)), *(int(x) for x in rng.integers(0, k, size=levels - 1)))
        if c not in seen:
            seen.add(c)
            rows.append(c)
    return np.asarray(rows, dtype=np.int64)


def build_world(root: Path, n_items: int = 160, n_users: int = 40, seed: int = 0) -> TinyWorld:
    """Write items.tsv, sequences.txt, a code table and a tiny think model under `root` (idempotent)."""
    from model.think.base_model import TinyBaseConfig, build_tiny_base

    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    data_dir, sid_dir, model_dir = root / "data", root / "sid", root / "think"
    items = list(range(1, n_items + 1))
    titles = {i: " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 5))) for i in items}
    sequences = {u: [rng.choice(items) for _ in range(rng.randint(3, 12))] for u in range(1, n_users + 1)}
    cfg = SemanticIDConfig(variant="text", levels=3, codebook_size=16)
    sid = SemanticIDs(np.asarray(items), _codes(n_items, 4, 16, seed), cfg)
    if not (model_dir / "itemic.json").exists():
        data_dir.mkdir(exist_ok=True)
        with (data_dir / "items.tsv").open("w") as f:
            f.write("item_id\ttitle\n")
            for i in items:
                f.write(f"{i}\t{titles[i]}\n")
        with (data_dir / "sequences.txt").open("w") as f:
            for u, seq in sequences.items():
                f.write(" ".join(map(str, [u, *seq])) + "\n")
        sid.save(sid_dir)
        tiny = TinyBaseConfig(bpe_vocab=320, hidden=64, layers=2, heads=2, kv_heads=1, head_dim=32,
                              intermediate=128, max_positions=512, seed=seed)  # fmt: skip
        build_tiny_base(list(titles.values()), sid, model_dir, tiny)
    return TinyWorld(root, model_dir, sid_dir, data_dir, sid, sequences)


def one_process_refresh(world: TinyWorld, client: Any, ns: str, cfg: Any, opts: Any, key: dict[str, Any]
                        ) -> tuple[Any, Any, str]:  # fmt: skip
    """The Ray tests' reference: every user of `world` refreshed in one process by the HF engine with one torch
    thread (like a Ray actor with num_cpus=1: the same float sums) into namespace ``<ns>_one``; published.
    Returns (store, plan, model id)."""
    import torch

    from offline_worker.hf_engine import HFEngine
    from offline_worker.refresh import offline_histories, plan_refresh, run_shard
    from services.store import ThinkStore

    hist = offline_histories(world.sequences)
    threads = torch.get_num_threads()
    try:
        engine = HFEngine(world.model_dir, world.sid_dir, cfg, batch_size=8, threads=1)
        store = ThinkStore(client, f"{ns}_one")
        plan = plan_refresh(store, hist, engine.model_id, key, opts)
        report = run_shard(store, engine, world.sid, hist, plan, opts)
    finally:
        torch.set_num_threads(threads)
    assert report.published
    return store, plan, engine.model_id
