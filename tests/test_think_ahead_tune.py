"""The validation grid of `model.think_ahead_tune` (the end-to-end run needs a refresh; see RESULTS.md)."""

from __future__ import annotations

from model.think_ahead_tune import CachedSource, grid
from services.catalog import Example
from services.store import ThinkEntry


def test_grid_skips_settings_that_cannot_differ() -> None:
    rows = grid([0, 16], [0.0, 0.5], [0.0, -1.0])
    # the floor only matters with own prefixes and a non-zero prefix weight
    assert rows == [(0, 0.0, 0.0), (0, 0.5, 0.0), (16, 0.0, 0.0), (16, 0.5, 0.0), (16, 0.5, -1.0)]


def test_cached_source_answers_by_user() -> None:
    entry = ThinkEntry("r", [(1, 2, -0.5)], 3, [7], "m", 0.0)
    src = CachedSource({5: entry, 6: None})
    assert src([Example(6, [1], 2), Example(5, [1], 2), Example(9, [1], 2)]) == [None, entry, None]
