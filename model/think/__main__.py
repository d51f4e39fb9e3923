"""``python -m model.think base|align|activate|enhance``: train the OneRec-Think stages (the parser only).

    python -m model.think base      --out artifacts/think/base      # tokenizer + tiny Qwen3 (+ LM steps)
    python -m model.think align     --init .../base --out .../ia    # warm-up + multi-task
    python -m model.think align     --init .../base --out .../seq --tasks seq --warmup-steps 0   # "Base"
    python -m model.think activate  --init .../ia   --out .../act   # pruned-context rationales + LoRA SFT
    python -m model.think enhance   --init .../act  --out .../rl    # GRPO, Rollout-Beam reward

`--base-model PATH` (stage base) extends any local HF causal LM instead of building the tiny one.
The stages themselves are `model.think.stages`; evaluation is ``python -m evaluation think``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from model.semantic_ids import point_current
from model.think.base_model import TinyBaseConfig
from model.think.checkpoint import read_itemic
from model.think.sft import STATE
from model.think.stages import load_context, run_activate, run_align, run_base, run_enhance
from model.training import seed_all


def build_parser() -> argparse.ArgumentParser:
    from model.think.fit import FitConfig
    from services.config import get_settings

    s = get_settings()
    p = argparse.ArgumentParser(prog="python -m model.think", description=__doc__.split("\n")[0])
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
    a.add_argument("--next-weight", type=float, default=f.next_weight,
                   help="weight of the next item in the item loss (0 with --ahead-weight: the after-next item only)")
    a.add_argument("--item-step-scale", type=float, default=f.item_step_scale,
                   help="with --item-tokens: the item rows move by this share of each optimizer step (0 = fixed)")
    a.add_argument("--dropout", type=float, default=f.dropout,
                   help="training dropout on the input embeddings and each layer's residual branches (0 = none)")
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
    r.add_argument("--item-loss-weight", type=float, default=0.0,
                   help="item-head loss at each labelled item block, after the rationale and in the rehearsed "
                        "sequences (needs item tokens; 0 = LM loss only)")
    r.add_argument("--ahead-weight", type=float, default=0.0,
                   help="with --item-loss-weight: item loss on the item after next in the rehearsed sequences")
    r.add_argument("--direct-share", type=float, default=0.0,
                   help="share of the activation mix that is sequence texts in the direct layout (rehearsal), [0, 1)")
    r.add_argument("--dropout", type=float, default=0.0,
                   help="training dropout on the input embeddings and each layer's residual branches (0 = none)")

    e = sub.add_parser("enhance", help="reasoning enhancement: GRPO with the Rollout-Beam reward")
    common(e, 200, 8, 2e-5)
    e.add_argument("--init", type=Path, required=True, help="folder from the activate stage (also the KL reference)")
    e.add_argument("--group", type=int, default=4, help="rollouts per prompt (G)")
    e.add_argument("--beam", type=int, default=10, help="beam width of the reward (K)")
    e.add_argument("--max-think", type=int, default=32, help="max reasoning tokens")
    e.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    e.add_argument("--kl-beta", type=float, default=0.04, help="KL weight")
    e.add_argument("--reward", choices=["beam", "head"], default="beam",
                   help="what the Rollout-Beam reward scores: the code beam (beam) or the item head's top --beam "
                        "items after the rationale, the list think mode serves (head; needs an item head)")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    seed_all(args.seed)
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
