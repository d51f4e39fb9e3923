"""`TrieLogitsProcessor`: vLLM's V1 logits-processor adapter over `CodeTrie.allowed_next`.

vLLM's engine-core subprocess imports it by name (`TRIE_PROCESSOR_FQCN`); it is built lazily, so that
importing this module does not import vLLM. A request opts in through ``SamplingParams.extra_args``.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from functools import lru_cache
from typing import Any

from model.semantic_ids import SemanticIDs
from model.trie import CodeTrie, EmptyAllowedSetError, TokenMap


@lru_cache(maxsize=4)
def _load_trie(sid_dir: str) -> CodeTrie:
    sid = SemanticIDs.load(sid_dir)
    return CodeTrie(sid.codes, sid.item_ids, sid.codebook_size)


def _trie_processor_class() -> type:
    """Build `TrieLogitsProcessor` lazily so importing this module does not import vLLM."""
    import torch
    from vllm.v1.sample.logits_processor import AdapterLogitsProcessor

    class _TrieLogitsProcessor(AdapterLogitsProcessor):  # type: ignore[misc]
        """vLLM V1 logits processor: inside an item block only trie paths (thin adapter over the trie).

        A request opts in with ``SamplingParams.extra_args["onerec_trie"] = {"sid_dir", "offset",
        "num_levels", "codebook_size", "item_end", "prefix"}``: its next code token must follow
        ``prefix`` + the codes it has generated so far. No opt-in, no effect.
        """

        def is_argmax_invariant(self) -> bool:
            return False  # it changes which token wins

        def new_req_logits_processor(self, params: Any) -> Callable[[list[int], Any], Any] | None:
            spec = (params.extra_args or {}).get("onerec_trie")
            if not spec:
                return None
            trie = _load_trie(str(spec["sid_dir"]))
            tokmap = TokenMap(int(spec["offset"]), int(spec["num_levels"]), int(spec["codebook_size"]),
                              item_end=spec.get("item_end"))  # fmt: skip
            base = [int(c) for c in spec.get("prefix", [])]

            def apply(output_ids: list[int], logits: Any) -> Any:
                prefix = base + [tokmap.level_code(t)[1] for t in output_ids if tokmap.is_code(t)]
                if len(prefix) >= tokmap.num_levels:
                    if tokmap.item_end is None:
                        raise EmptyAllowedSetError(f"full code {prefix} and no item_end id to allow")
                    allowed = [int(tokmap.item_end)]
                else:
                    allowed = tokmap.allowed_token_ids(trie, prefix)  # raises on an empty set
                bias = torch.full_like(logits, -math.inf)
                bias[torch.tensor(allowed, dtype=torch.long, device=logits.device)] = 0.0
                return logits + bias

            return apply

    _TrieLogitsProcessor.__name__ = _TrieLogitsProcessor.__qualname__ = "TrieLogitsProcessor"
    _TrieLogitsProcessor.__module__ = __name__
    return _TrieLogitsProcessor


def __getattr__(name: str) -> Any:
    # `TRIE_PROCESSOR_FQCN` (this module's TrieLogitsProcessor) is what vLLM's engine-core subprocess imports
    if name == "TrieLogitsProcessor":
        cls = _trie_processor_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


TRIE_PROCESSOR_FQCN = f"{__name__}:TrieLogitsProcessor"
