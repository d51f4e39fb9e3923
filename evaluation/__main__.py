"""``python -m evaluation COMMAND [options]``: every command that measures quality, one entry point.

Each command lives in its own module of this package and has its own options
(``python -m evaluation COMMAND --help``); this file only dispatches. Not here: the metrics and the
recommenders (the model layer: `model.metrics`, `model.onerec`, `model.think.recommender`).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command -> ("module:function" taking argv, what it measures)
COMMANDS: dict[str, tuple[str, str]] = {
    "mostpop": ("evaluation.mostpop:main", "MostPopular baseline (mostpop.json)"),
    "onerec": ("evaluation.onerec:main", "lightweight OneRec, mode onerec (onerec_quality.json)"),
    "onerec-variants": ("evaluation.onerec:variants_main",
                        "semantic-ID variant table of OneRec train runs (onerec_sid_variants.json)"),
    "think": ("evaluation.think:main", "OneRec-Think: run | ablation | recipe | vllm-check"),
    "think-ahead": ("evaluation.think_ahead:main", "served think-ahead policy on stale offline entries"),
    "prefix-recall": ("evaluation.prefix_recall:main", "share of users whose target (a, b) prefix is cached"),
    "repeats": ("evaluation.repeats:main", "the consumed-item rule on vs off, as served"),
    "tune": ("evaluation.tune:main", "the policy's completion settings chosen on validation"),
    "reasoning": ("evaluation.reasoning:main", "stored rationales grounded in the user's history (reasoning.json)"),
}


def parser() -> argparse.ArgumentParser:
    listing = "\n".join(f"  {name:<16} {what}" for name, (_, what) in COMMANDS.items())
    p = argparse.ArgumentParser(prog="python -m evaluation", formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="Leave-one-out quality measurements.",
                                epilog=f"commands:\n{listing}\n\n`python -m evaluation COMMAND --help` for its options")
    p.add_argument("command", choices=list(COMMANDS), help="what to measure (listed below)")
    return p


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        parser().parse_args(argv[:1])  # --help, or an error naming the valid commands
        return
    module, _, func = COMMANDS[argv[0]][0].partition(":")
    getattr(importlib.import_module(module), func)(argv[1:])


if __name__ == "__main__":
    main()
