"""``python -m model.semantic_ids build|stats``: build semantic IDs for a catalogue, or print a folder's statistics.

The parser only; the codes, their format and the build itself are `model.semantic_ids`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from model.semantic_ids import (
    VARIANTS,
    SemanticIDConfig,
    SemanticIDs,
    build,
    point_current,
    version_name,
)
from services.catalog import TEXT_COLUMNS, dataset_name, exit_if_invalid


def main(argv: list[str] | None = None) -> None:
    from services.config import claim_or_exit, get_settings

    settings = get_settings()
    p = argparse.ArgumentParser(prog="python -m model.semantic_ids",
                                description="Semantic IDs: item text -> residual k-means -> unique codes.")
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
