"""``python -m evaluation MODE``: leave-one-out evaluation of one mode (``mostpop``, ``onerec``, ``think``,
``think-ahead``), or ``repeats`` (the consumed-item rule on vs off, as served). ``think``, ``think-ahead`` and
``repeats`` hand their remaining arguments to ``python -m model.think.evaluate run``, `evaluation.think_ahead`
and `evaluation.repeats` (``python -m evaluation think-ahead --help``)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from model.evaluate import MostPopular, Recommender, evaluate, split_examples
from services.catalog import dataset_name, load_dataset
from services.config import get_settings
from services.results import write_result


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["think"]:  # the LLM modes have their own options; one entry point for every mode
        from model.think.evaluate import main as think_main

        return think_main(["run", *argv[1:]])
    if argv[:1] == ["think-ahead"]:
        from evaluation.think_ahead import main as think_ahead_main

        return think_ahead_main(argv[1:])
    if argv[:1] == ["repeats"]:
        from evaluation.repeats import main as repeats_main

        return repeats_main(argv[1:])
    settings = get_settings()
    p = argparse.ArgumentParser(prog="python -m evaluation", description="Leave-one-out evaluation.")
    p.add_argument("mode", choices=["mostpop", "onerec", "think", "think-ahead", "repeats"],
                   help="what to evaluate (think / think-ahead: see `python -m evaluation think-ahead --help`)")
    p.add_argument("--data-dir", type=Path, default=settings.data_dir, help="dataset folder")
    p.add_argument("--split", choices=["valid", "test"], default="test", help="which held-out item")
    p.add_argument("--checkpoint", type=Path, default=None, help="model folder (model modes)")
    p.add_argument("--beam", type=int, default=settings.beam, help="beam width (model modes, >= 10)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N users")
    p.add_argument("--results", action="store_true", help="write the dataset's results file <mode>.json")
    args = p.parse_args(argv)
    ds = load_dataset(args.data_dir)
    examples = split_examples(ds, args.split, args.limit)
    t0 = time.perf_counter()
    rec: Recommender
    if args.mode == "mostpop":
        rec = MostPopular(ds.sequences, holdout=1 if args.split == "test" else 2)
    else:
        from model.onerec import OneRecRecommender

        rec = OneRecRecommender.load(args.checkpoint or settings.resolved("onerec"), beam=args.beam)
    metrics = evaluate(rec, examples, desc=args.mode)
    print(f"{args.mode} on {args.split} ({len(examples)} users, {time.perf_counter() - t0:.1f}s): {metrics}")
    if args.results and args.limit is None:
        write_result("mostpop" if args.mode == "mostpop" else f"{args.mode}_eval", metrics, note=f"split={args.split}",
                     dataset=dataset_name(args.data_dir))


if __name__ == "__main__":
    main()
