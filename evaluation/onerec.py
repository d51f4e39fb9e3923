"""``python -m evaluation onerec`` and ``onerec-variants``: quality of the lightweight OneRec.

``onerec`` evaluates one checkpoint in mode ``onerec`` (full beam over all code levels, `OneRecRecommender`)
on the shared harness (`model.metrics`); ``--results`` writes the one OneRec quality result,
``onerec_quality.json``. ``onerec-variants`` builds the semantic-ID variant table from finished
``python -m model.onerec train`` runs (``onerec_sid_variants.json``).

    python -m evaluation onerec --checkpoint artifacts/onerec/current --beam 20 --results

Not here: training (`model.onerec`), the metrics themselves.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from model.metrics import evaluate
from model.onerec import OneRecRecommender
from services.catalog import Example, dataset_name, load_dataset

RESULT = "onerec_quality"  # the one results name of OneRec quality


def run_eval(folder: Path, data_dir: Path, beam: int, split: str, results: bool, limit: int | None,
             item_score_weight: float | None = None) -> dict:
    """Mode ``onerec`` of one checkpoint; `results` writes onerec_quality.json (the test split's number)."""
    torch.set_num_threads(int(os.environ.get("ONEREC_EVAL_THREADS", "2")))
    ds = load_dataset(data_dir)
    examples: list[Example] = ds.splits.test if split == "test" else ds.splits.valid
    examples = examples[:limit] if limit else examples
    rec = OneRecRecommender.load(folder, beam=beam)
    if item_score_weight is not None:
        rec.onerec.cfg.item_score_weight = item_score_weight
    t0 = time.perf_counter()
    m = evaluate(rec, examples, k=10, desc=f"onerec {split}")
    dt = time.perf_counter() - t0
    isw = rec.onerec.cfg.item_score_weight
    print(f"{folder} {split} beam={beam} item_score_weight={isw} ({len(examples)} users, {dt:.0f}s): {m}")
    if results:
        from services.results import write_result

        meta = json.loads((folder / "meta.json").read_text()) if (folder / "meta.json").exists() else {}
        sid_meta = rec.onerec.sid.config.variant
        write_result(RESULT, m | {"train_s": meta.get("train_s"), "params": meta.get("params"), "beam": beam},
                     note=f"split={split}, checkpoint={folder.resolve().name}, sid={sid_meta}, item_score_weight={isw}",
                     dataset=dataset_name(data_dir))
    return m


def run_variants(runs: list[str], data_dir: Path, beam: int, results: bool) -> dict:
    """Semantic-ID variant table: per ``variant=folder`` run, its best validation R@10/N@10 (from
    curve.json) and the test metrics of that checkpoint; ``--results`` writes onerec_sid_variants.json."""
    table: dict[str, dict] = {}
    for spec in runs:
        variant, _, folder_s = spec.partition("=")
        folder = Path(folder_s)
        if not variant or not (folder / "curve.json").is_file():
            raise SystemExit(f"--run {spec!r}: expected VARIANT=FOLDER of a `train` run (with curve.json)")
        curve = [c for c in json.loads((folder / "curve.json").read_text()) if c.get("val_recall@10") is not None]
        if not curve:
            raise SystemExit(f"--run {spec!r}: no validated epoch (a refit run?); give selection runs")
        best = max(curve, key=lambda c: c["val_recall@10"])
        m = run_eval(folder, data_dir, beam, "test", False, None)
        table[variant] = {**{k: round(v, 6) for k, v in m.items()}, "val_recall@10": best["val_recall@10"],
                          "val_ndcg@10": best["val_ndcg@10"], "best_epoch": best["epoch"], "epochs": len(curve)}
    print(json.dumps(table, indent=2))
    if results:
        from services.results import write_result

        write_result("onerec_sid_variants", table, note="same model and recipe per variant (train part only, "
                     "validation users identical); test metrics of each run's best-validation checkpoint",
                     dataset=dataset_name(data_dir))
    return table


def variants_main(argv: list[str] | None = None) -> None:
    """``python -m evaluation onerec-variants``."""
    from services.config import get_settings

    st = get_settings()
    v = argparse.ArgumentParser(prog="python -m evaluation onerec-variants",
                                description="Semantic-ID variant table from finished OneRec train runs.")
    v.add_argument("--run", action="append", required=True, help="VARIANT=FOLDER of a train run, repeatable")
    v.add_argument("--data-dir", type=Path, default=st.data_dir, help="dataset folder")
    v.add_argument("--beam", type=int, default=20, help="beam width (>= 10)")
    v.add_argument("--results", action="store_true", help="write docs/results/onerec_sid_variants.json")
    args = v.parse_args(argv)
    run_variants(args.run, args.data_dir, args.beam, args.results)


def main(argv: list[str] | None = None) -> None:
    """``python -m evaluation onerec``."""
    from services.config import get_settings

    st = get_settings()
    e = argparse.ArgumentParser(prog="python -m evaluation onerec",
                                description="Evaluate a lightweight OneRec checkpoint (mode onerec).")
    e.add_argument("--checkpoint", type=Path, default=st.resolved("onerec"), help="checkpoint folder")
    e.add_argument("--data-dir", type=Path, default=st.data_dir, help="dataset folder")
    e.add_argument("--beam", type=int, default=20, help="beam width (>= 10)")
    e.add_argument("--split", choices=["valid", "test"], default="test", help="which held-out item")
    e.add_argument("--limit", type=int, default=None, help="only the first N users")
    e.add_argument("--results", action="store_true", help=f"write docs/results/{RESULT}.json")
    e.add_argument("--item-score-weight", type=float, default=None,
                   help="override the checkpoint's decode-time item-head weight (tuning on --split valid)")
    args = e.parse_args(argv)
    run_eval(args.checkpoint, args.data_dir, args.beam, args.split, args.results, args.limit, args.item_score_weight)
