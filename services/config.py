"""One pydantic-settings `Settings` object for every service (env prefix ``ONEREC_``).

This is the only place where runtime configuration of the online API, the offline worker and the
stack is defined. Model hyper-parameters live in the dataclass configs beside each model instead.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

ROOT = Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    """Runtime settings; every field can be set as ``ONEREC_<FIELD>`` in the environment or `.env`."""

    model_config = SettingsConfigDict(env_prefix="ONEREC_", env_file=".env", extra="ignore")

    # data and artifacts
    data_dir: Path = Field(ROOT / "data" / "beauty", description="dataset folder (sequences.txt, items.tsv)")
    artifacts_dir: Path = Field(ROOT / "artifacts", description="root of built artifacts")
    sid_dir: Path | None = Field(None, description="semantic-ID folder; default: artifacts_dir/sid/current")
    onerec_dir: Path | None = Field(None, description="OneRec checkpoint; default: artifacts_dir/onerec/current")
    think_dir: Path | None = Field(None, description="OneRec-Think HF folder; default: artifacts_dir/think/current")

    # redis
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Redis URL")
    namespace: str = Field("onerec", description="key namespace (prefix of every key)")
    redis_timeout_ms: int = Field(50, ge=1, description="socket/connect timeout of the online Redis pool")
    think_ttl_s: int = Field(7 * 24 * 3600, ge=60, description="TTL of a think-ahead version's values")
    history_max: int = Field(50, ge=1, le=1000, description="bounded per-user history length")

    # online api
    default_budget_ms: float = Field(50.0, gt=0, description="default per-request latency budget")
    max_k: int = Field(100, ge=1, description="largest k a client may ask for")
    default_k: int = Field(10, ge=1)
    exclude_consumed: bool = Field(True, description="drop items already in the user's history")
    beam: int = Field(10, ge=1, description="beam width of online decoding")
    batch_max: int = Field(16, ge=1, description="micro-batch size of the model thread")
    batch_wait_ms: float = Field(1.0, ge=0, description="how long the model thread waits to fill a batch")
    torch_threads: int = Field(1, ge=1, description="torch intra-op threads of the online model")
    api_key: str | None = Field(None, description="if set, requests need header X-API-Key")

    # offline worker
    engine: str = Field("vllm", pattern="^(vllm|hf)$", description="offline engine")
    reasoning_samples: int = Field(2, ge=1, description="T reasoning paths per user")
    prefixes_per_sample: int = Field(16, ge=1, description="m prefixes kept per reasoning path")
    max_reasoning_tokens: int = Field(48, ge=1)
    refresh_chunk: int = Field(256, ge=1, description="users per engine call")

    def resolved(self, name: str) -> Path:
        """Path of an artifact folder (`sid`, `onerec`, `think`), honouring explicit overrides."""
        explicit = {"sid": self.sid_dir, "onerec": self.onerec_dir, "think": self.think_dir}[name]
        return explicit if explicit is not None else self.artifacts_dir / name / "current"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Process-wide settings (read once)."""
    return Settings()
