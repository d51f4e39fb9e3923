"""Choosing and building an offline engine: `make_engine` (by kind) and `engine_from_settings` (the one
mapping of `Settings` onto the engines' options; command-line flags arrive as overrides)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from offline_worker.engine_interface import ENGINES, Engine, EngineConfig
from offline_worker.hf_engine import HFEngine
from offline_worker.vllm_engine import VLLMEngine, VLLMOptions
from services.config import Settings


def make_engine(
    kind: str,
    model_dir: Path | str,
    sid_dir: Path | str,
    config: EngineConfig | None = None,
    vllm_options: VLLMOptions | None = None,
    hf_batch_size: int = 32,
) -> Engine:
    """`VLLMEngine` (kind ``vllm``) or `HFEngine` (kind ``hf``)."""
    if kind == "vllm":
        return VLLMEngine(model_dir, sid_dir, config, vllm_options)
    if kind == "hf":
        return HFEngine(model_dir, sid_dir, config, batch_size=hf_batch_size)
    raise ValueError(f"engine: expected one of {ENGINES}, got {kind!r}")


def engine_from_settings(kind: str, model_dir: Path | str, sid_dir: Path | str, settings: Settings,
                         config: dict[str, Any] | None = None, vllm: dict[str, Any] | None = None) -> Engine:
    """The engine `kind` with every option from `settings`; `config` / `vllm` override single fields of
    `EngineConfig` / `VLLMOptions` (command-line flags; None values mean "not given")."""
    cfg = EngineConfig.from_settings(settings, **(config or {}))
    options = VLLMOptions.from_settings(settings, **(vllm or {})) if kind == "vllm" else None
    return make_engine(kind, model_dir, sid_dir, cfg, options, hf_batch_size=settings.hf_batch_size)
