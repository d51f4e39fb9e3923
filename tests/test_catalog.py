"""Loader errors on malformed files and leave-one-out split correctness."""

from pathlib import Path

import pytest

from services.catalog import DataFormatError, leave_one_out, load_dataset, load_items, load_sequences

HEADER = "item_id\tasin\ttitle\treference_sid\n"


def write(tmp_path: Path, items: str, seqs: str) -> Path:
    (tmp_path / "items.tsv").write_text(items)
    (tmp_path / "sequences.txt").write_text(seqs)
    return tmp_path


def items_text(n: int) -> str:
    return HEADER + "".join(f"{i}\tA{i}\titem {i}\t<a_1><b_2><c_3><d_{i}>\n" for i in range(1, n + 1))


def test_loads_and_splits(tmp_path: Path) -> None:
    d = write(tmp_path, items_text(6), "1 1 2 3 4\n2 5 6 1\n")
    ds = load_dataset(d)
    assert len(ds.catalog) == 6
    assert ds.splits.train == {1: [1, 2], 2: [5]}
    assert [(e.user_id, e.history, e.target) for e in ds.splits.valid] == [(1, [1, 2], 3), (2, [5], 6)]
    assert [(e.user_id, e.history, e.target) for e in ds.splits.test] == [(1, [1, 2, 3], 4), (2, [5, 6], 1)]


def test_history_cap() -> None:
    seq = list(range(1, 61))
    s = leave_one_out({7: seq}, cap=50)
    assert s.test[0].history == seq[-51:-1]
    assert len(s.test[0].history) == 50 and s.test[0].target == 60
    assert s.valid[0].history == seq[-52:-2] and s.valid[0].target == 59
    assert s.train[7] == seq[:-2]


@pytest.mark.parametrize(
    ("seqs", "line", "fragment"),
    [
        ("1 1 2 3\n2 1 x 3\n", 2, "not an integer"),
        ("1 1 2 3\n\n", 2, "blank line"),
        ("1 1 2\n", 1, "need >= 3"),
        ("1 1 2 3\n1 2 3 4\n", 2, "duplicate user_id"),
        ("1 1 2 99\n", 1, "unknown item_id 99"),
    ],
)
def test_sequence_errors_name_file_and_line(tmp_path: Path, seqs: str, line: int, fragment: str) -> None:
    write(tmp_path, items_text(4), seqs)
    cat = load_items(tmp_path / "items.tsv")
    with pytest.raises(DataFormatError) as err:
        load_sequences(tmp_path / "sequences.txt", cat)
    assert err.value.line == line
    assert "sequences.txt" in str(err.value) and fragment in str(err.value)


@pytest.mark.parametrize(
    ("items", "line", "fragment"),
    [
        ("id\ttitle\n1\tx\n", 1, "header must contain"),
        (HEADER + "1\tA\tx\t<a_1>\n2\tB\ty\n", 3, "expected 4"),
        (HEADER + "z\tA\tx\t<a_1>\n", 2, "not an integer"),
        (HEADER + "1\tA\tx\t<a_1>\n1\tB\ty\t<a_2>\n", 3, "duplicate item_id"),
        ("", 1, "empty file"),
    ],
)
def test_item_errors_name_file_and_line(tmp_path: Path, items: str, line: int, fragment: str) -> None:
    (tmp_path / "items.tsv").write_text(items)
    with pytest.raises(DataFormatError) as err:
        load_items(tmp_path / "items.tsv")
    assert err.value.line == line and fragment in str(err.value) and "items.tsv" in str(err.value)


def test_empty_title_is_explicit(tmp_path: Path) -> None:
    (tmp_path / "items.tsv").write_text(HEADER + "1\tA\t\t<a_1>\n2\tB\tlip gloss\t<a_2>\n")
    cat = load_items(tmp_path / "items.tsv")
    assert cat.empty_titles == [1]
    assert cat.text(1) == "untitled item" and cat.text(2) == "lip gloss"


def test_missing_file_is_clear(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="items file not found"):
        load_items(tmp_path / "nope.tsv")


def test_bundled_beauty_loads() -> None:
    ds = load_dataset(Path(__file__).resolve().parent.parent / "data" / "beauty")
    assert len(ds.catalog) == 12101 and len(ds.sequences) == 22363
    assert sum(len(s) for s in ds.sequences.values()) == 198502
    assert ds.catalog.empty_titles == [10205]


def test_item_text_from_columns(tmp_path: Path) -> None:
    from services.catalog import column_text

    items = ("item_id\ttitle\tdescription\n1\tSteel drill bit\t['For metal.', 'HSS, 5 mm.']\n2\tBrass valve\t[]\n"
             "3\t\tplain text\n")
    cat = load_items(write(tmp_path, items, "1 1 2 3\n").joinpath("items.tsv"))
    assert cat.text(1) == "Steel drill bit"  # default: titles only
    assert cat.text(1, ("title", "description")) == "Steel drill bit. For metal. HSS, 5 mm."
    assert cat.text(2, ("title", "description")) == "Brass valve"  # an empty list adds nothing
    assert cat.text(3, ("title", "description")) == "plain text"
    assert column_text("[not a list") == "[not a list"
    with pytest.raises(ValueError, match="'color' is not in items.tsv"):
        cat.check_columns(("title", "color"))


def test_dataset_selects_artifacts_and_results(tmp_path: Path) -> None:
    from services.config import ROOT, Settings

    beauty = Settings()
    assert beauty.dataset == "beauty" and beauty.artifacts_dir == ROOT / "artifacts"
    mine = Settings(data_dir=tmp_path / "shop", artifacts_root=tmp_path / "art")
    assert mine.dataset == "shop" and mine.artifacts_dir == tmp_path / "art" / "shop"
    assert mine.resolved("onerec") == tmp_path / "art" / "shop" / "onerec" / "current"
    assert Settings(data_dir=tmp_path / "shop", artifacts_dir=tmp_path / "x").artifacts_dir == tmp_path / "x"
    with pytest.raises(ValueError, match="may not be named 'sid'"):
        Settings(data_dir=tmp_path / "sid")
