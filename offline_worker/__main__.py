"""CLI of the offline worker: ``python -m offline_worker {refresh,status,publish,rollback,gc}`` (or ``onerec-offline``).

- ``refresh``: run the engine over users and write a new version; resumes after a kill (same command);
  ``--shard i/N`` for N workers on one version; publishes when every shard is done (``--no-publish``
  to leave that to ``publish``).
- ``status``: live/previous version and progress of a version (JSON).
- ``publish``: verify a version (all shards' chunks done, entry count) and flip ``current`` to it.
- ``rollback``: make ``previous`` live again (one atomic flip; the rolled-back version becomes ``previous``).
- ``gc``: delete versions other than current, previous and the newest ``--keep``.

Defaults come from `services.config.Settings` (``ONEREC_*`` environment). Not a library: the job lives in
`offline_worker.refresh`, the engines in `offline_worker.engine_interface`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from offline_worker.logs import quiet_vendor_logs
from services.config import Settings, get_settings


def _redis(settings: Settings, url: str | None) -> Any:
    from services.store.connect import connect

    return connect(url or settings.redis_url, timeout_s=30, connect_timeout_s=5)


def _store(args: argparse.Namespace, settings: Settings) -> Any:
    from services.store import ThinkStore

    return ThinkStore(_redis(settings, args.redis_url), args.namespace or settings.namespace)


def _user_list(text: str | None) -> list[int] | None:
    """``--user-list 1,2,3`` or ``--user-list @file`` (ids separated by whitespace or commas)."""
    if text is None:
        return None
    raw = Path(text[1:]).read_text() if text.startswith("@") else text
    try:
        return [int(x) for x in raw.replace(",", " ").split()]
    except ValueError as e:
        raise SystemExit(f"--user-list: not an integer id ({e})") from None


def _vllm_args(pairs: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for p in pairs:
        key, sep, value = p.partition("=")
        if not sep or not key:
            raise SystemExit(f"--vllm-arg: expected KEY=VALUE, got {p!r}")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def resolve_dirs(args: argparse.Namespace, settings: Settings) -> tuple[Path, Path]:
    """(model folder, semantic-ID folder): ``--sid``, else the codes saved inside the model folder
    (``<model>/sid``, the ones it was trained on), else ``artifacts/sid/current``."""
    model_dir = Path(args.model or settings.resolved("think"))
    if args.sid:
        return model_dir, Path(args.sid)
    own = model_dir / "sid"
    return model_dir, own if (own / "codes.tsv").is_file() else settings.resolved("sid")


def engine_spec(args: argparse.Namespace, settings: Settings) -> Any:
    """The engine chosen by ``--engine`` as an `EngineSpec`: every option from `Settings`, the flags on top."""
    from offline_worker.engine_interface import EngineConfig, served_mode
    from offline_worker.ray_refresh import EngineSpec
    from offline_worker.vllm_engine import VLLMOptions

    model_dir, sid_dir = resolve_dirs(args, settings)
    config = dict(samples=args.samples, prefixes_per_sample=args.prefixes, beam_a=args.beam_a,
                  prefix_scores=args.prefix_scores, max_reasoning_tokens=args.max_reasoning_tokens,
                  greedy=args.greedy or None, grounded_reasoning=getattr(args, "grounded_reasoning", None),
                  grounding_data=str(args.data) if getattr(args, "data", None) else None,
                  mode=served_mode(getattr(args, "mode", None) or settings.offline_mode, model_dir),
                  mix_onerec=getattr(args, "mix_onerec", None), mix_weight=getattr(args, "mix_weight", None),
                  contrast=getattr(args, "contrast", None), items=getattr(args, "items", None),
                  explain=getattr(args, "explain", None) or None)
    vllm = dict(dtype=args.dtype, enforce_eager=True if args.enforce_eager else None,
                tensor_parallel_size=args.tensor_parallel_size, pipeline_parallel_size=args.pipeline_parallel_size,
                block_size=args.block_size,
                extra={**settings.vllm_args, **_vllm_args(args.vllm_arg)} if args.vllm_arg else None)
    options = VLLMOptions.from_settings(settings, **vllm) if args.engine == "vllm" else None
    return EngineSpec(args.engine, str(model_dir), str(sid_dir), EngineConfig.from_settings(settings, **config),
                      options, settings.hf_batch_size)


def build_engine(args: argparse.Namespace, settings: Settings) -> Any:
    """The engine chosen by ``--engine`` (see `engine_spec`), built in this process."""
    from offline_worker.engine_factory import make_engine

    spec = engine_spec(args, settings)
    return make_engine(spec.kind, spec.model_dir, spec.sid_dir, spec.config, spec.vllm, spec.hf_batch_size)


def cmd_incremental(args: argparse.Namespace, settings: Settings) -> int:
    """``refresh --stale-first N`` / ``--min-staleness S``: recompute stale users into the live version."""
    from model.semantic_ids import SemanticIDs
    from offline_worker.incremental import IncrementalOptions, report_dict, run_incremental

    if args.ray is not None or args.shard != "0/1" or args.users != "all" or args.holdout or args.limit:
        raise ValueError("--stale-first/--min-staleness: not with --ray, --shard, --users, --holdout or --limit")
    opts = IncrementalOptions.from_settings(settings, stale_first=args.stale_first, min_staleness=args.min_staleness,
                                            chunk=args.chunk, progress=not args.no_progress,
                                            throttle_s=args.throttle_s)  # fmt: skip
    store = _store(args, settings)
    engine = build_engine(args, settings)
    try:
        report = run_incremental(store, engine, SemanticIDs.load(resolve_dirs(args, settings)[1]), opts)
    finally:
        engine.close()
    print(json.dumps(report_dict(report), indent=2))
    return 0


def cmd_refresh(args: argparse.Namespace, settings: Settings) -> int:
    from services.catalog import exit_if_invalid, load_sequences

    exit_if_invalid(settings.data_dir)  # bad data: one line per problem, before anything heavy is imported

    from model.semantic_ids import SemanticIDs
    from offline_worker.refresh import (
        RefreshOptions,
        offline_histories,
        parse_shard,
        plan_refresh,
        report_dict,
        run_shard,
    )

    if args.incremental or args.stale_first is not None or args.min_staleness is not None:
        return cmd_incremental(args, settings)
    shard, shards = parse_shard(args.shard)
    if args.ray is not None and shards != 1:
        raise ValueError(f"--ray: Ray distributes the chunks itself; drop --shard {args.shard}")
    opts = RefreshOptions.from_settings(
        settings,
        mode=args.users,
        user_list=_user_list(args.user_list),
        chunk=args.chunk,
        shard=shard,
        shards=shards,
        version=args.version,
        holdout=args.holdout,
        limit=args.limit,
        write_histories=not args.no_histories,
        publish=not args.no_publish,
        progress=not args.no_progress,
        throttle_s=args.throttle_s,
    )
    data_dir = Path(args.data or settings.data_dir)
    histories = offline_histories(load_sequences(data_dir / "sequences.txt"), opts.holdout, opts.limit)
    sid_dir = resolve_dirs(args, settings)[1]
    sid = SemanticIDs.load(sid_dir)
    store = _store(args, settings)
    if args.ray is not None:
        return _refresh_on_ray(args, settings, store, histories, opts)
    engine = build_engine(args, settings)
    try:
        # content hashes, not paths: shards on other machines (other mount points) must name the same version
        settings_key = _settings_key(engine.name, engine.config, sid_dir)
        plan = plan_refresh(store, histories, engine.model_id, settings_key, opts)
        logging.info("plan %s: %d users, %d to compute, %d to carry from %s, %d chunks, shard %d/%d", plan.version,
                     len(plan.users), len(plan.recompute), len(plan.carry), plan.base, len(plan.chunks()), shard,
                     shards)  # fmt: skip
        report = run_shard(store, engine, sid, histories, plan, opts)
    finally:
        engine.close()
    print(json.dumps(report_dict(report), indent=2))
    return 0


def _settings_key(engine: str, config: Any, sid_dir: Path) -> dict[str, Any]:
    """What names a version besides the users: engine, decoding settings, codes. Content hashes, not paths:
    workers on other machines (other mount points) must name the same version."""
    codes_hash = hashlib.sha256((sid_dir / "codes.tsv").read_bytes()).hexdigest()[:12]
    key = {"engine": engine, **asdict(config), "codes": codes_hash}
    data = Path(key.pop("grounding_data", "") or "")
    if key.get("grounded_reasoning") and (data / "items.tsv").is_file():  # the titles the grammar names, by content
        key["grounding_items"] = hashlib.sha256((data / "items.tsv").read_bytes()).hexdigest()[:12]
    for name in ("contrast", "items", "explain"):  # off: versions keep the names they had before the setting existed
        if not key.get(name):
            key.pop(name, None)
    if key.get("mix_onerec"):  # the online model of a mixed or contrasted prefix ranking, by content too
        from offline_worker.engine_interface import model_id

        key["mix_onerec"] = model_id(key["mix_onerec"])
    return key


def _refresh_on_ray(args: argparse.Namespace, settings: Settings, store: Any, histories: dict[int, list[int]],
                    opts: Any) -> int:  # fmt: skip
    """``refresh --ray [ADDRESS]``: the plan here, the chunks on a Ray actor pool, one publish."""
    from offline_worker.engine_interface import model_id
    from offline_worker.ray_refresh import RayOptions, run_ray
    from offline_worker.refresh import plan_refresh, report_dict

    spec = engine_spec(args, settings)
    ray_opts = RayOptions(address=args.ray or None, actors=args.ray_actors, cpus_per_actor=args.ray_cpus_per_actor,
                          gpus_per_actor=args.ray_gpus_per_actor)  # fmt: skip
    # the engine kind is its `Engine.name`: the same plan (version) as a single-process refresh
    key = _settings_key(spec.kind, spec.config, Path(spec.sid_dir))
    plan = plan_refresh(store, histories, model_id(spec.model_dir), key, opts)
    logging.info("plan %s: %d users, %d to compute, %d to carry from %s, %d chunks, on ray (%d actors)",
                 plan.version, len(plan.users), len(plan.recompute), len(plan.carry), plan.base,
                 len(plan.chunks()), ray_opts.actors)  # fmt: skip
    url = args.redis_url or settings.redis_url
    print(json.dumps(report_dict(run_ray(store, url, spec, histories, plan, opts, ray_opts)), indent=2))
    return 0


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    from offline_worker.refresh import shard_progress

    store = _store(args, settings)
    out = store.status(args.version)
    if out.get("version") is not None:
        try:
            out["shards"] = {s: {"done": d, "chunks": w} for s, (d, w) in shard_progress(store, out["version"]).items()}
        except ValueError as e:
            out["shards"] = str(e)
    out["versions"] = store.versions()
    out["corrupt_values"] = store.corrupt
    print(json.dumps(out, indent=2, default=str))
    return 0


def cmd_publish(args: argparse.Namespace, settings: Settings) -> int:
    from offline_worker.refresh import publish_version
    from services.store import IncompleteVersionError

    store = _store(args, settings)
    try:
        old = publish_version(store, args.version)
    except (IncompleteVersionError, ValueError) as e:
        print(f"publish refused: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"current": args.version, "previous": old}))
    return 0


def cmd_rollback(args: argparse.Namespace, settings: Settings) -> int:
    store = _store(args, settings)
    try:
        live = store.rollback()
    except RuntimeError as e:
        print(f"rollback refused: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"current": live, "previous": store.previous_version()}))
    return 0


def cmd_gc(args: argparse.Namespace, settings: Settings) -> int:
    store = _store(args, settings)
    removed = store.gc(keep=args.keep if args.keep is not None else settings.gc_keep)
    print(json.dumps({"removed": removed, "current": store.current_version(), "previous": store.previous_version()}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m offline_worker", description=__doc__.split("\n\n")[0])
    p.add_argument("--redis-url", help="Redis URL (default: ONEREC_REDIS_URL)")
    p.add_argument("--namespace", help="key namespace (default: ONEREC_NAMESPACE)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="cmd", required=True)

    r = sub.add_parser("refresh", help="compute and write a new version (resumable, shardable)")
    r.add_argument("--engine", choices=("vllm", "hf"), help="engine (default: ONEREC_ENGINE)")
    r.add_argument("--model", type=Path, help="OneRec-Think HF folder (default: artifacts/think/current)")
    r.add_argument("--sid", type=Path, help="semantic-ID folder (default: <model>/sid, else artifacts/sid/current)")
    r.add_argument("--data", type=Path, help="dataset folder with sequences.txt (default: ONEREC_DATA_DIR)")
    r.add_argument("--users", choices=("all", "list", "changed"), default="all",
                   help="users to recompute; the rest are carried over from the live version")
    r.add_argument("--user-list", help="ids for --users list: '1,2,3' or '@file'")
    r.add_argument("--shard", default="0/1", help="this worker's part i/N of the version (default 0/1)")
    r.add_argument("--chunk", type=int, help="users per engine call (default: ONEREC_REFRESH_CHUNK)")
    r.add_argument("--version", help="version name (default: hash of the plan, so a re-run resumes)")
    r.add_argument("--limit", type=int, help="only the first N users (smoke runs)")
    r.add_argument("--holdout", type=int, default=0, help="drop each user's last N items (stale offline history)")
    r.add_argument("--samples", type=int, help="T reasoning paths per user")
    r.add_argument("--prefixes", type=int, help="m prefixes kept per path")
    r.add_argument("--prefix-scores", choices=["auto", "codes", "item_head"],
                   help="prefix ranking: the checkpoint's item head or the code beam (default: ONEREC_PREFIX_SCORES, "
                        "auto = the head when the checkpoint has one)")
    r.add_argument("--mode", choices=["auto", "think", "direct"],
                   help="think (reasoning then prefixes) or direct (no reasoning); default ONEREC_OFFLINE_MODE, auto = "
                        "think only for a model trained to reason; recorded in the version's meta (engine.mode)")
    r.add_argument("--mix-onerec", help="online OneRec checkpoint mixed into the item head's prefix ranking, both "
                                        "from the same history ('' = off; default ONEREC_PREFIX_MIX_ONEREC)")
    r.add_argument("--mix-weight", type=float, help="the think head's weight in that mixture (default "
                                                    "ONEREC_PREFIX_MIX_WEIGHT)")
    r.add_argument("--contrast", type=float, help="> 0: rank by log p_think - this x log p_online (the --mix-onerec "
                                                  "model) instead of mixing (default ONEREC_PREFIX_CONTRAST, 0 = off)")
    r.add_argument("--items", type=int, help="store the think head's top-N items with their log-probs in each entry "
                                             "(default ONEREC_THINK_ITEMS, 0 = none)")
    r.add_argument("--explain", action="store_true",
                   help="direct mode: also store the model's greedy rationale for display (it does not condition the "
                        "prefixes; default ONEREC_OFFLINE_EXPLAIN)")
    r.add_argument("--beam-a", type=int, help="level-a codes expanded per path (default: ONEREC_PREFIX_BEAM_A)")
    r.add_argument("--max-reasoning-tokens", type=int,
                   help="free reasoning's token budget (a grounded rationale gets its grammar's longest length)")
    r.add_argument("--greedy", action="store_true", help="every reasoning path greedy")
    r.add_argument("--grounded-reasoning", action=argparse.BooleanOptionalAction, default=None,
                   help="think mode: decode each rationale under the user's grammar (own history items, category "
                        "labels, connectives); default ONEREC_GROUNDED_REASONING; recorded in the version's meta")
    r.add_argument("--no-histories", action="store_true", help="do not write the bounded histories")
    r.add_argument("--no-publish", action="store_true", help="do not flip current (use `publish` later)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.add_argument("--incremental", action="store_true",
                   help="recompute only stale users into the live version (implied by the two flags below)")
    r.add_argument("--stale-first", type=int, metavar="N",
                   help="incremental: recompute the N most stale users into the live version (no new version)")
    r.add_argument("--min-staleness", type=int, metavar="S",
                   help="incremental: only users whose live entry missed >= S interactions "
                        "(default: ONEREC_REFRESH_MIN_STALENESS)")
    r.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="run the chunks on a Ray actor pool (no ADDRESS: a local cluster in this process)")
    r.add_argument("--ray-actors", type=int, default=2, help="--ray: engine replicas (one per actor)")
    r.add_argument("--ray-cpus-per-actor", type=float, default=1.0, help="--ray: CPUs reserved per actor")
    r.add_argument("--ray-gpus-per-actor", type=float, default=0.0, help="--ray: GPUs per actor (1 for vLLM on GPU)")
    r.add_argument("--throttle-s", type=float, default=0.0, help="pause after each chunk (shared machines)")
    r.add_argument("--dtype", help="vLLM dtype (default: ONEREC_VLLM_DTYPE)")
    r.add_argument("--enforce-eager", action="store_true", help="vLLM: eager mode (faster start-up)")
    r.add_argument("--tensor-parallel-size", type=int, help="vLLM tensor parallel size")
    r.add_argument("--pipeline-parallel-size", type=int, help="vLLM pipeline parallel size")
    r.add_argument("--block-size", type=int, help="vLLM KV block size (CPU default here: 32)")
    r.add_argument("--vllm-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="any other vllm.LLM keyword (value parsed as JSON when it can be), repeatable")

    s = sub.add_parser("status", help="live version and progress (JSON)")
    s.add_argument("--version", help="version to inspect (default: the live one)")

    pb = sub.add_parser("publish", help="verify a version and flip current to it")
    pb.add_argument("--version", required=True, help="version to publish")

    sub.add_parser("rollback", help="make the previous version live again (atomic flip)")

    g = sub.add_parser("gc", help="delete old versions")
    g.add_argument("--keep", type=int, help="newest versions kept besides current/previous (default: ONEREC_GC_KEEP)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # fmt: skip
    noise = quiet_vendor_logs(args.verbose)
    settings = get_settings()
    if args.cmd == "refresh":
        args.engine = args.engine or settings.engine
    handlers = {"refresh": cmd_refresh, "status": cmd_status, "publish": cmd_publish, "rollback": cmd_rollback,
                "gc": cmd_gc}  # fmt: skip
    handler = handlers[args.cmd]
    try:
        return handler(args, settings)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if noise is not None and noise.suppressed:
            logging.info(noise.summary())


if __name__ == "__main__":  # vLLM's engine core starts with `spawn`: this guard is required
    sys.exit(main())
