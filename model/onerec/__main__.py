"""``python -m model.onerec train|eval|variants``: the lightweight OneRec's command line (see `train`).

The dataset is checked first (`services.catalog.exit_if_invalid`: one line per problem, exit status 2), before
torch is imported, so bad data fails within a second."""

import sys

from services.catalog import exit_if_invalid
from services.config import get_settings


def data_dir_arg(argv: list[str]) -> str | None:
    """The value of ``--data-dir`` in `argv` (either spelling), if given."""
    for i, a in enumerate(argv):
        if a == "--data-dir" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--data-dir="):
            return a.split("=", 1)[1]
    return None


if __name__ == "__main__":
    if "-h" not in sys.argv and "--help" not in sys.argv:
        exit_if_invalid(data_dir_arg(sys.argv[1:]) or get_settings().data_dir)
    from model.onerec.train import main

    main()
