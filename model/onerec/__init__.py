"""Lightweight OneRec: the online tier's generative recommender (a package: read it in this order).

- `config`: `OneRecConfig` (saved with each checkpoint) and `DeadlineExceeded`;
- `modeling`: the network `OneRecModel`, `build_model`, `save_checkpoint`;
- `serving`: the plain-tensor serving copy of trained weights (`FrozenOneRec`) and the module path;
- `decoding`: `OneRec` (load a checkpoint, `decode_full`, `complete` under cached prefixes, `own_prefixes`)
  and the evaluation harness's `OneRecRecommender`;
- `train`: training and refit (schedule and seeding from `model.training`); `__main__`: ``python -m model.onerec
  train``. Quality is measured by ``python -m evaluation onerec``.
Nothing here reads Redis or HTTP. The names below load on first use (PEP 562), so that ``python -m
model.onerec`` can check the dataset before torch is imported.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from model.onerec.config import DeadlineExceeded, OneRecConfig
    from model.onerec.decoding import OneRec, OneRecRecommender
    from model.onerec.modeling import OneRecModel, build_model, count_params, save_checkpoint

_HOME = {"DeadlineExceeded": "config", "OneRecConfig": "config", "OneRec": "decoding", "OneRecRecommender": "decoding",
         "OneRecModel": "modeling", "build_model": "modeling", "count_params": "modeling",
         "save_checkpoint": "modeling"}


def __getattr__(name: str) -> Any:
    if name in _HOME:
        return getattr(importlib.import_module(f"model.onerec.{_HOME[name]}"), name)
    raise AttributeError(f"module 'model.onerec' has no attribute {name!r}")


__all__ = ["DeadlineExceeded", "OneRec", "OneRecConfig", "OneRecModel", "OneRecRecommender", "build_model",
           "count_params", "save_checkpoint"]
