"""``python -m model.onerec train``: the lightweight OneRec's command line (the training is `model.onerec.train`).

Evaluation is not here: ``python -m evaluation onerec`` (mode ``onerec``, ``onerec_quality.json``) and
``python -m evaluation onerec-variants``. The dataset is checked first (`services.catalog.exit_if_invalid`: one line
per problem, exit status 2), before torch is imported, so bad data fails within a second.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from model.onerec.config import DEFAULT_EPOCHS
from services.catalog import HISTORY_CAP, exit_if_invalid


def data_dir_arg(argv: list[str]) -> str | None:
    """The value of ``--data-dir`` in `argv` (either spelling), if given."""
    for i, a in enumerate(argv):
        if a == "--data-dir" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--data-dir="):
            return a.split("=", 1)[1]
    return None


def main(argv: list[str] | None = None) -> None:
    from services.config import claim_or_exit, get_settings

    st = get_settings()
    p = argparse.ArgumentParser(prog="python -m model.onerec", description="Train the lightweight OneRec.")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train on the leave-one-out training histories")
    t.add_argument("--data-dir", type=Path, default=st.data_dir, help="dataset folder")
    t.add_argument("--sid", type=Path, default=st.resolved("sid"), help="semantic-ID folder")
    t.add_argument("--out", type=Path, default=st.artifacts_dir / "onerec", help="root of checkpoint folders")
    t.add_argument("--name", default=None, help="checkpoint folder name (default: from sid variant and time)")
    t.add_argument("--epochs", type=int, default=None,
                   help=f"maximum epochs, the cosine schedule ends here (default {DEFAULT_EPOCHS}; with --refit: the "
                        "selection run's best epoch)")
    t.add_argument("--max-minutes", type=float, default=60.0, help="training time budget")
    t.add_argument("--patience", type=int, default=6, help="epochs without val improvement before stopping")
    t.add_argument("--batch-size", type=int, default=128, help="sequences per batch")
    t.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    t.add_argument("--schedule", choices=["constant", "cosine"], default="cosine",
                   help="LR after warm-up: constant, or cosine decay to --min-lr-ratio at --epochs")
    t.add_argument("--warmup-epochs", type=float, default=1.0, help="linear LR warm-up length")
    t.add_argument("--min-lr-ratio", type=float, default=0.02, help="final LR / base LR of the cosine schedule")
    t.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay")
    t.add_argument("--d-model", type=int, default=128, help="hidden size")
    t.add_argument("--layers", type=int, default=2, help="transformer layers")
    t.add_argument("--heads", type=int, default=2, help="attention heads")
    t.add_argument("--dropout", type=float, default=0.3, help="dropout")
    t.add_argument("--max-len", type=int, default=HISTORY_CAP, help="history length (the history cap)")
    t.add_argument("--no-item-emb", action="store_true", help="items embedded by their codes only")
    t.add_argument("--item-loss-weight", type=float, default=1.0,
                   help="weight of the auxiliary next-item softmax (tied to the item embeddings)")
    t.add_argument("--item-score-weight", type=float, default=1.0,
                   help="decode: add this x the item head's log-prob to each complete item's score")
    t.add_argument("--val-users", type=int, default=3000, help="validation users evaluated each epoch")
    t.add_argument("--val-beam", type=int, default=10, help="beam width of validation decoding")
    t.add_argument("--threads", type=int, default=2, help="torch threads")
    t.add_argument("--seed", type=int, default=0, help="random seed")
    t.add_argument("--resume", action="store_true", help="continue from <out>/<name>/state.pt")
    t.add_argument("--refit", action="store_true",
                   help="final test model: train+validation interactions, for the --selection run's best epoch")
    t.add_argument("--selection", type=Path, default=None,
                   help="with --refit: the selection run whose best epoch is reused (default: <out>/current)")
    t.add_argument("--no-current", action="store_true", help="do not point <out>/current at the result")
    args = p.parse_args(argv)
    exit_if_invalid(args.data_dir)  # bad data: one line per problem, before any model loads
    if args.data_dir.resolve() == st.data_dir.resolve():
        claim_or_exit(st)
    from model.onerec.train import train
    from model.semantic_ids import SemanticIDs

    if args.cmd == "train":
        if args.refit and args.selection is None:
            args.selection = args.out / "current"
        if args.name is None:
            variant = SemanticIDs.load(args.sid).config.variant
            kind = "refit" if args.refit else "select"
            args.name = f"{kind}-{variant}-{time.strftime('%Y%m%d-%H%M%S')}"
        train(args)


if __name__ == "__main__":
    if "-h" not in sys.argv and "--help" not in sys.argv:
        from services.config import get_settings

        exit_if_invalid(data_dir_arg(sys.argv[1:]) or get_settings().data_dir)
    main()
