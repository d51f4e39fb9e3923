"""Dataset loading: `sequences.txt` + `items.tsv`, leave-one-out splits, item text.

Format: `sequences.txt` holds one user per line, ``user_id item_id ...`` in time
order; `items.tsv` has a header with at least ``item_id`` and ``title`` (other text columns, e.g.
``description``, are kept). The text an item is embedded from is chosen by column (`Catalog.text`,
default the title only); a column value written as a Python list of strings (``['a', 'b']``, as the
Amazon-2018 descriptions are published) is read as those strings joined. Malformed input raises
`DataFormatError` naming the file and line. This module does not embed, split into codes or touch Redis.
"""

from __future__ import annotations

import ast
import csv
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

HISTORY_CAP = 50  # the one history cap: evaluation, the online model, offline prompts, stored histories
EMPTY_TITLE = "untitled item"
TEXT_COLUMNS = ("title",)  # default item text: titles only (Beauty has nothing else)


def column_text(value: str) -> str:
    """One text cell as plain text: a Python-list literal of strings becomes its strings joined."""
    value = value.strip()
    if value.startswith("[") and value.endswith("]"):
        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return value
        if isinstance(parsed, list) and all(isinstance(x, str) for x in parsed):
            return " ".join(x.strip() for x in parsed if x.strip())
    return value


class DataFormatError(ValueError):
    """A dataset file is malformed; the message names file and line."""

    def __init__(self, path: Path | str, line: int, message: str) -> None:
        super().__init__(f"{path}:{line}: {message}")
        self.path = Path(path)
        self.line = line


@dataclass
class Catalog:
    """The item catalogue: ids in file order, titles, any extra text columns."""

    item_ids: list[int]
    titles: dict[int, str]
    columns: dict[str, dict[int, str]] = field(default_factory=dict)
    empty_titles: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.item_ids)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self.titles

    def title(self, item_id: int) -> str:
        return self.titles.get(item_id, EMPTY_TITLE)

    def check_columns(self, columns: tuple[str, ...] | list[str]) -> None:
        """Raise naming the column when one of `columns` is not in items.tsv."""
        if not columns:
            raise ValueError("text columns: at least one column expected (e.g. title)")
        for c in columns:
            if c != "title" and c not in self.columns:
                raise ValueError(f"text column {c!r} is not in items.tsv (columns: title, {', '.join(self.columns)})")

    def text(self, item_id: int, columns: tuple[str, ...] | list[str] = TEXT_COLUMNS) -> str:
        """Text used to embed an item: the non-empty `columns` joined by ". " (fallback for no text at all)."""
        parts = []
        for c in columns:
            raw = self.titles[item_id] if c == "title" else self.columns[c][item_id]
            part = column_text(raw)
            if part:
                parts.append(part)
        return ". ".join(parts) or EMPTY_TITLE


def load_items(path: Path | str) -> Catalog:
    """Read `items.tsv`. Empty titles are kept as "" and listed in `Catalog.empty_titles`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"items file not found: {path}")
    item_ids: list[int] = []
    titles: dict[int, str] = {}
    columns: dict[str, dict[int, str]] = {}
    empty: list[int] = []
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        if header is None:
            raise DataFormatError(path, 1, "empty file, expected a header with item_id and title")
        if "item_id" not in header or "title" not in header:
            raise DataFormatError(path, 1, f"header must contain item_id and title, got {header}")
        id_col, title_col = header.index("item_id"), header.index("title")
        extra = [(i, name) for i, name in enumerate(header) if i not in (id_col, title_col)]
        for name in (n for _, n in extra):
            columns[name] = {}
        for lineno, row in enumerate(reader, start=2):
            if not row or all(not c.strip() for c in row):
                raise DataFormatError(path, lineno, "blank line")
            if len(row) != len(header):
                raise DataFormatError(path, lineno, f"expected {len(header)} tab-separated fields, got {len(row)}")
            try:
                item_id = int(row[id_col])
            except ValueError:
                raise DataFormatError(path, lineno, f"item_id is not an integer: {row[id_col]!r}") from None
            if item_id in titles:
                raise DataFormatError(path, lineno, f"duplicate item_id {item_id}")
            title = row[title_col].strip()
            if not title:
                empty.append(item_id)
            item_ids.append(item_id)
            titles[item_id] = title
            for i, name in extra:
                columns[name][item_id] = row[i]
    if not item_ids:
        raise DataFormatError(path, 2, "no items")
    return Catalog(item_ids, titles, columns, empty)


def load_sequences(path: Path | str, catalog: Catalog | None = None, min_len: int = 3) -> dict[int, list[int]]:
    """Read `sequences.txt` into ``{user_id: [item_id, ...]}`` (time order).

    Every user needs at least `min_len` items (train/valid/test under leave-one-out); item ids must
    exist in `catalog` when one is given.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sequences file not found: {path}")
    users: dict[int, list[int]] = {}
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            parts = line.split()
            if not parts:
                raise DataFormatError(path, lineno, "blank line")
            try:
                ids = [int(p) for p in parts]
            except ValueError:
                bad = next(p for p in parts if not p.lstrip("-").isdigit())
                raise DataFormatError(path, lineno, f"not an integer: {bad!r}") from None
            user, items = ids[0], ids[1:]
            if user in users:
                raise DataFormatError(path, lineno, f"duplicate user_id {user}")
            if len(items) < min_len:
                raise DataFormatError(path, lineno, f"user {user} has {len(items)} items, need >= {min_len}")
            if catalog is not None:
                unknown = [i for i in items if i not in catalog]
                if unknown:
                    raise DataFormatError(path, lineno, f"unknown item_id {unknown[0]} (not in items file)")
            users[user] = items
    if not users:
        raise DataFormatError(path, 1, "no users")
    return users


@dataclass(frozen=True)
class Example:
    """One evaluation case: capped history and the held-out target."""

    user_id: int
    history: list[int]
    target: int


@dataclass
class Splits:
    """Leave-one-out: last item = test, second to last = validation, the rest = training."""

    train: dict[int, list[int]]  # user -> training part of the sequence (uncapped)
    valid: list[Example]
    test: list[Example]


def leave_one_out(sequences: dict[int, list[int]], cap: int = HISTORY_CAP) -> Splits:
    """Split every user's sequence leave-one-out: last item = test, second to last = validation, history
    capped at the last `cap`."""
    train: dict[int, list[int]] = {}
    valid: list[Example] = []
    test: list[Example] = []
    for user, seq in sequences.items():
        if len(seq) < 3:
            raise ValueError(f"user {user} has {len(seq)} items; leave-one-out needs >= 3")
        train[user] = seq[:-2]
        valid.append(Example(user, seq[:-2][-cap:], seq[-2]))
        test.append(Example(user, seq[:-1][-cap:], seq[-1]))
    return Splits(train, valid, test)


def catalog_hash(catalog: Catalog) -> str:
    """Stable short hash of the catalogue (ids and titles), stored with every artifact."""
    h = hashlib.sha256()
    for i in catalog.item_ids:
        h.update(f"{i}\t{catalog.titles[i]}\n".encode())
    return h.hexdigest()[:16]


@dataclass
class Dataset:
    """Catalogue + sequences + splits, loaded together."""

    catalog: Catalog
    sequences: dict[int, list[int]]
    splits: Splits


def dataset_name(data_dir: Path | str) -> str:
    """The label of a dataset: its folder's name (``data/beauty`` -> ``beauty``); names artifacts and results."""
    return Path(data_dir).resolve().name


def load_dataset(data_dir: Path | str, cap: int = HISTORY_CAP) -> Dataset:
    """Load `items.tsv` and `sequences.txt` from `data_dir` and split them."""
    data_dir = Path(data_dir)
    catalog = load_items(data_dir / "items.tsv")
    sequences = load_sequences(data_dir / "sequences.txt", catalog)
    return Dataset(catalog, sequences, leave_one_out(sequences, cap))
