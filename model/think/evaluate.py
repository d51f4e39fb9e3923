"""Evaluation mode ``think`` (and ``direct``) for OneRec-Think folders, on the shared harness.

`ThinkRecommender` implements the `model.evaluate.Recommender` protocol: per batch of users (sorted by
history length so padding stays small) it prefills the prompt, writes the reasoning greedily (think
mode), forces ``</think><|item_begin|>`` and runs a trie-constrained beam (width >= k) over all codes with
a KV cache. ``direct`` mode skips the reasoning (the Base and +IA rows of the ablation).

    python -m model.think.evaluate run --checkpoint artifacts/think/current --mode think --out-json /tmp/x.json
    python -m model.think.evaluate ablation --base-json b.json --ia-json i.json --ia-r-json r.json

`--sample N` evaluates a fixed random subset of N users (seeded), which the output records.
Not here: training, the metrics themselves (`model.evaluate`), the offline worker's vLLM engine.
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

from model.semantic_ids import SemanticIDs
from model.think.decode import Decoder
from model.think.tasks import direct_prefix, generation_prefix
from model.think.tokens import load_think, read_itemic
from model.trie import CodeTrie, TokenMap
from services.catalog import Example


class ThinkRecommender:
    """OneRec-Think as a `Recommender`: reasoning (optional) then constrained beam over all codes."""

    def __init__(self, model: Any, tokenizer: Any, tokmap: TokenMap, sid: SemanticIDs, beam: int = 10,
                 think: bool = True, max_think: int = 32, batch_size: int = 64, max_len: int = 320,
                 item_head: Any = None, bf16: bool = False, code_weight: float | None = None):
        if beam < 1:
            raise ValueError(f"beam must be >= 1, got {beam}")
        self.sid = sid
        self.trie = CodeTrie(sid.codes, sid.item_ids, sid.codebook_size)
        self.decoder = Decoder(model, tokenizer, tokmap, self.trie, item_head=item_head)
        self.beam, self.think, self.max_think = beam, think, max_think
        self.batch_size, self.max_len = batch_size, max_len
        self.bf16 = bf16  # bf16 autocast on CPU while decoding (scores in float32)
        # with an item head: None = re-rank the code beam's leaves; a number = rank the head's top-`beam`
        # items over the whole catalogue by item log-prob + code_weight * code log-prob
        self.code_weight = code_weight
        self.reasoning: dict[int, str] = {}  # user -> last reasoning text written for them

    @classmethod
    def load(cls, folder: Path | str, beam: int = 10, think: bool | None = None, sid_dir: Path | None = None,
             device: str | None = None, item_weight: float | None = None, **kw: Any) -> ThinkRecommender:
        """From an HF folder written by `model.think.train`; `think=None` follows the folder's last stage.

        The folder's item head (``item_head/weight.safetensors``), if any, re-ranks the beam's leaves with its
        saved weight; `item_weight` overrides it (0 = codes only).
        """
        from model.think.itemhead import load_head

        folder = Path(folder)
        model, tok, tm = load_think(folder)
        if device:
            model = model.to(device)
        meta = read_itemic(folder)
        if sid_dir is None:
            if (folder / "sid" / "codes.tsv").is_file():
                sid_dir = folder / "sid"
            else:
                from services.config import get_settings

                sid_dir = get_settings().resolved("sid")
        sid = SemanticIDs.load(sid_dir)
        head = load_head(folder, sid, model, tm)
        if head is not None and item_weight is not None:
            head.cfg.score_weight = item_weight
        if head is not None and head.cfg.score_weight == 0:
            head = None
        return cls(model, tok, tm, sid, beam, bool(meta.get("think", False)) if think is None else think,
                   item_head=head, **kw)

    def prefix(self, history: Sequence[int]) -> str:
        codes = [self.sid.codes_of(i) for i in history if self.sid.has_item(i)]
        items = self.decoder.tm.has_items
        return generation_prefix(codes, item_ids=items) if self.think else direct_prefix(codes, item_ids=items)

    def recommend(self, examples: Sequence[Example], k: int) -> list[list[int]]:
        if k > self.beam:
            raise ValueError(f"k={k} is larger than the beam width {self.beam}")
        order = sorted(range(len(examples)), key=lambda i: len(examples[i].history))
        out: list[list[int]] = [[] for _ in examples]
        for s in range(0, len(order), self.batch_size):
            chunk = order[s : s + self.batch_size]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
                beams, texts = self.decoder.recommend([self.prefix(examples[i].history) for i in chunk], self.beam,
                                                      self.think, self.max_think, self.max_len,
                                                      code_weight=self.code_weight)
            for j, i in enumerate(chunk):
                out[i] = beams.items[j][:k]
                if self.think:
                    self.reasoning[examples[i].user_id] = texts[j]
        return out


def subset(examples: list[Example], sample: int | None, seed: int) -> list[Example]:
    """A fixed random subset of `sample` users (all when None or larger than the split)."""
    if not sample or sample >= len(examples):
        return examples
    idx = sorted(random.Random(seed).sample(range(len(examples)), sample))
    return [examples[i] for i in idx]


def run(args: argparse.Namespace) -> dict:
    from model.evaluate import evaluate, split_examples
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
        "command": "python -m model.think.evaluate " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
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


def ablation(args: argparse.Namespace) -> Path:
    """Combine three `run` outputs into docs/results/think_ablation.json."""
    from services.results import write_result

    arms = {name: json.loads(Path(p).read_text()) for name, p in
            (("base", args.base_json), ("ia", args.ia_json), ("ia_r", args.ia_r_json))}
    users = {a["users"] for a in arms.values()}
    if len(users) != 1:
        raise SystemExit(f"the three runs evaluated different user counts: {users}")
    keys = ("recall@5", "recall@10", "ndcg@5", "ndcg@10")
    metrics: dict[str, Any] = {name: {k: a["metrics"][k] for k in keys} for name, a in arms.items()}
    metrics["base_model"] = arms["ia_r"]["base_model"]
    metrics["params"] = arms["ia_r"]["params"]
    metrics["users"] = users.pop()
    metrics["beam"] = arms["ia_r"]["beam"]
    metrics["eval_s"] = {name: a["seconds"] for name, a in arms.items()}
    sample = arms["ia_r"]["sample"]
    note = (f"Beauty {arms['ia_r']['split']}, full catalogue, beam {metrics['beam']}; "
            + (f"fixed random subset of {metrics['users']} users (seed {arms['ia_r']['seed']})" if sample
               else "all users") + "; base/ia in direct mode, ia_r in think mode")
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


def main(argv: list[str] | None = None) -> None:
    from services.config import get_settings

    s = get_settings()
    p = argparse.ArgumentParser(prog="python -m model.think.evaluate", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="evaluate one checkpoint")
    r.add_argument("--checkpoint", type=Path, default=s.resolved("think"), help="OneRec-Think HF folder")
    r.add_argument("--mode", choices=["think", "direct", "auto"], default="auto",
                   help="think: reasoning then codes; direct: codes only; auto: from the folder's last stage")
    r.add_argument("--data-dir", type=Path, default=s.data_dir, help="dataset folder")
    r.add_argument("--split", choices=["valid", "test"], default="test", help="held-out item")
    r.add_argument("--beam", type=int, default=10, help="beam width (>= 10 for reported numbers)")
    r.add_argument("--max-think", type=int, default=32, help="max reasoning tokens")
    r.add_argument("--item-weight", type=float, default=None,
                   help="item-head weight when re-ranking leaves (default: the folder's; 0 = codes only)")
    r.add_argument("--batch-size", type=int, default=64, help="users per decoding batch")
    r.add_argument("--bf16", action="store_true", help="bf16 autocast while decoding (CPU)")
    r.add_argument("--code-weight", type=float, default=None,
                   help="item head: rank its top --beam items by item log-prob + this x code log-prob "
                        "(default: re-rank the code beam's leaves instead)")
    r.add_argument("--limit", type=int, default=None, help="first N users only")
    r.add_argument("--sample", type=int, default=None, help="fixed random subset of N users")
    r.add_argument("--seed", type=int, default=0, help="seed of --sample and of the shown examples")
    r.add_argument("--show", type=int, default=5, help="users whose reasoning is stored in --out-json")
    r.add_argument("--out-json", type=Path, default=None, help="write metrics (+ examples) here")
    r.add_argument("--threads", type=int, default=None, help="torch threads")
    r.add_argument("--device", default=None, help="torch device for the model (default: cpu)")
    a = sub.add_parser("ablation", help="write docs/results/think_ablation.json from three run outputs")
    a.add_argument("--base-json", type=Path, required=True, help="run output of the Base arm")
    a.add_argument("--ia-json", type=Path, required=True, help="run output of the +IA arm")
    a.add_argument("--ia-r-json", type=Path, required=True, help="run output of the +IA+R arm")
    c = sub.add_parser("recipe", help="write docs/results/think_recipe.json from selection/refit run outputs")
    c.add_argument("--selection-json", type=Path, required=True, help="run output of the selection (train-only) model")
    c.add_argument("--refit-json", type=Path, default=None, help="run output of the refit model")
    c.add_argument("--prefix-json", type=Path, default=None, help="output of python -m model.think.prefix_recall")
    v = sub.add_parser("vllm-check", help="load a checkpoint in vLLM and generate reasoning + item codes")
    v.add_argument("--checkpoint", type=Path, default=s.resolved("think"), help="OneRec-Think HF folder")
    v.add_argument("--data-dir", type=Path, default=s.data_dir, help="dataset folder")
    v.add_argument("--users", type=int, default=3, help="test users to run (first N)")
    v.add_argument("--out-json", type=Path, default=None, help="write the records here")
    args = p.parse_args(argv)
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
    if args.cmd == "run":
        if args.threads:
            torch.set_num_threads(args.threads)
        run(args)
    elif args.cmd == "recipe":
        print(recipe_result(args))
    else:
        print(ablation(args))


if __name__ == "__main__":
    main()
