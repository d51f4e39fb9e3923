"""The validation grid of `evaluation.tune` (the end-to-end run needs a refresh; see RESULTS.md)."""

from __future__ import annotations

import pytest

from evaluation.tune import CachedSource, grid
from services.catalog import Example
from services.store import ThinkEntry


def test_grid_skips_settings_that_cannot_differ() -> None:
    rows = grid([0, 16], [0.0, 0.5], [0.0, -1.0])
    # the floor only matters with own prefixes and a non-zero prefix weight
    assert rows == [(0, 0.0, 0.0, 0.0), (0, 0.5, 0.0, 0.0), (16, 0.0, 0.0, 0.0), (16, 0.5, 0.0, 0.0),
                    (16, 0.5, -1.0, 0.0)]
    assert grid([16], [0.25], [0.0], [0.0, 1.0]) == [(16, 0.25, 0.0, 0.0), (16, 0.25, 0.0, 1.0)]


def test_cached_source_answers_by_user() -> None:
    entry = ThinkEntry("r", [(1, 2, -0.5)], 3, [7], "m", 0.0)
    src = CachedSource({5: entry, 6: None})
    assert src([Example(6, [1], 2), Example(5, [1], 2), Example(9, [1], 2)]) == [None, entry, None]


def test_entries_must_come_from_the_staler_history() -> None:
    from evaluation.think_ahead import require_staler

    seqs = {1: [10, 11, 12, 13, 14]}
    ok = ThinkEntry("", [(1, 2, 0.0)], 2, [11], "m", 0.0)  # valid split: history without the last 3 items
    require_staler(seqs, [Example(1, [10, 11, 12], 13)], [ok], "valid")
    require_staler(seqs, [Example(1, [10, 11, 12], 13)], [None], "valid")  # no entry: nothing to check
    with pytest.raises(SystemExit, match="holdout 2"):
        require_staler(seqs, [Example(1, [10, 11, 12, 13], 14)], [ok], "test")
