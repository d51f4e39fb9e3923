"""Supervised fine-tuning of OneRec-Think: training rows and the resumable step loop.

Rows are tokenised (ids, prompt length) pairs (`tokenize`), grouped into length-similar batches (`batches`)
and padded into tensors (`collate`); shared by the step loop here and the epoch recipe (`model.think.fit`).
`sft_loop` is cross-entropy on target tokens for a fixed number of steps (warm-up + cosine LR from
`model.training`, JSONL log, checkpoint and resume via ``<out>/trainer_state.pt``), used by the base,
align (fixed-step), and activate stages (`model.think.stages`).
Not here: the stages' data (`model.think.align_data`, `model.think.activate_data`), the epoch recipe.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from model.think import align_data as T
from model.training import log_step, lr_multiplier

STATE = "trainer_state.pt"  # optimiser state + step of an interrupted stage, in its output folder
LOG = "train_log.jsonl"  # one JSON line per logged step, in the stage's output folder
MIN_LR_RATIO = 0.1  # the step loop's cosine ends at 0.1 x the peak LR
LossFn = Callable[[Any, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def tokenize(samples: list[T.Sample], tok: Any, max_len: int) -> list[tuple[list[int], int]]:
    """(ids, n_prompt) per sample; prompt and target are tokenised separately (as at inference)."""
    prompts = tok([s.prompt for s in samples], add_special_tokens=False)["input_ids"]
    targets = tok([s.target for s in samples], add_special_tokens=False)["input_ids"]
    out = []
    for p, t in zip(prompts, targets, strict=True):
        t = t[:max_len]
        p = p[-(max_len - len(t)) :] if max_len > len(t) else []
        out.append((p + t, len(p)))
    return out


def batches(rows: list[tuple[list[int], int]], batch_size: int, seed: int) -> list[list[int]]:
    """Index batches of similar lengths (sorted within shuffled pools of 50 batches), in shuffled order."""
    rng = random.Random(seed)
    order = list(range(len(rows)))
    rng.shuffle(order)
    pool = batch_size * 50
    out: list[list[int]] = []
    for s in range(0, len(order), pool):
        chunk = sorted(order[s : s + pool], key=lambda i: len(rows[i][0]))
        out += [chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size)]
    rng.shuffle(out)
    return out


def collate(rows: list[tuple[list[int], int]], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, attention mask and labels (-100 on prompt and padding)."""
    width = max(len(r[0]) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    att = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (r, n_prompt) in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        att[i, : len(r)] = 1
        labels[i, n_prompt : len(r)] = torch.tensor(r[n_prompt:])
    return ids, att, labels


@dataclass
class LoopConfig:
    """Optimisation settings shared by the supervised stages."""

    steps: int = 1000
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_frac: float = 0.05
    max_len: int = 320
    save_every: int = 200
    seed: int = 0


def endless(rows: list[tuple[list[int], int]], batch_size: int, seed: int) -> Iterator[list[int]]:
    epoch = 0
    while True:
        yield from batches(rows, batch_size, seed + epoch)
        epoch += 1


def sft_loop(model: Any, tok: Any, rows: list[tuple[list[int], int]], cfg: LoopConfig, out: Path, desc: str,
             params: list[torch.nn.Parameter] | None = None, grad_hook: Callable[[], None] | None = None,
             save: Callable[[Any, Path], object] | None = None, resume: bool = False, step_offset: int = 0,
             total_steps: int | None = None, loss_fn: LossFn | None = None) -> dict[str, float]:
    """Cross-entropy on target tokens for `cfg.steps` steps; checkpoints and resumes via ``<out>/trainer_state.pt``.

    `step_offset`/`total_steps` let two sub-stages (warm-up, multi-task) share one folder and one bar.
    `loss_fn(model, ids, attention_mask, labels)` replaces the model's own LM loss (e.g. LM + item-head loss).
    """
    total = total_steps or cfg.steps
    params = params if params is not None else [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    start = 0
    state_path = out / STATE
    if resume and state_path.is_file():
        st = torch.load(state_path, weights_only=False)
        if int(st["step"]) >= step_offset + cfg.steps:  # this sub-stage finished before the interruption
            return {"steps": 0, "resumed_past": True}
        if st.get("desc") == desc:
            opt.load_state_dict(st["optimizer"])
            start = int(st["step"]) - step_offset
    if start >= cfg.steps:
        return {"steps": 0}
    it = endless(rows, cfg.batch_size, cfg.seed)
    for _ in range(start):  # same batch order as an uninterrupted run
        next(it)
    pad = int(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    device = next(model.parameters()).device
    warm = int(cfg.warmup_frac * cfg.steps)
    bar = tqdm(total=total, initial=step_offset + start, desc=desc, unit="step")
    model.train()
    t0, tokens, ema = time.perf_counter(), 0, None
    for step in range(start, cfg.steps):
        for g in opt.param_groups:
            g["lr"] = cfg.lr * lr_multiplier(step, cfg.steps, warm, MIN_LR_RATIO)
        ids, att, labels = (t.to(device) for t in collate([rows[i] for i in next(it)], pad))
        loss = (loss_fn(model, ids, att, labels) if loss_fn is not None
                else model(input_ids=ids, attention_mask=att, labels=labels).loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_hook is not None:
            grad_hook()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        tokens += int(att.sum().item())
        lv = float(loss.detach())
        ema = lv if ema is None else 0.98 * ema + 0.02 * lv
        bar.update(1)
        bar.set_postfix(loss=f"{ema:.3f}", tok_s=f"{tokens / (time.perf_counter() - t0):.0f}")
        done = step + 1 == cfg.steps
        if (step + 1) % 50 == 0 or done:
            log_step(out / LOG, {"stage": desc, "step": step_offset + step + 1, "loss": round(ema, 4),
                       "lr": opt.param_groups[0]["lr"], "tok_s": round(tokens / (time.perf_counter() - t0), 1)})
        if save is not None and ((step + 1) % cfg.save_every == 0 or done):
            save(model, out)
            torch.save({"desc": desc, "step": step_offset + step + 1, "optimizer": opt.state_dict()}, state_path)
    bar.close()
    model.eval()
    secs = time.perf_counter() - t0
    return {"steps": cfg.steps - start, "loss": round(ema or 0.0, 4), "seconds": round(secs, 1),
            "tok_s": round(tokens / max(secs, 1e-9), 1)}
