"""``python -m evaluation mostpop``: the MostPopular baseline under the leave-one-out protocol.

Ranks the globally most interacted items seen before the evaluated split (`model.metrics.MostPopular`);
``--results`` writes ``mostpop.json``. Not here: the baseline itself and the metrics (`model.metrics`).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from model.metrics import MostPopular, evaluate, split_examples
from services.catalog import dataset_name, load_dataset
from services.config import get_settings
from services.results import write_result


def main(argv: list[str] | None = None) -> None:
    settings = get_settings()
    p = argparse.ArgumentParser(prog="python -m evaluation mostpop", description="MostPopular baseline, leave-one-out.")
    p.add_argument("--data-dir", type=Path, default=settings.data_dir, help="dataset folder")
    p.add_argument("--split", choices=["valid", "test"], default="test", help="which held-out item")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N users")
    p.add_argument("--results", action="store_true", help="write the dataset's results file mostpop.json")
    args = p.parse_args(argv)
    ds = load_dataset(args.data_dir)
    examples = split_examples(ds, args.split, args.limit)
    t0 = time.perf_counter()
    rec = MostPopular(ds.sequences, holdout=1 if args.split == "test" else 2)
    metrics = evaluate(rec, examples, desc="mostpop")
    print(f"mostpop on {args.split} ({len(examples)} users, {time.perf_counter() - t0:.1f}s): {metrics}")
    if args.results and args.limit is None:
        write_result("mostpop", metrics, note=f"split={args.split}", dataset=dataset_name(args.data_dir))
