"""The main job on the bundled data: build semantic IDs and print their statistics.

Later stages (models, offline refresh, API, sample recommendations) are added to this script as they
land. Run with ``make demo`` (set-up included).
"""

from __future__ import annotations

import sys

from model import semantic_ids


def main(argv: list[str] | None = None) -> None:
    semantic_ids.main(["build", "--variant", "text_cf", *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    main()
