"""Epoch training of OneRec-Think with the item head: validation each epoch, best-epoch selection, refit.

The recipe of the ``align`` stage (`model.think.stages`), in two runs named by what they are:

- **selection** (``run="selection"``): trains on the training part of every sequence for up to
  ``epochs`` epochs (warm-up + cosine LR over all of them), validates after each epoch on a fixed
  subset of validation users (R@10 / N@10 of the item head over the whole catalogue: one forward per
  user, no beam) and keeps the best epoch's weights in the folder; stops after ``patience`` epochs
  without improvement. The best epoch goes into ``itemic.json`` (``best_epoch``).
- **refit** (``run="refit"``): the same schedule (``epochs`` long) on train+valid sequences, stopped
  after the selection run's ``best_epoch``; no validation (the validation targets are training data).

Loss per batch: LM cross-entropy on target tokens + ``item_loss_weight`` x item cross-entropy at
every ``<|item_begin|>`` (`model.think.itemhead`). bf16 autocast on by default (measured in
``benchmarks/think_train_speed.py``). Resumes after a kill from ``<out>/trainer_state.pt`` (written
every ``save_every`` steps and at each epoch end) with the same batch order as an uninterrupted run.
Not here: the data builders (`model.think.align_data`), the stage runner (`model.think.stages`).
"""

from __future__ import annotations

import math
import random
import re
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from model.semantic_ids import SemanticIDs
from model.think.align_data import direct_prefix
from model.think.itemhead import ItemHead, TiedItemHead, item_loss, targets_at_item_begin
from model.think.sft import LOG, STATE, LossFn
from model.training import log_step, lr_multiplier
from model.trie import TokenMap
from services.catalog import Example

MIN_LR_RATIO = 0.05  # the recipe's cosine ends at 0.05 x the peak LR
Rows = list[tuple[list[int], int]]


@dataclass
class FitConfig:
    """The epoch recipe (defaults = the documented run)."""

    epochs: int = 6  # schedule length (cosine over all of them)
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_frac: float = 0.03
    bf16: bool = True
    item_loss_weight: float = 1.0
    val_users: int = 2000
    patience: int = 3  # selection: stop after this many epochs without a better val R@10
    stop_after: int | None = None  # refit: the selection run's best epoch
    run: str = "selection"  # or "refit"
    save_every: int = 100
    max_len: int = 320  # validation prompt tokens (the training texts' cap)
    ahead_weight: float = 0.0  # item loss on the item after next too (`lm_and_item_loss`)
    item_step_scale: float = 1.0  # tied item rows move by this share of the optimizer's step (0: kept fixed)
    next_weight: float = 1.0  # weight of the next item's cross-entropy in the item loss (`lm_and_item_loss`)
    dropout: float = 0.0  # training-only dropout on the input embeddings and each layer's residual branches
    seed: int = 0


def lm_and_item_loss(model: Any, head: ItemHead, ids: torch.Tensor, att: torch.Tensor, labels: torch.Tensor,
                     tm: TokenMap, row_of_codes: dict[tuple[int, ...], int], item_weight: float,
                     ahead_weight: float = 0.0, next_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(LM cross-entropy on labelled tokens, item cross-entropy at each labelled ``<|item_begin|>``).

    The item loss is `next_weight` x the next item's cross-entropy (+ the after-next term below); `next_weight` 0
    with `ahead_weight` > 0 trains the head for the after-next item only.

    With `ahead_weight` > 0 the item loss also asks each ``<|item_begin|>`` for the item *after* the next one
    (its next labelled item block in the same text): the offline tier's prefixes are read one or more
    interactions later, so a head trained on both horizons caches what the user buys next *and* after."""
    h = model.base_model(input_ids=ids, attention_mask=att).last_hidden_state  # (B, T, D)
    if tm.has_items:
        # the LM softmax covers the text and code vocabulary only: an item token follows its codes
        # deterministically (nothing to learn) and the item rows are trained by the item loss below; this keeps
        # the output layer as cheap as without item tokens ((B, T, item_offset) instead of (B, T, V))
        cut = int(tm.item_offset or 0)
        logits = h @ model.get_output_embeddings().weight[:cut].T  # (B, T, cut)
        labels = labels.masked_fill(labels >= cut, -100)
    else:
        logits = model.get_output_embeddings()(h)  # (B, T, V)
    lm = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
    if item_weight <= 0:
        return lm, lm.new_zeros(())
    pos, rows = targets_at_item_begin(ids, labels, tm, row_of_codes)
    loss = next_weight * item_loss(head, h, pos, rows)
    if ahead_weight > 0 and rows.numel() > 1:
        same = pos[1:, 0] == pos[:-1, 0]  # consecutive targets of one text (nonzero is row-major)
        if bool(same.any()):
            loss = loss + ahead_weight * item_loss(head, h, pos[:-1][same], rows[1:][same.cpu()])
    return lm, loss


def row_index(sid: SemanticIDs) -> dict[tuple[int, ...], int]:
    """Item row of each full code tuple (the item head's and the item tokens' order)."""
    return {tuple(int(x) for x in c): r for r, c in enumerate(sid.codes)}


def item_aware_loss(tm: TokenMap, sid: SemanticIDs, item_weight: float, ahead_weight: float = 0.0,
                    next_weight: float = 1.0) -> LossFn:
    """`lm_and_item_loss` as an `sft_loop` loss for a model with item tokens (the tied head reads its rows).

    The model passed at each step may be a PEFT wrapper (the LoRA layers live inside the wrapped model, so the
    wrapped model's forward is the adapted one); its item rows are the embedding rows the tied head scores with.
    """
    if not tm.has_items:
        raise ValueError("item_aware_loss needs a model with item tokens (TokenMap.item_offset is None)")
    rows = row_index(sid)

    def loss(model: Any, ids: torch.Tensor, att: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        hf = model.get_base_model() if hasattr(model, "get_base_model") else model
        head = TiedItemHead(hf, tm)
        lm, il = lm_and_item_loss(hf, head, ids, att, labels, tm, rows, item_weight, ahead_weight, next_weight)
        return lm + item_weight * il

    return loss


@torch.no_grad()
def validate(model: Any, head: ItemHead, tok: Any, sid: SemanticIDs, examples: Sequence[Example], bf16: bool,
             batch_size: int = 128, max_len: int = 320, item_ids: bool = False) -> dict[str, float]:
    """Item-head ranking over the whole catalogue: R@10, N@10 (and @5) on `examples` (direct prompt)."""
    from model.metrics import score
    from model.think.decode import final_hidden

    model.eval()
    pad = int(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].history))
    ranked: list[list[int]] = [[] for _ in examples]
    for s in range(0, len(order), batch_size):
        chunk = order[s : s + batch_size]
        texts = [direct_prefix([sid.codes_of(i) for i in examples[j].history if sid.has_item(i)],
                               item_ids=item_ids) for j in chunk]
        rows = [r[-max_len:] for r in tok(texts, add_special_tokens=False)["input_ids"]]
        h = final_hidden(model, rows, pad, bf16)
        top = head.logits(h).topk(10, dim=-1).indices.cpu().numpy()
        for j, r in zip(chunk, top, strict=True):
            ranked[j] = [int(sid.item_ids[x]) for x in r]
    return score(ranked, [e.target for e in examples])


def fit(model: Any, head: ItemHead, tok: Any, tm: TokenMap, sid: SemanticIDs, epoch_rows: Callable[[int], Rows],
        val: Sequence[Example], cfg: FitConfig, out: Path, save: Callable[[], object], resume: bool = False
        ) -> dict[str, Any]:
    """Train for up to `cfg.epochs` epochs (see the module docstring); returns the stage record.

    `epoch_rows(e)` gives epoch e's tokenised texts (same count every epoch); `save()` writes the model
    and head into `out` (called for the best epoch in selection, at the end in refit).
    """
    from model.think.sft import batches, collate

    if cfg.run not in ("selection", "refit"):
        raise ValueError(f"run must be 'selection' or 'refit', got {cfg.run!r}")
    if cfg.run == "selection" and not val:
        raise ValueError("a selection run needs validation users (val_users > 0)")
    dev = next(model.parameters()).device
    row_of_codes = row_index(sid)
    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    spe = math.ceil(len(epoch_rows(0)) / cfg.batch_size)
    total, warm = cfg.epochs * spe, int(cfg.warmup_frac * cfg.epochs * spe)
    last_epoch = min(cfg.epochs, cfg.stop_after or cfg.epochs)
    state: dict[str, Any] = {"epoch": 0, "step": 0, "curve": [], "best_epoch": 0, "best": -1.0, "train_s": 0.0}
    if resume and (out / STATE).is_file():
        st = torch.load(out / STATE, weights_only=False)
        model.load_state_dict(st["model"])
        head.load_state_dict(st["head"])
        opt.load_state_dict(st["optimizer"])
        state = st["state"]
    pad = int(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    bar = tqdm(total=last_epoch * spe, initial=state["epoch"] * spe + state["step"], desc=f"fit[{cfg.run}]",
               unit="step")

    def checkpoint() -> None:
        torch.save({"model": model.state_dict(), "head": head.state_dict(), "optimizer": opt.state_dict(),
                    "state": state, "config": asdict(cfg)}, out / STATE)

    best_weights: dict[str, Any] | None = None
    tied = isinstance(head, TiedItemHead)  # its rows are model weights: saved and restored with the model
    best_head = None if tied else head.weight.detach().clone()

    def stop_early() -> bool:
        return cfg.run == "selection" and state["epoch"] - state["best_epoch"] >= cfg.patience

    hooks = residual_dropout(model, cfg.dropout)
    try:
        while state["epoch"] < last_epoch and not stop_early():
            e = state["epoch"]
            rows = epoch_rows(e)
            order = batches(rows, cfg.batch_size, cfg.seed + e)
            model.train()
            t0, tokens, lm_sum, it_sum, n = time.perf_counter(), 0, 0.0, 0.0, 0
            for s in range(state["step"], len(order)):
                g = e * spe + s
                for grp in opt.param_groups:
                    grp["lr"] = cfg.lr * lr_multiplier(g, total, warm, MIN_LR_RATIO)
                ids, att, labels = (t.to(dev) for t in collate([rows[i] for i in order[s]], pad))
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16 and dev.type == "cpu"):
                    lm, il = lm_and_item_loss(model, head, ids, att, labels, tm, row_of_codes, cfg.item_loss_weight,
                                              cfg.ahead_weight, cfg.next_weight)
                    loss = lm + cfg.item_loss_weight * il
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                with scaled_item_step(head, cfg.item_step_scale):
                    opt.step()
                tokens += int(att.sum())
                lm_sum, it_sum, n = lm_sum + float(lm.detach()), it_sum + float(il.detach()), n + 1
                state["step"] = s + 1
                bar.update(1)
                bar.set_postfix(epoch=e + 1, lm=f"{lm_sum / n:.3f}", item=f"{it_sum / n:.3f}",
                                tok_s=f"{tokens / (time.perf_counter() - t0):.0f}")
                if (s + 1) % cfg.save_every == 0:
                    state["train_s"] += time.perf_counter() - t0
                    t0, tokens = time.perf_counter(), 0
                    checkpoint()
            state["train_s"] += time.perf_counter() - t0
            rec: dict[str, Any] = {"epoch": e + 1, "lm_loss": round(lm_sum / max(n, 1), 4),
                                   "item_loss": round(it_sum / max(n, 1), 4), "train_s": round(state["train_s"], 1)}
            state["epoch"], state["step"] = e + 1, 0
            if cfg.run == "selection":
                tv = time.perf_counter()
                m = validate(model, head, tok, sid, val, cfg.bf16, max_len=cfg.max_len, item_ids=tm.has_items)
                rec |= {"val_recall@10": m["recall@10"], "val_ndcg@10": m["ndcg@10"],
                        "val_s": round(time.perf_counter() - tv, 1)}
                if m["recall@10"] > state["best"]:
                    state["best"], state["best_epoch"] = m["recall@10"], e + 1
                    save()
                    best_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
                    best_head = None if tied else head.weight.detach().clone()
                bar.write(f"epoch {e + 1}: val R@10 {m['recall@10']:.4f} N@10 {m['ndcg@10']:.4f} "
                          f"(best epoch {state['best_epoch']})")
            else:
                bar.write(f"epoch {e + 1}: lm {rec['lm_loss']:.3f} item {rec['item_loss']:.3f} (refit, no validation)")
            state["curve"].append(rec)
            log_step(out / LOG, {"stage": f"fit-{cfg.run}", **rec})
            checkpoint()
    finally:  # the hooks never outlive training, even when it fails
        bar.close()
        for hk in hooks:
            hk.remove()
    if cfg.run == "refit":
        save()
    elif best_weights is not None:  # the caller saves `model` again: hand it the best epoch's weights
        model.load_state_dict(best_weights)
        if best_head is not None:
            head.weight.data.copy_(best_head)
    elif state["best_epoch"] > 0:  # resumed after the last epoch: the folder holds the best weights
        from safetensors.torch import load_file

        from model.think.itemhead import HEAD_FILE

        model.load_state_dict(load_file(out / "model.safetensors"), strict=False)
        if not tied:
            head.weight.data.copy_(load_file(out / HEAD_FILE)["weight"])
    model.eval()
    return {"run": cfg.run, "epochs": cfg.epochs, "epochs_trained": state["epoch"],
            "best_epoch": state["best_epoch"] if cfg.run == "selection" else cfg.stop_after,
            "best_val_recall@10": state["best"] if cfg.run == "selection" else None,
            "steps_per_epoch": spe, "train_s": round(state["train_s"], 1), "curve": state["curve"],
            "fit_config": asdict(cfg)}


def residual_dropout(model: Any, p: float) -> list[Any]:
    """Dropout (rate `p`, training mode only) on the input embeddings and on the output of every decoder layer's
    attention and MLP (the residual branches), as forward hooks; returns the handles (remove them after training).

    The online OneRec trains 20 epochs with dropout 0.3 in the same places; the HF causal LMs here have none
    (Qwen3: attention dropout only), and the think model memorised its training sequences from epoch 3 on. The
    hooks leave the weights' layout alone: the saved folder and vLLM see a plain model."""
    if p <= 0:
        return []
    if not 0 < p < 1:
        raise ValueError(f"dropout must be in [0, 1), got {p}")

    def drop(m: torch.nn.Module, _args: Any, out: Any) -> Any:
        if not m.training:
            return out
        if isinstance(out, tuple):  # attention: (output, weights)
            return (F.dropout(out[0], p, True), *out[1:])
        return F.dropout(out, p, True)

    branches = [m for n, m in model.named_modules() if re.search(r"layers\.\d+\.(self_attn|mlp)$", n)]
    if not branches:
        raise ValueError("dropout: found no decoder layers (modules named layers.N.self_attn / layers.N.mlp)")
    return [m.register_forward_hook(drop) for m in [model.get_input_embeddings(), *branches]]


@contextmanager
def scaled_item_step(head: ItemHead, scale: float) -> Iterator[None]:
    """Around an optimizer step: the tied item rows (`TiedItemHead`) end up `scale` of the way from where they
    were to where the step put them (0: unchanged, 1: the plain step). Adam normalises gradients, so scaling
    them would not slow these rows; scaling the step does. A regulariser for warm-started rows: 3.1M of the
    model's 6.3M parameters are item rows, which otherwise memorise train + valid within two epochs."""
    if scale == 1.0 or not isinstance(head, TiedItemHead):
        yield
        return
    with torch.no_grad():
        before = head.weight.detach().clone()
    yield
    with torch.no_grad():
        rows = head.weight
        rows.copy_(before.lerp_(rows, scale))


def val_subset(valid: list[Example], n: int, seed: int = 0) -> list[Example]:
    """The fixed validation users of a selection run."""
    if n >= len(valid):
        return valid
    idx = sorted(random.Random(seed).sample(range(len(valid)), n))
    return [valid[i] for i in idx]
