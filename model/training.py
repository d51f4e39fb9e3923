"""Training pieces shared by the lightweight OneRec and OneRec-Think: seeding, the LR schedule, the step log.

- `seed_all(seed)`: Python, NumPy and torch generators;
- `lr_multiplier(step, total, warmup, min_ratio, schedule)`: the one learning-rate schedule, linear warm-up
  then cosine decay to `min_ratio` (or constant), as a multiplier of the base LR; `lr_lambda` wraps it
  for ``torch.optim.lr_scheduler.LambdaLR``;
- `log_step(path, record)`: one JSON line per logged step (``train_log.jsonl`` of every think stage).
Not here: the training loops themselves (`model.onerec.train`, `model.think.sft`, `model.think.fit`,
`model.think.stages`), which differ in what a batch and a loss are.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

SCHEDULES = ("cosine", "constant")


def seed_all(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lr_multiplier(step: int, total: int, warmup: int, min_ratio: float, schedule: str = "cosine") -> float:
    """Multiplier of the base LR at optimiser step `step` (0-based) of `total`: linear warm-up over `warmup`
    steps, then constant or cosine decay from 1 to `min_ratio` at step `total` (and `min_ratio` after it)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * frac))


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int, min_ratio: float) -> Callable[[int], float]:
    """`lr_multiplier` as the step -> multiplier function ``LambdaLR`` takes."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    return lambda step: lr_multiplier(step, total_steps, warmup_steps, min_ratio, schedule)


def log_step(path: Path, record: dict[str, Any]) -> None:
    """Append `record` as one JSON line to `path` (the JSONL step log)."""
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")
