"""``python -m evaluation reasoning``: is every stored rationale of a version grounded in its user's history?

Reads the entries of one version (default: the live one) from Redis for every user of the dataset and
parses each rationale (`model.think.grounding.parse`). Reports, over all users with an entry:

- ``nonempty_share``: rationales that are not empty;
- ``grounded_share``: non-empty rationales whose every quoted item mention is a short title of an item
  in the history the entry was computed from (the first ``history_len`` items of the user's sequence);
- ``first_item_category_share``: non-empty rationales naming the category (level-a label) of the entry's
  best prefix, i.e. of the first recommended item;
- ``recent_category_share``: non-empty rationales naming a category of the user's last ``--recent`` items;
- ``well_formed_share``, ``mentions_per_rationale`` and ``invented_mentions`` (mentions outside the history).

Writes ``reasoning.json`` (`services.results.write_result`, with the exact command). Not here: decoding
(`offline_worker`), the format itself (`model.think.grounding`).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from model.semantic_ids import SemanticIDs
from model.think.grounding import RECENT, Grounding, parse
from services.catalog import load_items, load_sequences
from services.config import get_settings
from services.store import ThinkEntry


def grounding_report(entries: dict[int, ThinkEntry | None], sequences: dict[int, list[int]], grounding: Grounding,
                     recent: int = RECENT) -> dict[str, Any]:
    """The shares above over the users in `entries` that have an entry."""
    if recent < 1:
        raise ValueError(f"recent: expected >= 1, got {recent}")
    n = nonempty = grounded = well = first_cat = recent_cat = mentions = invented = 0
    for user, entry in entries.items():
        if entry is None:
            continue
        n += 1
        text = entry.reasoning.strip()
        if not text:
            continue
        nonempty += 1
        history = sequences.get(user, [])[: entry.history_len]
        r = parse(text)
        own = {grounding.titles[i] for i in history if i in grounding.titles}
        bad = sum(m not in own for m in r.mentions)
        mentions += len(r.mentions)
        invented += bad
        grounded += bad == 0
        well += r.well_formed
        named = set(r.likes) | ({r.next} if r.next else set())
        if entry.prefixes:
            a = entry.prefixes[0][0]
            first_cat += grounding.labels.get(a, f"group {a}") in named
        recent_cats = {grounding.category(i) for i in history[-recent:] if grounding.sid.has_item(i)}
        recent_cat += bool(named & recent_cats)
    share = (lambda k: round(k / nonempty, 4) if nonempty else 0.0)  # noqa: E731
    return {
        "users": n, "nonempty_share": round(nonempty / n, 4) if n else 0.0, "grounded_share": share(grounded),
        "first_item_category_share": share(first_cat), "recent_category_share": share(recent_cat),
        "well_formed_share": share(well), "mentions_per_rationale": share(mentions), "invented_mentions": invented,
    }  # fmt: skip


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m evaluation reasoning", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, help="dataset folder (default: ONEREC_DATA_DIR)")
    p.add_argument("--sid", type=Path, help="semantic-ID folder of the version's model (default: <model>/sid of "
                                             "ONEREC_THINK_DIR, else the current codes)")
    p.add_argument("--version", help="version to read (default: the live one)")
    p.add_argument("--redis-url", help="default: ONEREC_REDIS_URL")
    p.add_argument("--namespace", help="default: ONEREC_NAMESPACE")
    p.add_argument("--recent", type=int, default=RECENT, help="items that count as recent history")
    p.add_argument("--no-write", action="store_true", help="print only; do not write docs/results/reasoning.json")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    import json

    import redis

    from services.results import write_result
    from services.store import ThinkStore

    args = parser().parse_args(argv)
    settings = get_settings()
    data = Path(args.data or settings.data_dir)
    sid_dir = args.sid
    if sid_dir is None:
        own = Path(settings.resolved("think")) / "sid"
        sid_dir = own if (own / "codes.tsv").is_file() else Path(settings.resolved("sid"))
    store = ThinkStore(redis.Redis.from_url(args.redis_url or settings.redis_url, socket_timeout=30),
                       args.namespace or settings.namespace)
    version = args.version or store.current_version()
    if version is None:
        raise SystemExit("no live version in Redis: pass --version or run a refresh first")
    catalog, sid = load_items(data / "items.tsv"), SemanticIDs.load(sid_dir)
    sequences = load_sequences(data / "sequences.txt", catalog)
    entries = store.get_entries(version, sorted(sequences))
    metrics = grounding_report(entries, sequences, Grounding.build(catalog, sid), args.recent)
    metrics["version"] = version
    meta = store.meta(version)
    engine = meta.get("engine", {}) if isinstance(meta.get("engine"), dict) else {}
    metrics["grounded_reasoning"] = bool(engine.get("grounded_reasoning", False))
    print(json.dumps(metrics, indent=2))
    if not args.no_write:
        note = (f"version {version}: model {meta.get('model')}, engine mode {engine.get('mode')}, "
                f"{sum(e is not None for e in entries.values())} entries of {len(entries)} dataset users")
        print(write_result("reasoning", metrics, note=note))
