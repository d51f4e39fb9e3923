"""CLI for the OneRec-Think stages; every stage reads an HF folder and writes one (loadable by vLLM).

    python -m model.think.train base      --out artifacts/think/base      # tokenizer + tiny Qwen3 (+ LM steps)
    python -m model.think.train align     --init .../base --out .../ia    # warm-up + multi-task
    python -m model.think.train align     --init .../base --out .../seq --tasks seq --warmup-steps 0   # "Base"
    python -m model.think.train activate  --init .../ia   --out .../act   # pruned-context rationales + LoRA SFT
    python -m model.think.train enhance   --init .../act  --out .../rl    # GRPO, Rollout-Beam reward

`--base-model PATH` (stage base) extends any local HF causal LM instead of building the tiny one.
Every stage shows a progress bar, logs to ``<out>/train_log.jsonl``, checkpoints to ``<out>`` every
``--save-every`` steps (model + ``trainer_state.pt``) and continues from there with ``--resume``.
Each folder holds ``itemic.json`` (code layout, stage history) and ``sid/`` (its semantic IDs).
Not here: the prompt format (`tasks`), decoding (`decode`), evaluation (`model.think.evaluate`).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from model.semantic_ids import SemanticIDs, point_current
from model.think import tasks as T
from model.think.rows import batches, collate, tokenize
from model.think.tokens import (
    TinyBaseConfig,
    build_tiny_base,
    extend_base_model,
    load_think,
    read_itemic,
    save_think,
)
from model.trie import CodeTrie, TokenMap
from services.catalog import Dataset, leave_one_out, load_dataset

STATE = "trainer_state.pt"
LOG = "train_log.jsonl"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


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


# --------------------------------------------------------------------------------------------
# data plumbing



def endless(rows: list[tuple[list[int], int]], batch_size: int, seed: int) -> Iterator[list[int]]:
    epoch = 0
    while True:
        yield from batches(rows, batch_size, seed + epoch)
        epoch += 1


# --------------------------------------------------------------------------------------------
# the supervised loop (resumable)


def lr_at(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / max(warmup, 1)
    frac = (step - warmup) / max(total - warmup, 1)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))


def _log(out: Path, rec: dict) -> None:
    with (out / LOG).open("a") as f:
        f.write(json.dumps(rec) + "\n")


def sft_loop(model: Any, tok: Any, rows: list[tuple[list[int], int]], cfg: LoopConfig, out: Path, desc: str,
             params: list[torch.nn.Parameter] | None = None, grad_hook: Callable[[], None] | None = None,
             save: Callable[[Any, Path], object] | None = None, resume: bool = False, step_offset: int = 0,
             total_steps: int | None = None) -> dict[str, float]:
    """Cross-entropy on target tokens for `cfg.steps` steps; checkpoints and resumes via ``<out>/trainer_state.pt``.

    `step_offset`/`total_steps` let two sub-stages (warm-up, multi-task) share one folder and one bar.
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
            g["lr"] = cfg.lr * lr_at(step, cfg.steps, warm)
        ids, att, labels = (t.to(device) for t in collate([rows[i] for i in next(it)], pad))
        loss = model(input_ids=ids, attention_mask=att, labels=labels).loss
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
            _log(out, {"stage": desc, "step": step_offset + step + 1, "loss": round(ema, 4),
                       "lr": opt.param_groups[0]["lr"], "tok_s": round(tokens / (time.perf_counter() - t0), 1)})
        if save is not None and ((step + 1) % cfg.save_every == 0 or done):
            save(model, out)
            torch.save({"desc": desc, "step": step_offset + step + 1, "optimizer": opt.state_dict()}, state_path)
    bar.close()
    model.eval()
    secs = time.perf_counter() - t0
    return {"steps": cfg.steps - start, "loss": round(ema or 0.0, 4), "seconds": round(secs, 1),
            "tok_s": round(tokens / max(secs, 1e-9), 1)}


# --------------------------------------------------------------------------------------------
# helpers shared by the stages


@dataclass
class Context:
    ds: Dataset
    sid: SemanticIDs
    labels: dict[int, str]
    train: dict[int, list[int]]


def device_of(args: argparse.Namespace) -> torch.device:
    if args.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(args.device)


def load_on(folder: Path, args: argparse.Namespace) -> tuple[Any, Any, TokenMap]:
    """`load_think` onto the device chosen by ``--device``."""
    model, tok, tm = load_think(folder)
    return model.to(device_of(args)), tok, tm


def load_context(data_dir: Path, sid_dir: Path, limit_users: int | None) -> Context:
    ds = load_dataset(data_dir)
    if limit_users:
        keep = sorted(ds.sequences)[:limit_users]
        seqs = {u: ds.sequences[u] for u in keep}
        ds = Dataset(ds.catalog, seqs, leave_one_out(seqs))
    sid = SemanticIDs.load(sid_dir)
    return Context(ds, sid, T.category_labels(ds.catalog, sid), ds.splits.train)


def finish(model: Any, tok: Any, tm: TokenMap, out: Path, init: Path | None, stage: dict, ctx: Context) -> None:
    """Save the final folder, its SIDs and the stage record in itemic.json."""
    history = read_itemic(init).get("stages", []) if init is not None else []
    meta = read_itemic(out) if (out / "itemic.json").exists() else {}
    base_model = meta.get("base_model") or (read_itemic(init).get("base_model") if init else None)
    save_think(model, tok, tm, out, extra={"stages": history + [stage], "base_model": base_model,
                                           "params": int(sum(p.numel() for p in model.parameters())),
                                           "think": stage["stage"] in ("activate", "enhance")})
    ctx.sid.save(out / "sid")


def prepare_out(out: Path, init: Path | None, resume: bool) -> Path:
    """Fresh output folder (copy of `init` when given) unless resuming from an interrupted run."""
    if resume and (out / STATE).is_file():
        return out
    if out.exists():
        shutil.rmtree(out)
    if init is not None:
        shutil.copytree(init, out, ignore=shutil.ignore_patterns(STATE, LOG, "adapter"))
    else:
        out.mkdir(parents=True)
    return out


def item_rows(tm: TokenMap) -> torch.Tensor:
    ids = list(range(tm.offset, tm.offset + tm.num_levels * tm.codebook_size))
    return torch.tensor(ids + [int(tm.item_begin or 0), int(tm.item_end or 0)])


# --------------------------------------------------------------------------------------------
# stages


def run_base(args: argparse.Namespace, ctx: Context) -> Path:
    """Tokenizer + tiny Qwen3 (or a local base model) with itemic tokens, then optional LM steps on text."""
    out: Path = args.out
    lm_lines = T.default_lm_corpus(ctx.ds.catalog, ctx.labels)
    if args.lm_corpus:
        lm_lines = Path(args.lm_corpus).read_text().splitlines()
    if not (args.resume and (out / STATE).is_file()):
        if out.exists():
            shutil.rmtree(out)
        if args.base_model:
            extend_base_model(args.base_model, ctx.sid, out)
        else:
            cfg = TinyBaseConfig(bpe_vocab=args.bpe_vocab, hidden=args.hidden, layers=args.layers, heads=args.heads,
                                 kv_heads=args.kv_heads, head_dim=args.head_dim, intermediate=args.intermediate,
                                 seed=args.seed)
            # BPE corpus: catalogue text, category words and the prompt vocabulary of every task
            bpe_text = lm_lines + [f"{T.PERSONA_TAG} likes {T.HISTORY_TAG} bought: item: title: the user buys "
                                   "recently next: so"] * 50
            build_tiny_base(bpe_text, ctx.sid, out, cfg)
    model, tok, tm = load_on(out, args)
    stats: dict[str, Any] = {"steps": 0}
    if args.steps > 0:
        rows = tokenize(T.lm_samples(lm_lines), tok, args.max_len)
        loop = LoopConfig(args.steps, args.batch_size, args.lr, max_len=args.max_len, save_every=args.save_every,
                          seed=args.seed)
        stats = sft_loop(model, tok, rows, loop, out, "base-lm", save=lambda m, o: save_think(m, tok, tm, o),
                         resume=args.resume)
    finish(model, tok, tm, out, None, {"stage": "base", **stats, "lm_corpus": args.lm_corpus or "catalogue titles"},
           ctx)
    return out


def with_item_tokens(args: argparse.Namespace, ctx: Context, model: Any, tok: Any, tm: TokenMap
                     ) -> tuple[Any, TokenMap]:
    """``--item-tokens``: one item-level token per item (tied to the item head), initialised from the online
    OneRec's item embeddings when ``--item-init ONEREC_FOLDER`` is given (`model.think.warm_start`)."""
    from model.think.tokens import add_item_id_tokens
    from model.think.warm_start import onerec_item_init

    init = onerec_item_init(args.item_init, ctx.sid, model, args.seed) if args.item_init else None
    tm = add_item_id_tokens(model, tok, tm, ctx.sid, init)
    print(f"item tokens: {tm.num_items} from id {tm.item_offset}"
          + (f", rows from OneRec {args.item_init}" if args.item_init else ", rows from the code tokens"))
    return model.to(device_of(args)), tm


def refit_source(args: argparse.Namespace, ctx: Context) -> tuple[dict[int, list[int]], dict]:
    """Interactions the align stage learns from, and the selection run's record when refitting.

    Selection: the training part of every sequence. Refit (``--refit-of SEL``): train + valid (all but
    the test item), for the selection run's best epoch of the same schedule.
    """
    if args.refit_epochs:  # a fixed schedule on train + valid, no selection run (its length chosen beforehand)
        if args.refit_of is not None:
            raise SystemExit("--refit-epochs and --refit-of exclude each other")
        return {u: s[:-1] for u, s in ctx.ds.sequences.items()}, {"epochs": args.refit_epochs,
                                                                  "best_epoch": args.refit_epochs}
    if args.refit_of is None:
        return ctx.train, {}
    sel = [st for st in read_itemic(args.refit_of).get("stages", []) if st.get("run") == "selection"]
    if not sel or not sel[-1].get("best_epoch"):
        raise SystemExit(f"--refit-of {args.refit_of}: no selection run with a best_epoch in its itemic.json")
    return {u: s[:-1] for u, s in ctx.ds.sequences.items()}, sel[-1]


def run_align(args: argparse.Namespace, ctx: Context) -> Path:
    """Itemic Alignment: token warm-up (item-token embeddings only) then multi-task integration.

    With ``--epochs N`` (the default recipe) the multi-task part is `model.think.fit` (item head,
    validation each epoch, best epoch; ``--refit-of`` refits on train+valid); ``--epochs 0`` runs the
    older fixed-step loop (``--steps``).
    """
    out = prepare_out(args.out, args.init, args.resume)
    model, tok, tm = load_on(out, args)
    if args.item_tokens and not tm.has_items:
        model, tm = with_item_tokens(args, ctx, model, tok, tm)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = set(tasks) - {"persona", "seq", "caption", "lm"}
    if unknown:
        raise ValueError(f"--tasks: unknown task(s) {sorted(unknown)}; choose from persona, seq, caption, lm")
    cat, sid = ctx.ds.catalog, ctx.sid
    source, selection = refit_source(args, ctx)
    groups: dict[str, list[T.Sample]] = {}
    if "persona" in tasks or args.warmup_steps > 0:
        groups["persona"] = T.persona_samples(source, cat, sid, ctx.labels)
    if "seq" in tasks:
        groups["seq"] = T.seq_samples(source, sid, item_ids=tm.has_items)
    if "caption" in tasks:
        groups["caption"] = T.caption_samples(cat, sid, ctx.labels)
    if "lm" in tasks:
        lines = T.default_lm_corpus(cat, ctx.labels)
        if args.lm_corpus:
            lines = Path(args.lm_corpus).read_text().splitlines()
        groups["lm"] = T.lm_samples(lines)
    save = lambda m, o: save_think(m, tok, tm, o)  # noqa: E731
    total = args.warmup_steps + (0 if args.epochs > 0 else args.steps)
    stats: dict[str, Any] = {}
    if args.warmup_steps > 0:
        # token warm-up: only the embedding rows of itemic tokens move (tied head rows move with them)
        for p in model.parameters():
            p.requires_grad_(False)
        emb = model.get_input_embeddings().weight
        emb.requires_grad_(True)
        keep = torch.zeros(emb.shape[0], 1, dtype=torch.bool, device=emb.device)
        keep[item_rows(tm).to(emb.device)] = True

        def only_items() -> None:
            if emb.grad is not None:
                emb.grad.mul_(keep)

        rows = tokenize(groups["persona"], tok, args.max_len)
        loop = LoopConfig(args.warmup_steps, args.batch_size, args.warmup_lr, weight_decay=0.0, max_len=args.max_len,
                          save_every=args.save_every, seed=args.seed)
        stats["warmup"] = sft_loop(model, tok, rows, loop, out, "align-warmup", params=[emb], grad_hook=only_items,
                                   save=save, resume=args.resume, total_steps=total)
        for p in model.parameters():
            p.requires_grad_(True)
    if args.epochs > 0:
        stats["fit"] = fit_epochs(args, ctx, model, tok, tm, groups, tasks, selection, out)
        stats["run"] = stats["fit"]["run"]
        stats["best_epoch"] = stats["fit"]["best_epoch"]
        stats["epochs"] = stats["fit"]["epochs"]
    elif args.steps > 0:
        weights = {"persona": args.w_persona, "seq": args.w_seq, "caption": args.w_caption, "lm": args.w_lm}
        mixed = T.mix({k: v for k, v in groups.items() if k in tasks}, weights, args.steps * args.batch_size,
                      args.seed)
        rows = tokenize(mixed, tok, args.max_len)
        loop = LoopConfig(args.steps, args.batch_size, args.lr, max_len=args.max_len, save_every=args.save_every,
                          seed=args.seed + 1)
        stats["multitask"] = sft_loop(model, tok, rows, loop, out, "align-multitask", save=save, resume=args.resume,
                                      step_offset=args.warmup_steps, total_steps=total)
        stats["task_counts"] = {k: sum(1 for s in mixed if s.task == k) for k in tasks}
    finish(model, tok, tm, out, args.init, {"stage": "align", "tasks": tasks, **stats}, ctx)
    return out


def fit_epochs(args: argparse.Namespace, ctx: Context, model: Any, tok: Any, tm: TokenMap,
               groups: dict[str, list[T.Sample]], tasks: list[str], selection: dict, out: Path) -> dict[str, Any]:
    """The epoch recipe: every sequence text once per epoch plus the other tasks in proportion to their weights."""
    from model.think.fit import FitConfig, fit, val_subset
    from model.think.itemhead import ItemHead, ItemHeadConfig, TiedItemHead

    if "seq" not in tasks:
        raise ValueError("--epochs counts passes over the sequence task: --tasks must include seq")
    weights = {"persona": args.w_persona, "seq": args.w_seq, "caption": args.w_caption, "lm": args.w_lm}
    seq_rows = tokenize(groups["seq"], tok, args.max_len)
    pools = {k: tokenize(groups[k], tok, args.max_len) for k in tasks if k != "seq" and groups.get(k)}
    counts = {k: round(len(seq_rows) * weights[k] / max(weights["seq"], 1e-9)) for k in pools}

    def epoch_rows(e: int) -> list[tuple[list[int], int]]:
        rng = random.Random(args.seed * 1000 + e)
        rows = list(seq_rows)
        for k, pool in pools.items():
            rows += [pool[rng.randrange(len(pool))] for _ in range(counts[k])]
        return rows

    refit = bool(selection)
    cfg = FitConfig(epochs=int(selection.get("epochs", args.epochs)) if refit else args.epochs,
                    batch_size=args.batch_size, lr=args.lr, bf16=args.bf16, item_loss_weight=args.item_loss_weight,
                    val_users=0 if refit else args.val_users, patience=args.patience,
                    stop_after=int(selection["best_epoch"]) if refit else None,
                    run="refit" if refit else "selection", save_every=args.save_every, max_len=args.max_len,
                    ahead_weight=args.ahead_weight, seed=args.seed)
    hcfg = ItemHeadConfig(args.item_loss_weight, args.item_score_weight)
    head = TiedItemHead(model, tm, hcfg) if tm.has_items else ItemHead.from_codes(model, tm, ctx.sid, hcfg)

    def save() -> None:
        save_think(model, tok, tm, out)
        head.save(out, ctx.sid)

    val = [] if refit else val_subset(ctx.ds.splits.valid, args.val_users, args.seed)
    rec = fit(model, head, tok, tm, ctx.sid, epoch_rows, val, cfg, out, save, resume=args.resume)
    head.save(out, ctx.sid)
    rec["texts_per_epoch"] = {"seq": len(seq_rows), **counts}
    if refit:
        rec["refit_of"] = str(args.refit_of) if args.refit_of else f"fixed {args.refit_epochs} epochs"
    return rec


def run_activate(args: argparse.Namespace, ctx: Context) -> Path:
    """Reasoning Activation: teacher rationales from pruned contexts, then LoRA SFT on full histories."""
    from model.think.reasoning import ItemEmbeddings, activation_samples, make_teacher

    out = prepare_out(args.out, args.init, args.resume)
    model, tok, tm = load_on(out, args)
    emb = ItemEmbeddings.build(ctx.ds.catalog, args.embeddings, cache_dir=args.cache_dir)
    teacher = make_teacher(args.teacher, ctx.ds.catalog, ctx.sid, ctx.labels, args.teacher_endpoint,
                           args.teacher_model, os.environ.get("ONEREC_TEACHER_API_KEY"))
    t0 = time.perf_counter()
    samples = activation_samples(ctx.train, ctx.sid, teacher, emb, args.k_prune, args.per_user, seed=args.seed,
                                 item_ids=tm.has_items)
    teach_s = time.perf_counter() - t0
    with (out / "rationales_sample.jsonl").open("w") as f:
        for s in samples[:50]:
            f.write(json.dumps({"prompt": s.prompt[-200:], "target": s.target}) + "\n")
    rows = tokenize(samples, tok, args.max_len)
    if args.lora_r > 0:
        from peft import LoraConfig, PeftModel, get_peft_model

        adapter = out / "adapter"
        if args.resume and (adapter / "adapter_config.json").is_file():
            model = PeftModel.from_pretrained(model, adapter, is_trainable=True)
        else:
            model = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0,
                                                     target_modules=LORA_TARGETS, task_type="CAUSAL_LM"))

        def save(m: Any, o: Path) -> None:
            m.save_pretrained(o / "adapter")
    else:
        def save(m: Any, o: Path) -> None:
            save_think(m, tok, tm, o)
    loop = LoopConfig(args.steps, args.batch_size, args.lr, max_len=args.max_len, save_every=args.save_every,
                      seed=args.seed)
    stats = sft_loop(model, tok, rows, loop, out, "activate", save=save, resume=args.resume)
    if args.lora_r > 0:
        model = model.merge_and_unload()
        shutil.rmtree(out / "adapter", ignore_errors=True)
    finish(model, tok, tm, out, args.init, {"stage": "activate", "teacher": args.teacher, "k_prune": args.k_prune,
                                            "samples": len(samples), "teacher_s": round(teach_s, 1),
                                            "lora_r": args.lora_r, **stats}, ctx)
    return out


def run_enhance(args: argparse.Namespace, ctx: Context) -> Path:
    """Reasoning Enhancement: GRPO with the Rollout-Beam reward and a KL penalty to the activated model."""
    from model.think.decode import Decoder
    from model.think.reasoning import rl_cases
    from model.think.rl import GRPOConfig, grpo_step

    out = prepare_out(args.out, args.init, args.resume)
    policy, tok, tm = load_on(out, args)
    ref = copy.deepcopy(policy) if args.init is None else load_on(args.init, args)[0]
    ref.requires_grad_(False)
    trie = CodeTrie(ctx.sid.codes, ctx.sid.item_ids, ctx.sid.codebook_size)
    dec = Decoder(policy, tok, tm, trie)
    cfg = GRPOConfig(prompts=args.batch_size, group=args.group, beam=args.beam, max_think=args.max_think,
                     temperature=args.temperature, kl_beta=args.kl_beta, lr=args.lr, max_len=args.max_len)
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=0.0)
    start = 0
    if args.resume and (out / STATE).is_file():
        st = torch.load(out / STATE, weights_only=False)
        opt.load_state_dict(st["optimizer"])
        start = int(st["step"])
    cases = rl_cases(ctx.train, ctx.sid)
    rng = random.Random(args.seed)
    order = [rng.randrange(len(cases)) for _ in range(args.steps * cfg.prompts)]
    gen = torch.Generator(device=device_of(args)).manual_seed(args.seed + start)
    bar = tqdm(total=args.steps, initial=start, desc="enhance", unit="step")
    t0 = time.perf_counter()
    curve: list[dict] = []
    for step in range(start, args.steps):
        batch = [cases[j] for j in order[step * cfg.prompts : (step + 1) * cfg.prompts]]
        st = grpo_step(policy, ref, dec, opt, batch, ctx.sid, cfg, gen)
        curve.append(st)
        bar.update(1)
        bar.set_postfix(reward=f"{np.mean([c['reward'] for c in curve[-20:]]):.3f}", kl=f"{st['kl']:.4f}")
        _log(out, {"stage": "enhance", "step": step + 1, **{k: round(v, 4) for k, v in st.items()}})
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
            save_think(policy, tok, tm, out)
            torch.save({"desc": "enhance", "step": step + 1, "optimizer": opt.state_dict()}, out / STATE)
    bar.close()
    secs = time.perf_counter() - t0
    k = max(1, len(curve) // 10)
    stats = {"steps": len(curve), "seconds": round(secs, 1), "group": cfg.group, "prompts": cfg.prompts,
             "beam": cfg.beam, "kl_beta": cfg.kl_beta,
             "reward_first": round(float(np.mean([c["reward"] for c in curve[:k]])), 4) if curve else None,
             "reward_last": round(float(np.mean([c["reward"] for c in curve[-k:]])), 4) if curve else None}
    finish(policy, tok, tm, out, args.init, {"stage": "enhance", **stats}, ctx)
    return out


# --------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    from model.think.fit import FitConfig
    from services.config import get_settings

    s = get_settings()
    p = argparse.ArgumentParser(prog="python -m model.think.train", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="stage", required=True)

    def common(q: argparse.ArgumentParser, steps: int, bs: int, lr: float) -> None:
        q.add_argument("--out", type=Path, required=True, help="output HF folder")
        q.add_argument("--data-dir", type=Path, default=s.data_dir, help="dataset folder")
        q.add_argument("--sid-dir", type=Path, default=s.resolved("sid"), help="semantic-ID folder")
        q.add_argument("--steps", type=int, default=steps, help="optimizer steps")
        q.add_argument("--batch-size", type=int, default=bs, help="sequences (or RL prompts) per step")
        q.add_argument("--lr", type=float, default=lr, help="peak learning rate")
        q.add_argument("--max-len", type=int, default=320, help="max tokens per training text (prompt cut left)")
        q.add_argument("--save-every", type=int, default=200, help="checkpoint every N steps")
        q.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
        q.add_argument("--seed", type=int, default=0, help="random seed")
        q.add_argument("--limit-users", type=int, default=None, help="use only the first N users (smoke runs)")
        q.add_argument("--lm-corpus", type=Path, default=None, help="text file for general LM (default: titles)")
        q.add_argument("--current", action="store_true", help="point <out>/../current at the result")
        q.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
        q.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")

    b = sub.add_parser("base", help="build the base LLM with itemic tokens")
    common(b, 600, 64, 2e-3)
    b.add_argument("--base-model", type=Path, default=None, help="local HF causal LM to extend (default: tiny Qwen3)")
    d = TinyBaseConfig()
    b.add_argument("--bpe-vocab", type=int, default=d.bpe_vocab, help="BPE vocabulary (tiny base)")
    b.add_argument("--hidden", type=int, default=d.hidden, help="hidden size (tiny base)")
    b.add_argument("--layers", type=int, default=d.layers, help="decoder layers (tiny base)")
    b.add_argument("--heads", type=int, default=d.heads, help="attention heads (tiny base)")
    b.add_argument("--kv-heads", type=int, default=d.kv_heads, help="key/value heads (tiny base)")
    b.add_argument("--head-dim", type=int, default=d.head_dim, help="head dimension (tiny base)")
    b.add_argument("--intermediate", type=int, default=d.intermediate, help="MLP size (tiny base)")

    a = sub.add_parser("align", help="itemic alignment: token warm-up + multi-task integration")
    common(a, 1000, FitConfig.batch_size, FitConfig.lr)
    a.add_argument("--init", type=Path, required=True, help="folder from the base stage")
    a.add_argument("--tasks", default="persona,seq,caption,lm", help="comma list of persona,seq,caption,lm")
    a.add_argument("--warmup-steps", type=int, default=200, help="token warm-up steps (0 = skip)")
    a.add_argument("--warmup-lr", type=float, default=5e-3, help="learning rate of the warm-up")
    a.add_argument("--w-persona", type=float, default=0.15, help="mixture weight of persona grounding")
    a.add_argument("--w-seq", type=float, default=0.6, help="mixture weight of sequential preference")
    a.add_argument("--w-caption", type=float, default=0.15, help="mixture weight of itemic captioning")
    a.add_argument("--w-lm", type=float, default=0.1, help="mixture weight of general language modelling")
    f = FitConfig()
    a.add_argument("--epochs", type=int, default=f.epochs,
                   help="epochs over the sequence texts (the recipe; 0 = the fixed-step loop of --steps)")
    a.add_argument("--patience", type=int, default=f.patience, help="selection: epochs without val gain before stop")
    a.add_argument("--val-users", type=int, default=f.val_users, help="selection: validation users per epoch")
    a.add_argument("--refit-of", type=Path, default=None,
                   help="refit: selection folder whose best epoch to reuse; trains on train+valid, no validation")
    a.add_argument("--refit-epochs", type=int, default=0,
                   help="refit on train+valid for this many epochs without a selection run (0 = off)")
    a.add_argument("--ahead-weight", type=float, default=0.0,
                   help="item loss on the item after next too, at this weight (prefixes read after more interactions)")
    a.add_argument("--item-tokens", action="store_true",
                   help="give the model one token per item, read after each history item and tied to the item head")
    a.add_argument("--item-init", type=Path, default=None,
                   help="with --item-tokens: OneRec checkpoint folder whose item embeddings initialise the rows")
    a.add_argument("--item-loss-weight", type=float, default=f.item_loss_weight, help="item-head loss weight")
    a.add_argument("--item-score-weight", type=float, default=1.0, help="item-head weight when re-ranking leaves")
    a.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=f.bf16, help="bf16 autocast (CPU)")

    r = sub.add_parser("activate", help="reasoning activation: pruned-context rationales + LoRA SFT")
    common(r, 600, 32, 1e-3)
    r.add_argument("--init", type=Path, required=True, help="folder from the align stage")
    r.add_argument("--teacher", choices=["category", "openai", "vllm"], default="category", help="rationale teacher")
    r.add_argument("--teacher-endpoint", default=None, help="OpenAI-compatible base URL (teacher openai)")
    r.add_argument("--teacher-model", default=None, help="model name (openai) or local folder (vllm)")
    r.add_argument("--k-prune", type=int, default=3, help="history items kept in the pruned context")
    r.add_argument("--per-user", type=int, default=2, help="training targets per user")
    r.add_argument("--embeddings", choices=["minilm", "bow"], default="minilm", help="item similarity for pruning")
    r.add_argument("--cache-dir", type=Path, default=s.artifacts_dir / "think", help="item-embedding cache")
    r.add_argument("--lora-r", type=int, default=16, help="LoRA rank (0 = full fine-tuning)")

    e = sub.add_parser("enhance", help="reasoning enhancement: GRPO with the Rollout-Beam reward")
    common(e, 200, 8, 2e-5)
    e.add_argument("--init", type=Path, required=True, help="folder from the activate stage (also the KL reference)")
    e.add_argument("--group", type=int, default=4, help="rollouts per prompt (G)")
    e.add_argument("--beam", type=int, default=10, help="beam width of the reward (K)")
    e.add_argument("--max-think", type=int, default=32, help="max reasoning tokens")
    e.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    e.add_argument("--kl-beta", type=float, default=0.04, help="KL weight")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    if args.stage != "base" and not (args.init / "itemic.json").is_file():
        raise SystemExit(f"--init {args.init}: not a OneRec-Think folder (no itemic.json)")
    ctx = load_context(args.data_dir, args.sid_dir, args.limit_users)
    run = {"base": run_base, "align": run_align, "activate": run_activate, "enhance": run_enhance}[args.stage]
    out = run(args, ctx)
    (out / STATE).unlink(missing_ok=True)
    if args.current:
        point_current(out.parent, out)
    print(f"{args.stage} -> {out} ({time.perf_counter() - t0:.1f}s)")
    print(json.dumps(read_itemic(out).get("stages", [])[-1], indent=2))


if __name__ == "__main__":
    main()
