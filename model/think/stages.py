"""The OneRec-Think stages: each reads a OneRec-Think folder (none for ``base``) and writes one (loadable by vLLM).

- `run_base`: tokenizer + tiny Qwen3 (`model.think.base_model`) or a local HF LM, then optional LM steps;
- `run_align`: Itemic Alignment, token warm-up then multi-task integration: the epoch recipe
  (`model.think.fit`, selection or refit) or the fixed-step loop (`model.think.sft`);
- `run_activate`: Reasoning Activation, pruned-context rationales (`model.think.activate_data`) + LoRA SFT;
- `run_enhance`: Reasoning Enhancement, GRPO with the Rollout-Beam reward (`model.think.enhance`).
Every stage shows a progress bar, logs to ``<out>/train_log.jsonl``, checkpoints to ``<out>`` every
``--save-every`` steps (model + ``trainer_state.pt``) and continues from there with ``--resume``.
Each folder holds ``itemic.json`` (code layout, stage history) and ``sid/`` (its semantic IDs).
The runners take the parsed options of ``python -m model.think`` (`model.think.__main__`, the parser).
Not here: the parser, the data builders, decoding (`model.think.decode`), evaluation (`evaluation.think`).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from model.semantic_ids import SemanticIDs
from model.think import align_data as T
from model.think.base_model import TinyBaseConfig, build_tiny_base, extend_base_model
from model.think.checkpoint import load_think, read_itemic, save_think
from model.think.sft import LOG, STATE, LoopConfig, sft_loop, tokenize
from model.training import log_step
from model.trie import CodeTrie, TokenMap
from services.catalog import Dataset, leave_one_out, load_dataset

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


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
                    ahead_weight=args.ahead_weight, item_step_scale=args.item_step_scale,
                    next_weight=args.next_weight, dropout=args.dropout, seed=args.seed)
    if not 0.0 <= cfg.dropout < 1.0:
        raise SystemExit(f"--dropout must be in [0, 1), got {cfg.dropout}")
    if not 0.0 <= cfg.item_step_scale <= 1.0:
        raise SystemExit(f"--item-step-scale must be in [0, 1], got {cfg.item_step_scale}")
    if cfg.next_weight < 0 or cfg.next_weight + cfg.ahead_weight <= 0:
        raise SystemExit(f"--next-weight {cfg.next_weight} with --ahead-weight {cfg.ahead_weight}: nothing to train")
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
    from model.think.activate_data import ItemEmbeddings, activation_samples, make_teacher, rehearsal_samples
    from model.think.fit import item_aware_loss, residual_dropout

    if not 0.0 <= args.direct_share < 1.0:
        raise SystemExit(f"--direct-share must be in [0, 1), got {args.direct_share}")
    if not 0.0 <= args.dropout < 1.0:
        raise SystemExit(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.item_loss_weight < 0:
        raise SystemExit(f"--item-loss-weight must be >= 0, got {args.item_loss_weight}")
    out = prepare_out(args.out, args.init, args.resume)
    model, tok, tm = load_on(out, args)
    if args.item_loss_weight > 0 and not tm.has_items:
        raise SystemExit(f"--item-loss-weight {args.item_loss_weight}: {args.init} has no item tokens "
                         "(align with --item-tokens, or pass --item-loss-weight 0)")
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
    rehearsal = rehearsal_samples(ctx.train, ctx.sid, len(samples), args.direct_share, args.seed, tm.has_items)
    rows += tokenize(rehearsal, tok, args.max_len) if rehearsal else []
    loss_fn = item_aware_loss(tm, ctx.sid, args.item_loss_weight, args.ahead_weight) if args.item_loss_weight else None
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
    hooks = residual_dropout(model, args.dropout)  # training-only; removed before the merge and the save
    stats = sft_loop(model, tok, rows, loop, out, "activate", save=save, resume=args.resume, loss_fn=loss_fn)
    for h in hooks:
        h.remove()
    if args.lora_r > 0:
        model = model.merge_and_unload()
        shutil.rmtree(out / "adapter", ignore_errors=True)
    finish(model, tok, tm, out, args.init, {"stage": "activate", "teacher": args.teacher, "k_prune": args.k_prune,
                                            "samples": len(samples), "teacher_s": round(teach_s, 1),
                                            "rehearsal": len(rehearsal), "direct_share": args.direct_share,
                                            "item_loss_weight": args.item_loss_weight,
                                            "ahead_weight": args.ahead_weight, "dropout": args.dropout,
                                            "lora_r": args.lora_r, **stats}, ctx)
    return out


def run_enhance(args: argparse.Namespace, ctx: Context) -> Path:
    """Reasoning Enhancement: GRPO with the Rollout-Beam reward and a KL penalty to the activated model."""
    from model.think.activate_data import rl_cases
    from model.think.decode import Decoder
    from model.think.enhance import GRPOConfig, grpo_step

    out = prepare_out(args.out, args.init, args.resume)
    policy, tok, tm = load_on(out, args)
    ref = copy.deepcopy(policy) if args.init is None else load_on(args.init, args)[0]
    ref.requires_grad_(False)
    trie = CodeTrie(ctx.sid.codes, ctx.sid.item_ids, ctx.sid.codebook_size)
    head = None
    if args.reward == "head":
        from model.think.itemhead import load_head

        head = load_head(out, ctx.sid, policy, tm)
        if head is None:
            raise SystemExit(f"--reward head: {args.init} has no item head (align with --item-tokens or an item head)")
    dec = Decoder(policy, tok, tm, trie, item_head=head)
    cfg = GRPOConfig(prompts=args.batch_size, group=args.group, beam=args.beam, max_think=args.max_think,
                     temperature=args.temperature, kl_beta=args.kl_beta, lr=args.lr, max_len=args.max_len,
                     reward=args.reward)
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
        log_step(out / LOG, {"stage": "enhance", "step": step + 1, **{k: round(v, 4) for k, v in st.items()}})
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
            save_think(policy, tok, tm, out)
            torch.save({"desc": "enhance", "step": step + 1, "optimizer": opt.state_dict()}, out / STATE)
    bar.close()
    secs = time.perf_counter() - t0
    k = max(1, len(curve) // 10)
    stats = {"steps": len(curve), "seconds": round(secs, 1), "group": cfg.group, "prompts": cfg.prompts,
             "beam": cfg.beam, "kl_beta": cfg.kl_beta, "reward": cfg.reward,
             "reward_first": round(float(np.mean([c["reward"] for c in curve[:k]])), 4) if curve else None,
             "reward_last": round(float(np.mean([c["reward"] for c in curve[-k:]])), 4) if curve else None}
    finish(policy, tok, tm, out, args.init, {"stage": "enhance", **stats}, ctx)
    return out
