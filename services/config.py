"""One pydantic-settings `Settings` object for every service (env prefix ``ONEREC_``).

This is the only place where runtime configuration of the online API, the offline worker and the
stack is defined. Model hyper-parameters live in the dataclass configs beside each model instead.

Datasets: ``ONEREC_DATA_DIR`` selects the dataset folder (default the bundled ``data/beauty``); its folder
name is the dataset's label (`Settings.dataset`). Every command's artifacts then live under one folder
per dataset (`Settings.artifacts_dir`: ``artifacts/`` for the bundled Beauty, ``artifacts/<dataset>/``
for any other; `Settings.claim_artifacts` records which data folder owns it and refuses another folder of
the same name) and its results files where `services.results` says (own data: ``<artifacts_dir>/results/``),
so a run on your own data never touches the Beauty artifacts or numbers. The consumed-item rule
(`Settings.consumed_rule`) is ``auto`` by default: the rule recorded in ``<artifacts_dir>/consumed_rule.json``
by ``python -m evaluation repeats --record`` on validation.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.catalog import HISTORY_CAP, dataset_name

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA_DIR = ROOT / "data" / "beauty"
ARTIFACT_KINDS = ("sid", "onerec", "think", "results")  # folders of a dataset's artifacts: no dataset named so
CONSUMED_RULE_FILE = "consumed_rule.json"  # in artifacts_dir: the consumed-item rule chosen on validation
DATASET_FILE = "dataset.json"  # in artifacts_dir: which data folder these artifacts belong to
BUNDLED_DATASETS = ("beauty", "industrial")  # data/<name>: their results are the tracked docs/results


@dataclass(frozen=True)
class ConsumedRule:
    """The consumed-item rule in force and where it came from (shown by ``GET /readyz``)."""

    exclude: bool
    source: str  # "forced by ONEREC_EXCLUDE_CONSUMED", "chosen on validation (...)" or "default (not measured)"


class Settings(BaseSettings):
    """Runtime settings; every field can be set as ``ONEREC_<FIELD>`` in the environment or `.env`."""

    model_config = SettingsConfigDict(env_prefix="ONEREC_", env_file=".env", extra="ignore")

    # data and artifacts
    data_dir: Path = Field(DEFAULT_DATA_DIR, description="dataset folder (sequences.txt, items.tsv); selects the "
                                                         "dataset, its artifacts folder and its results folder")
    artifacts_root: Path = Field(ROOT / "artifacts", description="root of all datasets' artifacts")
    artifacts_dir: Path = Field(None, validate_default=True,  # type: ignore[assignment]  # derived when unset
                                description="this dataset's artifacts; default: artifacts_root for the bundled "
                                            "Beauty, artifacts_root/<dataset> for any other")
    results_dir: Path = Field(ROOT / "docs" / "results",
                              description="root of results files (RESULTS.md beside it); a dataset other than "
                                          "Beauty writes <root>/<dataset>/")
    sid_dir: Path | None = Field(None, description="semantic-ID folder; default: artifacts_dir/sid/current")
    onerec_dir: Path | None = Field(None, description="OneRec checkpoint; default: artifacts_dir/onerec/current")
    think_dir: Path | None = Field(None, description="OneRec-Think HF folder; default: artifacts_dir/think/current")

    # redis
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Redis URL")
    # a Redis Cluster is selected by the URL's scheme (services.store.connect): redis+cluster://host:port[,host:port]
    namespace: str = Field("onerec", description="key namespace (prefix of every key)")
    redis_timeout_ms: int = Field(50, ge=1, description="socket/connect timeout of the online Redis pool")
    think_ttl_s: int = Field(7 * 24 * 3600, ge=60, description="TTL of a think-ahead version's values")
    history_max: int = Field(HISTORY_CAP, ge=1, le=1000, description="bounded per-user history length")

    # online api: serving, and the think-ahead policy (`model.policy.PolicyConfig.from_settings`: beam,
    # prefix_weight, own_prefixes, own_prefix_floor, exclude_consumed), shared with evaluation
    default_budget_ms: float = Field(50.0, gt=0, description="default per-request latency budget")
    max_k: int = Field(100, ge=1, description="largest k a client may ask for")
    default_k: int = Field(10, ge=1)
    # the right rule depends on the shop (`python -m evaluation repeats`, docs/RESULTS.md): Beauty has no repeat
    # targets (the rule only frees slots); Industrial validation (5.2% repeats) R@10 .0815 on vs .1112 off. So
    # `auto` takes the rule the pipeline measured on validation (`consumed_rule`), true/false force it
    exclude_consumed: bool | Literal["auto"] = Field(
        "auto", description="drop items already in the user's history (serving, evaluation): true, false, or auto = "
                            "the rule chosen on validation and recorded in artifacts_dir/consumed_rule.json "
                            "(`python -m evaluation repeats --record`; true until recorded)")
    beam: int = Field(20, ge=1, description="beam width of online decoding (10 cost 14-15% R@10 on Beauty "
                                            "validation: docs/RESULTS.md)")
    batch_max: int = Field(16, ge=1, description="micro-batch size of the model thread")
    batch_wait_ms: float = Field(1.0, ge=0, description="how long the model thread waits to fill a batch")
    torch_threads: int = Field(1, ge=1, description="torch intra-op threads of the online model")
    numpy_one_user: bool = Field(True, description="one-user completions in numpy (model.onerec.one_user: same "
                                                   "ranking, less CPU: docs/PROFILE.md); False: torch for every call")
    fused_one_user: bool = Field(True, description="the one-user engine compiled (numba, model.onerec.fused_user: "
                                                   "same ranking, about half the numpy engine's CPU); False: numpy")
    model_process: bool = Field(True, description="run the online model in a child process (its own GIL, restarted "
                                                  "if it dies); False: on a thread of the API process")
    model_processes: int = Field(1, ge=1, le=16, description="model child processes, used when model_process is "
                                                             "true")
    model_handoff: Literal["loop", "thread", "inline"] = Field(
        "loop", description="how requests reach the model: loop = the event loop writes and reads the model "
                            "processes' sockets (two wake-ups per answer); thread = a batcher thread per process, as "
                            "before; inline = the model runs in the API process on the event loop (no child process, "
                            "no wake-up; a model crash takes the API down: online_api.inline_batcher)")
    api_key: str | None = Field(None, description="if set, requests need header X-API-Key")
    max_request_history: int = Field(200, ge=1, le=1000, description="longest history a request may carry")
    batch_queue_max: int = Field(256, ge=1, description="model jobs waiting at most; beyond, answer by fallback")
    batch_admit_expected: bool = Field(True, description="fail a model job at once when its budget left is below "
                                                         "the model time expected from recent batches")
    # chosen on Beauty validation (`python -m evaluation.tune`, docs/think/think_ahead_tuning.json)
    prefix_weight: float = Field(0.25, ge=0, description="weight of the offline (a, b) log-prob in think-ahead")
    own_prefixes: int = Field(32, ge=0, le=256,
                              description="think-ahead: also complete under the online model's own top-N (a, b); "
                                          "0: cached prefixes only (the paper's design, R@10 .0495 vs .0837 with 32 "
                                          "on Beauty test, for ~12-16% more model time: docs/RESULTS.md)")
    own_prefix_floor: float = Field(0.0, le=0, description="offline score of an own prefix: weakest given + this")
    item_weight: float = Field(0.0, ge=0, description="think-ahead: weight of the think model's item log-prob (the "
                                                      "entry's items) when the completion's candidates are ranked; "
                                                      "0 = off (`model.policy`, docs/THINK.md section 13)")
    redis_backoff_ms: float = Field(250.0, ge=0, description="skip Redis this long once the breaker opens")
    redis_breaker_failures: int = Field(3, ge=1, description="failed Redis round trips in a row that open the breaker")
    redis_max_connections: int = Field(64, ge=1, description="size of the online Redis pool")
    current_ttl_s: float = Field(1.0, ge=0, description="how long the API caches the live think version")
    body_read_timeout_s: float = Field(2.0, gt=0, description="a request body not received within this is a 408 "
                                                            "(a client declaring more than it sends is cut off)")
    pending_events_max: int = Field(100_000, ge=0, description="events buffered while Redis is down")

    # offline worker: engine and decoding (`offline_worker.engine_interface.EngineConfig.from_settings`) and the refresh
    # (`offline_worker.refresh.RefreshOptions.from_settings`)
    engine: str = Field("vllm", pattern="^(vllm|hf)$", description="offline engine")
    reasoning_samples: int = Field(2, ge=1, description="T reasoning paths per user")
    prefixes_per_sample: int = Field(16, ge=1, description="m prefixes kept per reasoning path")
    max_reasoning_tokens: int = Field(48, ge=1)
    prefix_scores: str = Field(
        "auto", pattern="^(auto|codes|item_head)$",
        description="offline prefix ranking: item head mass (auto: when the checkpoint has one) or the code beam",
    )
    prefix_mix_onerec: str = Field(
        "", description="online OneRec checkpoint whose p(a) p(b|a), from the same history, is mixed into the "
                        "item head's prefix mass before the top prefixes are cached ('' = off; "
                        "`offline_worker.head_prefixes`)",
    )
    prefix_mix_weight: float = Field(0.5, ge=0, le=1, description="weight of the think head in that mixture")
    prefix_contrast: float = Field(
        0.0, ge=0, le=4,
        description="> 0: rank the head's prefixes by log p_think - this x log p_online (the model prefix_mix_onerec "
                    "names, same history) instead of mixing: cached slots move away from prefixes the online model "
                    "proposes itself (0 = off)",
    )
    think_items: int = Field(0, ge=0, le=1000, description="offline: store the think head's top-N items with their "
                                                          "log-probs in each entry (0 = none; needs an item head)")
    offline_mode: str = Field(
        "auto", pattern="^(auto|think|direct)$",
        description="offline decoding: think (reasoning, then prefixes), direct (history -> prefixes, no reasoning) or "
                    "auto (the mode `evaluation think choose-mode` recorded for the model, else direct for an "
                    "align-only model, think otherwise); recorded in the version's meta",
    )
    offline_explain: bool = Field(
        False, description="direct mode: also write the think model's rationale (greedy, from the <think> prompt of "
                           "the same history) into each entry for display; the prefixes stay the direct ranking's, "
                           "so the rationale does not condition them; recorded in the version's meta",
    )
    grounded_reasoning: bool = Field(
        False, description="think mode: decode each rationale under the user's grammar (own history items, category "
                           "labels, fixed connectives; `model.think.grounding`); recorded in the version's meta",
    )
    refresh_chunk: int = Field(256, ge=1, description="users per engine call")
    prefix_beam_a: int | None = Field(
        8, ge=1, description="level-a codes expanded per path (None: m); level b costs one request per code"
    )
    reasoning_temperature: float = Field(0.8, gt=0, description="sampling temperature of paths t >= 1 (path 0 greedy)")
    reasoning_top_k: int = Field(50, ge=0, description="top-k of sampled reasoning paths (0: off)")
    reasoning_top_p: float = Field(1.0, gt=0, le=1, description="nucleus of sampled reasoning paths (1: off)")
    offline_seed: int = Field(0, description="seed of the sampled reasoning paths")
    think_history_cap: int = Field(HISTORY_CAP, ge=1, description="history items in an offline prompt (last N)")
    carry_chunk: int = Field(2000, ge=1, description="users per carry-over chunk (entries copied, not recomputed)")
    refresh_min_staleness: int = Field(  # derived from the staleness curve (docs/results/staleness.json)
        5, ge=1, description="incremental refresh: recompute users whose live entry missed >= N interactions"
    )
    gc_keep: int = Field(2, ge=0, description="newest versions `gc` keeps besides current and previous")
    hf_batch_size: int = Field(32, ge=1, description="batch size of the HF reference engine")

    # offline worker: vLLM engine arguments (`offline_worker.vllm_engine.VLLMOptions.from_settings`)
    vllm_dtype: str = Field("auto", description="vLLM dtype (auto, float32, bfloat16, ...)")
    vllm_enforce_eager: bool | None = Field(
        None, description="vLLM: no CUDA graphs / torch.compile (faster start); None: eager on CPU only"
    )
    vllm_tensor_parallel_size: int = Field(1, ge=1, description="vLLM tensor parallel size (GPUs per shard)")
    vllm_pipeline_parallel_size: int = Field(1, ge=1, description="vLLM pipeline parallel size")
    vllm_max_model_len: int | None = Field(None, ge=16, description="vLLM max model length (default: model's)")
    vllm_block_size: int | None = Field(
        None, ge=1, description="KV block size; small blocks let prefix caching reuse more (CPU default: 32)"
    )
    vllm_single_process: bool | None = Field(
        None, description="CPU: engine core + worker in the worker process (None: on CPU without TP/PP)"
    )
    vllm_cpu_threads: int | None = Field(None, ge=1, description="torch threads of a single-process CPU engine")
    vllm_args: dict[str, object] = Field(
        default_factory=dict, description="extra vllm.LLM keywords as JSON, e.g. '{\"max_num_seqs\": 512}'"
    )

    @field_validator("artifacts_dir", mode="before")
    @classmethod
    def _derive_artifacts(cls, value: Any, info: ValidationInfo) -> Any:
        if value is not None:
            return value
        if "data_dir" not in info.data or "artifacts_root" not in info.data:  # reported by their own errors
            return value
        data_dir, root = Path(info.data["data_dir"]), Path(info.data["artifacts_root"])
        if data_dir.resolve() == DEFAULT_DATA_DIR.resolve():
            return root
        name = dataset_name(data_dir)
        if name in ARTIFACT_KINDS:
            raise ValueError(f"data_dir {data_dir}: a dataset folder may not be named {name!r} (an artifact folder)")
        return root / name

    @property
    def dataset(self) -> str:
        """Label of the selected dataset (the data folder's name), written into every results file."""
        return dataset_name(self.data_dir)

    @property
    def bundled(self) -> bool:
        """The selected dataset is one shipped in the repository (data/beauty, data/industrial)."""
        return any(self.data_dir.resolve() == (ROOT / "data" / n).resolve() for n in BUNDLED_DATASETS)

    def consumed_rule(self) -> ConsumedRule:
        """`exclude_consumed` resolved: a forced value, else the rule recorded for this dataset's artifacts (`auto`),
        else the conservative default (exclude)."""
        if isinstance(self.exclude_consumed, bool):
            return ConsumedRule(self.exclude_consumed, "forced by ONEREC_EXCLUDE_CONSUMED")
        path = self.artifacts_dir / CONSUMED_RULE_FILE
        try:
            doc = json.loads(path.read_text())
            return ConsumedRule(bool(doc["exclude_consumed"]), f"chosen on validation ({path}: {doc['reason']})")
        except FileNotFoundError:
            return ConsumedRule(True, "default, not measured yet (python -m evaluation repeats --record)")
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: unreadable consumed-item rule ({e}); rerun `python -m evaluation repeats "
                             "--record` or set ONEREC_EXCLUDE_CONSUMED=true|false") from None

    def claim_artifacts(self) -> None:
        """Record which data folder owns `artifacts_dir`, and refuse a different folder of the same name.

        Two datasets in folders of the same name (``a/shop``, ``b/shop``) would otherwise share
        ``artifacts/shop`` silently. Called by the commands that write artifacts or results."""
        path = self.artifacts_dir / DATASET_FILE
        mine = str(self.data_dir.resolve())
        try:
            owner = json.loads(path.read_text()).get("data_dir")
        except FileNotFoundError:
            self.artifacts_dir.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"dataset": self.dataset, "data_dir": mine}, indent=2) + "\n")
            return
        except ValueError:
            owner = None  # unreadable: claimed anew below
        if owner is None:
            path.write_text(json.dumps({"dataset": self.dataset, "data_dir": mine}, indent=2) + "\n")
        elif owner is not None and owner != mine:
            raise ValueError(f"artifacts folder {self.artifacts_dir} belongs to the dataset at {owner}, not {mine} "
                             "(two dataset folders of the same name): rename one folder, or give this one its own "
                             "folder with ONEREC_ARTIFACTS_DIR")

    def resolved(self, name: str) -> Path:
        """Path of an artifact folder (`sid`, `onerec`, `think`), honouring explicit overrides."""
        explicit = {"sid": self.sid_dir, "onerec": self.onerec_dir, "think": self.think_dir}[name]
        return explicit if explicit is not None else self.artifacts_dir / name / "current"


def setting_default(name: str) -> Any:
    """The declared default of a `Settings` field: option objects that run without Settings (tests, library
    use) take their defaults from here, so that no default is written twice."""
    return Settings.model_fields[name].default


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Process-wide settings (read once)."""
    return Settings()


def record_consumed_rule(settings: Settings, exclude: bool, reason: str, measured: dict[str, Any],
                         checkpoint: Path) -> Path:
    """Write the consumed-item rule chosen on validation into the dataset's artifacts (`Settings.consumed_rule`
    reads it under ``auto``); `measured`: the numbers it was chosen by, with the OneRec `checkpoint`."""
    settings.claim_artifacts()
    path = settings.artifacts_dir / CONSUMED_RULE_FILE
    doc = {"exclude_consumed": exclude, "reason": reason, "dataset": settings.dataset,
           "checkpoint": str(checkpoint.resolve()), "measured": measured}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(path)
    return path


def claim_or_exit(settings: Settings) -> None:
    """`Settings.claim_artifacts` for a command line: a clash is one line on stderr and exit status 2."""
    try:
        settings.claim_artifacts()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
