"""Training of the lightweight OneRec (``python -m model.onerec train``; the parser is in `model.onerec.__main__`).

Trains on the training parts of the leave-one-out splits, learning from every position of each
sequence in one pass (code cross-entropy + the tied next-item head; warm-up + cosine LR by default);
validates Recall@10 on a fixed validation subset each epoch, stops early, checkpoints the best model
(safetensors + config + code table) into a versioned folder, and resumes from ``state.pt`` after an
interruption. Two kinds of run, named by what they are:
- *selection* (``select-<variant>-<time>``): training parts only, validation each epoch; its
  ``meta.json`` records the best epoch (``best_epoch``);
- *refit* (``--refit``, ``refit-<variant>-<time>``): the final test model, trained on train + validation
  interactions for the selection run's best epoch (``--selection FOLDER``, default ``<out>/current``),
  with no validation (the validation targets are training data).
Does not serve requests, and does not measure test quality (``python -m evaluation onerec``).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from model.metrics import evaluate
from model.onerec.config import DEFAULT_EPOCHS, OneRecConfig
from model.onerec.decoding import OneRec, OneRecRecommender
from model.onerec.modeling import OneRecModel, build_model, count_params, save_checkpoint
from model.semantic_ids import SemanticIDs, point_current
from model.training import lr_lambda, seed_all
from services.catalog import load_dataset


def make_windows(train: dict[int, list[int]], row_of: dict[int, int], max_len: int) -> list[list[int]]:
    """Per user, the training sequence as item rows + 1 (inputs and targets come from shifting it)."""
    out = []
    for seq in train.values():
        rows = [row_of[i] + 1 for i in seq if i in row_of]
        if len(rows) >= 2:
            out.append(rows)
    return out


def batch_tensors(seqs: list[list[int]], max_len: int, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded inputs/targets (B, T), T = the longest window in the batch (<= max_len).

    Long sequences contribute a random window of max_len + 1 items.
    """
    wins = []
    for s in seqs:
        if len(s) > max_len + 1:
            end = rng.randint(max_len + 1, len(s))
            s = s[end - max_len - 1 : end]
        wins.append(s)
    T = max(len(s) for s in wins) - 1
    x = torch.zeros(len(seqs), T, dtype=torch.long)
    y = torch.zeros(len(seqs), T, dtype=torch.long)
    for b, s in enumerate(wins):
        n = len(s) - 1
        x[b, T - n :] = torch.tensor(s[:-1])
        y[b, T - n :] = torch.tensor(s[1:])
    return x, y


def length_batches(seqs: list[list[int]], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Indices grouped into batches of similar length (little padding), in random batch order."""
    order = sorted(range(len(seqs)), key=lambda i: (len(seqs[i]), rng.random()))
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    rng.shuffle(batches)
    return batches


def train_epoch(model: OneRecModel, opt: torch.optim.Optimizer, seqs: list[list[int]], batch_size: int,
                rng: random.Random, desc: str = "epoch", progress: bool = True,
                sched: torch.optim.lr_scheduler.LRScheduler | None = None) -> list[float]:
    """One pass over all sequences (every position is a target); returns the batch losses."""
    model.train()
    bar = tqdm(length_batches(seqs, batch_size, rng), desc=desc, unit="batch", leave=False, disable=not progress)
    losses: list[float] = []
    for idx in bar:
        x, y = batch_tensors([seqs[i] for i in idx], model.cfg.max_len, rng)
        loss = model.loss(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if sched is not None:
            sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}")
    return losses




def refit_epochs(args: argparse.Namespace) -> int:
    """Epochs of a refit: ``--epochs`` when given, else the best epoch recorded by the selection run."""
    if args.epochs is not None:
        return int(args.epochs)
    meta_path = Path(args.selection) / "meta.json"
    if not meta_path.is_file():
        raise SystemExit(f"--refit: --selection {args.selection} has no meta.json (a finished selection run); "
                         "or pass --epochs")
    meta = json.loads(meta_path.read_text())
    if meta.get("refit") or not meta.get("best_epoch"):
        raise SystemExit(f"--refit: --selection {args.selection} is not a selection run with a best epoch "
                         f"(meta: refit={meta.get('refit')}, best_epoch={meta.get('best_epoch')}); or pass --epochs")
    print(f"refit: {meta['best_epoch']} epochs, the best epoch of selection run {Path(args.selection).resolve().name}")
    return int(meta["best_epoch"])


def train(args: argparse.Namespace) -> Path:
    seed_all(args.seed)
    torch.set_num_threads(args.threads)
    sid = SemanticIDs.load(args.sid)
    ds = load_dataset(args.data_dir)
    if args.no_item_emb and (args.item_loss_weight or args.item_score_weight):
        print("--no-item-emb: the item head is tied to the item embeddings, so it is off too")
        args.item_loss_weight = args.item_score_weight = 0.0
    cfg = OneRecConfig(d_model=args.d_model, n_layers=args.layers, n_heads=args.heads, d_ff=2 * args.d_model,
                       dropout=args.dropout, use_item_emb=not args.no_item_emb, max_len=args.max_len,
                       item_loss_weight=args.item_loss_weight, item_score_weight=args.item_score_weight)
    if args.refit:
        args.epochs = refit_epochs(args)
    elif args.epochs is None:
        args.epochs = DEFAULT_EPOCHS
    model = build_model(cfg, sid, args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    folder = args.out / args.name
    folder.mkdir(parents=True, exist_ok=True)
    state_path = folder / "state.pt"
    row_of = {int(i): r for r, i in enumerate(sid.item_ids)}
    # --refit: final model for the test split, trained on everything before the test item (train +
    # validation interactions) for a number of epochs chosen on validation; no early stopping
    source = {u: s[:-1] for u, s in ds.sequences.items()} if args.refit else ds.splits.train
    seqs = make_windows(source, row_of, cfg.max_len)
    per_epoch = math.ceil(len(seqs) / args.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lr_lambda(args.schedule, int(args.warmup_epochs * per_epoch), args.epochs * per_epoch, args.min_lr_ratio))
    val = random.Random(args.seed).sample(ds.splits.valid, min(args.val_users, len(ds.splits.valid)))
    epoch, best, best_epoch, bad, curve, spent = 0, -1.0, 0, 0, [], 0.0
    if args.resume and state_path.exists():
        st = torch.load(state_path, weights_only=False)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        if "sched" in st:
            sched.load_state_dict(st["sched"])
        epoch, best, bad, curve, spent = st["epoch"], st["best"], st["bad"], st["curve"], st["spent"]
        best_epoch = int(st.get("best_epoch", 0))
        print(f"resumed {folder} at epoch {epoch} (best val R@10 {best:.4f}, {spent / 60:.1f} min spent)")
    (folder / "train_args.json").write_text(json.dumps({k: str(v) for k, v in vars(args).items()}, indent=2))
    print(f"OneRec {count_params(model) / 1e6:.2f}M params, {len(seqs)} training sequences, sid {args.sid}")
    rng = random.Random(args.seed + epoch)
    t_start = time.perf_counter() - spent
    while epoch < args.epochs and bad < args.patience:
        losses = train_epoch(model, opt, seqs, args.batch_size, rng, desc=f"epoch {epoch + 1}", sched=sched)
        epoch += 1
        model.eval()
        point: dict = {"epoch": epoch, "loss": float(np.mean(losses))}
        if args.refit:  # validation targets are training data here: nothing to validate on; keep the last epoch
            improved, shown = True, "refit, no validation"
        else:
            rec = OneRecRecommender(OneRec(model, sid), beam=args.val_beam)
            m = evaluate(rec, val, k=10, progress=False)
            point |= {"val_recall@10": m["recall@10"], "val_ndcg@10": m["ndcg@10"]}
            improved, shown = m["recall@10"] > best, f"val R@10 {m['recall@10']:.4f} N@10 {m['ndcg@10']:.4f}"
        spent = time.perf_counter() - t_start
        curve.append(point | {"minutes": round(spent / 60, 2)})
        if improved:
            best, best_epoch, bad = (best if args.refit else point["val_recall@10"]), epoch, 0
            save_checkpoint(model, sid, folder)
        else:
            bad += 1
        print(f"epoch {epoch}/{args.epochs}: loss {np.mean(losses):.4f} {shown} {'*' if improved else ''} "
              f"({spent / 60:.1f} min)", flush=True)
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(), "epoch": epoch,
                    "best": best, "best_epoch": best_epoch, "bad": bad,
                    "curve": curve, "spent": spent}, state_path)
        (folder / "curve.json").write_text(json.dumps(curve, indent=2))
        if spent > args.max_minutes * 60:
            print(f"time budget of {args.max_minutes} min reached")
            break
    meta = {"train_s": round(spent, 1), "epochs": epoch, "refit": bool(args.refit), "best_epoch": best_epoch,
            "best_val_recall@10": None if args.refit else best,
            "selection": str(Path(args.selection).resolve().name) if args.refit else None,
            "params": count_params(model),
            "config": asdict(cfg), "sid": str(Path(args.sid).resolve())}
    (folder / "meta.json").write_text(json.dumps(meta, indent=2))
    if not args.no_current:
        point_current(args.out, folder)
    print(f"best checkpoint: {folder}")
    return folder
