"""Dataset loading: `sequences.txt` + `items.tsv`, leave-one-out splits, item text.

Format: `sequences.txt` holds one user per line, ``user_id item_id ...`` in time
order; `items.tsv` has a header with at least ``item_id`` and ``title`` (other text columns, e.g.
``description``, are kept). The text an item is embedded from is chosen by column (`Catalog.text`,
default the title only); a column value written as a Python list of strings (``['a', 'b']``, as the
Amazon-2018 descriptions are published) is read as those strings joined. Malformed input raises
`DataFormatError` naming the file, the line and what to do. `check_dataset` collects every problem instead
(one line each) and ``python -m services.catalog check DIR`` prints them; every entry point that reads a
dataset calls `exit_if_invalid` first, so bad data fails in a second with the message alone, before any
model loads. This module does not embed, split into codes or touch Redis.
"""

from __future__ import annotations

import argparse
import ast
import csv
import hashlib
import sys
from dataclasses import dataclass, field
from pathlib import Path

MAX_PROBLEMS = 20  # problems listed by `check_dataset` (then a count of the rest)
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


def _problem(problems: list[DataFormatError] | None, error: DataFormatError) -> None:
    """Raise `error`, or collect it when the caller checks the whole file (`problems` given)."""
    if problems is None:
        raise error
    problems.append(error)


def load_items(path: Path | str, problems: list[DataFormatError] | None = None) -> Catalog:
    """Read `items.tsv`. Empty titles are kept as "" and listed in `Catalog.empty_titles`.

    With `problems`, malformed lines are appended there and skipped instead of raised (`check_dataset`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"items file not found: {path} (a dataset folder holds items.tsv and sequences.txt)")
    item_ids: list[int] = []
    titles: dict[int, str] = {}
    columns: dict[str, dict[int, str]] = {}
    empty: list[int] = []
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        if header is None:
            raise DataFormatError(path, 1, "empty file: write a tab-separated header with item_id and title, then "
                                           "one item a line")
        if "item_id" not in header or "title" not in header:
            raise DataFormatError(path, 1, f"header must contain item_id and title, got {header}: make the first "
                                           "line a tab-separated header (item_id<TAB>title<TAB>...)")
        id_col, title_col = header.index("item_id"), header.index("title")
        extra = [(i, name) for i, name in enumerate(header) if i not in (id_col, title_col)]
        for name in (n for _, n in extra):
            columns[name] = {}
        for lineno, row in enumerate(reader, start=2):
            if not row or all(not c.strip() for c in row):
                _problem(problems, DataFormatError(path, lineno, "blank line: delete it"))
                continue
            if len(row) != len(header):
                _problem(problems, DataFormatError(
                    path, lineno, f"expected {len(header)} tab-separated fields, got {len(row)}: a field may not "
                                  "contain a tab or a newline; an empty field still needs its tab"))
                continue
            try:
                item_id = int(row[id_col])
            except ValueError:
                _problem(problems, DataFormatError(
                    path, lineno, f"item_id is not an integer: {row[id_col]!r} (item ids are integers)"))
                continue
            if item_id in titles:
                _problem(problems, DataFormatError(
                    path, lineno, f"duplicate item_id {item_id}: keep one line per item"))
                continue
            title = row[title_col].strip()
            if not title:
                empty.append(item_id)
            item_ids.append(item_id)
            titles[item_id] = title
            for i, name in extra:
                columns[name][item_id] = row[i]
    if not item_ids and not problems:
        raise DataFormatError(path, 2, "no items: add one item a line below the header")
    return Catalog(item_ids, titles, columns, empty)


def load_sequences(path: Path | str, catalog: Catalog | None = None, min_len: int = 3,
                   problems: list[DataFormatError] | None = None) -> dict[int, list[int]]:
    """Read `sequences.txt` into ``{user_id: [item_id, ...]}`` (time order).

    Every user needs at least `min_len` items (train/valid/test under leave-one-out); item ids must
    exist in `catalog` when one is given. With `problems`, malformed lines are collected and skipped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sequences file not found: {path} (a dataset folder holds items.tsv and "
                                "sequences.txt)")
    users: dict[int, list[int]] = {}
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            parts = line.split()
            if not parts:
                _problem(problems, DataFormatError(path, lineno, "blank line: delete it"))
                continue
            try:
                ids = [int(p) for p in parts]
            except ValueError:
                bad = next(p for p in parts if not p.lstrip("-").isdigit())
                _problem(problems, DataFormatError(
                    path, lineno, f"not an integer: {bad!r} (a line is user_id item_id ..., integers separated "
                                  "by spaces)"))
                continue
            user, items = ids[0], ids[1:]
            if user in users:
                _problem(problems, DataFormatError(
                    path, lineno, f"duplicate user_id {user}: put all of a user's items on one line"))
                continue
            if len(items) < min_len:
                _problem(problems, DataFormatError(
                    path, lineno, f"user {user} has {len(items)} items, need >= {min_len} (train, validation, "
                                  "test): drop the user or add items"))
                continue
            if catalog is not None:
                unknown = [i for i in items if i not in catalog]
                if unknown:
                    _problem(problems, DataFormatError(
                        path, lineno, f"unknown item_id {unknown[0]} (not in items.tsv): add it to items.tsv or "
                                      "remove it from the sequence"))
                    continue
            users[user] = items
    if not users and not problems:
        raise DataFormatError(path, 1, "no users: write one user a line, user_id item_id item_id ...")
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


def check_dataset(data_dir: Path | str, limit: int = MAX_PROBLEMS) -> list[str]:
    """Every problem of the dataset in `data_dir`, one line each (``file:line: what, what to do``); [] if fine.

    Reads both files through the loaders (the same rules), collecting instead of stopping; at most `limit`
    lines, then a count of the rest. Fast (no model, no torch): entry points call it before loading anything."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        return [f"{data_dir}: dataset folder not found (it must hold items.tsv and sequences.txt)"]
    problems: list[DataFormatError] = []
    lines: list[str] = []
    catalog: Catalog | None = None
    try:
        catalog = load_items(data_dir / "items.tsv", problems)
    except (FileNotFoundError, DataFormatError, UnicodeDecodeError, csv.Error) as e:
        lines.append(_one_line(e, data_dir / "items.tsv"))
    try:
        # unknown items are only checked against a catalogue that read cleanly (else every line would say so)
        load_sequences(data_dir / "sequences.txt", catalog if catalog is not None and not problems else None,
                       problems=problems)
    except (FileNotFoundError, DataFormatError, UnicodeDecodeError) as e:
        lines.append(_one_line(e, data_dir / "sequences.txt"))
    lines += [str(p) for p in problems]
    if len(lines) > limit:
        lines = lines[:limit] + [f"... and {len(lines) - limit} more problems"]
    return lines


def _one_line(error: Exception, path: Path) -> str:
    if isinstance(error, UnicodeDecodeError):
        return f"{path}: not UTF-8 text ({error.reason} at byte {error.start}): save the file as UTF-8"
    return str(error)


def exit_if_invalid(data_dir: Path | str) -> None:
    """Print every problem of the dataset (one line each, no traceback) and exit with status 2; else return.

    The first call of every command that reads a dataset, so that bad data fails before any model loads."""
    lines = check_dataset(data_dir)
    if lines:
        for line in lines:
            print(f"error: {line}", file=sys.stderr)
        print(f"dataset {data_dir} is not usable: fix the lines above (format: README, section Your own data); "
              f"`python -m services.catalog check {data_dir}` checks it again", file=sys.stderr)
        raise SystemExit(2)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m services.catalog", description="Dataset tools.")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check", help="validate a dataset folder (items.tsv, sequences.txt): one line per problem")
    c.add_argument("data_dir", type=Path, help="dataset folder")
    args = p.parse_args(argv)
    exit_if_invalid(args.data_dir)
    ds = load_dataset(args.data_dir)
    repeats = sum(e.target in e.history for e in ds.splits.valid)
    print(f"ok: {args.data_dir}: {len(ds.catalog)} items ({len(ds.catalog.empty_titles)} without a title), "
          f"{len(ds.sequences)} users, {sum(map(len, ds.sequences.values()))} interactions, "
          f"{repeats} validation targets already in their user's history (repeats)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
