"""Reasoning Activation data: pruned-context bootstrapping with a pluggable teacher.

For every training target, the k history items most related to it (cosine similarity of item text
embeddings) form a *pruned context*; a teacher turns (pruned context, target) into a short rationale.
The student is then fine-tuned on the *full, noisy* history -> ``<think> rationale </think>`` -> target
codes (`activation_samples`, format from `model.think.align_data`). `rehearsal_samples` draws sequence texts
in the direct layout (the align stage's ``seq`` task) to mix in, so the item head keeps ranking without reasoning
while the model learns to reason.

Teachers (anything with ``rationales(list[TeacherInput]) -> list[str]``):
- `CategoryTeacher` (default, the paper's choice on public data): a grounded rationale
  (`model.think.grounding`, the format the offline engines decode under with ``grounded_reasoning``) that
  names up to two of the user's related history items by short title, the categories (keywords of each
  level-a cluster, `align_data.category_labels`) of the pruned items, and the target's category.
- `LLMTeacher` over a backend: `OpenAIChatBackend` (any OpenAI-compatible ``/v1/chat/completions``
  endpoint, e.g. ``vllm serve``) or `VLLMBackend` (a local model folder loaded with vLLM).
Only ``Splits.train`` is read, so validation/test targets never reach a rationale.
Not here: training loops, the RL reward (`model.think.enhance`).
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from model.semantic_ids import SemanticIDs
from model.think.align_data import Sample, generation_prefix, seq_samples, think_target
from model.think.grounding import TITLE_WORDS, Grounding
from services.catalog import HISTORY_CAP, Catalog, catalog_hash

_WORD = re.compile(r"[a-z0-9]+")


# --------------------------------------------------------------------------------------------
# item embeddings and pruning


def bow_embeddings(texts: list[str], dim: int = 256) -> np.ndarray:
    """(N, dim) unit-norm hashed bag-of-words vectors: a dependency-free stand-in for tests."""
    out = np.zeros((len(texts), dim), dtype=np.float32)
    for r, t in enumerate(texts):
        for w in _WORD.findall(t.lower()):
            out[r, int(hashlib.md5(w.encode()).hexdigest()[:8], 16) % dim] += 1.0
    norm = np.linalg.norm(out, axis=1, keepdims=True)
    return out / np.maximum(norm, 1e-12)


class ItemEmbeddings:
    """Unit-norm item vectors indexed by item id."""

    def __init__(self, item_ids: Sequence[int], vectors: np.ndarray):
        self.index = {int(i): r for r, i in enumerate(item_ids)}
        self.vectors = vectors.astype(np.float32)

    @classmethod
    def build(cls, catalog: Catalog, method: str = "minilm", cache_dir: Path | None = None) -> ItemEmbeddings:
        """MiniLM title embeddings (cached per catalogue hash under `cache_dir`) or hashed bag of words."""
        texts = [catalog.text(i) for i in catalog.item_ids]
        if method == "bow":
            return cls(catalog.item_ids, bow_embeddings(texts))
        if method != "minilm":
            raise ValueError(f"embedding method must be 'minilm' or 'bow', got {method!r}")
        path = cache_dir / f"item_emb_{catalog_hash(catalog)}.npy" if cache_dir else None
        if path is not None and path.is_file():
            return cls(catalog.item_ids, np.load(path))
        from model.semantic_ids import text_embeddings

        vec = text_embeddings(texts)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path, vec)
        return cls(catalog.item_ids, vec)

    def prune(self, history: Sequence[int], target: int, k: int) -> list[int]:
        """The `k` history items most similar to `target`, in their original (time) order."""
        if len(history) <= k:
            return list(history)
        t = self.vectors[self.index[target]]
        sims = np.array([float(self.vectors[self.index[i]] @ t) for i in history])
        keep = sorted(np.argsort(-sims, kind="stable")[:k].tolist())
        return [history[j] for j in keep]


# --------------------------------------------------------------------------------------------
# teachers


@dataclass(frozen=True)
class TeacherInput:
    pruned: list[int]  # related history items (time order)
    target: int
    history: tuple[int, ...] = ()  # the full (capped) history the prompt shows; () = the pruned items


class Teacher(Protocol):
    def rationales(self, inputs: Sequence[TeacherInput]) -> list[str]: ...


class CategoryTeacher:
    """Grounded template rationale (`Grounding.teach`): related items the user's grammar offers, their
    categories, the target's category; exactly the language the grounded engines decode."""

    def __init__(self, catalog: Catalog, sid: SemanticIDs, labels: dict[int, str], title_words: int = TITLE_WORDS):
        self.grounding = Grounding.build(catalog, sid, labels, words=title_words)

    def rationale(self, x: TeacherInput) -> str:
        return self.grounding.teach(list(x.history) or x.pruned, x.pruned, x.target)

    def rationales(self, inputs: Sequence[TeacherInput]) -> list[str]:
        return [self.rationale(x) for x in inputs]


class ChatBackend(Protocol):
    def complete(self, prompts: Sequence[str], max_tokens: int) -> list[str]: ...


class OpenAIChatBackend:
    """Any OpenAI-compatible chat endpoint (``{base_url}/chat/completions``), one request per prompt."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None, timeout_s: float = 60.0,
                 transport: Any = None):
        import httpx

        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.model = model
        self.client = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout_s,
                                   transport=transport)

    def complete(self, prompts: Sequence[str], max_tokens: int) -> list[str]:
        out = []
        for p in prompts:
            r = self.client.post("/chat/completions", json={
                "model": self.model, "messages": [{"role": "user", "content": p}],
                "max_tokens": max_tokens, "temperature": 0.0})
            r.raise_for_status()
            out.append(str(r.json()["choices"][0]["message"]["content"]))
        return out


class VLLMBackend:
    """A local model folder run by vLLM (CPU or GPU build); prompts use the model's chat template."""

    def __init__(self, model_path: str, **llm_kwargs: Any):
        from vllm import LLM

        self.llm = LLM(model_path, **llm_kwargs)

    def complete(self, prompts: Sequence[str], max_tokens: int) -> list[str]:
        from vllm import SamplingParams

        msgs = [[{"role": "user", "content": p}] for p in prompts]
        outs = self.llm.chat(msgs, SamplingParams(max_tokens=max_tokens, temperature=0.0))  # type: ignore[arg-type]
        return [o.outputs[0].text for o in outs]


LLM_PROMPT = (
    "A shopper bought these related items: {history}. Their next purchase was: {target}.\n"
    "In one short sentence, explain which interests of the shopper lead to the next purchase, "
    "without naming the next product. Answer with the sentence only."
)


class LLMTeacher:
    """Rationales written by an instruction-tuned LLM from the pruned context and the target's title."""

    def __init__(self, catalog: Catalog, backend: ChatBackend, max_tokens: int = 48, max_words: int = 40):
        self.catalog, self.backend, self.max_tokens, self.max_words = catalog, backend, max_tokens, max_words

    def prompt(self, x: TeacherInput) -> str:
        hist = "; ".join(self.catalog.title(i) or "an item" for i in x.pruned) or "nothing yet"
        return LLM_PROMPT.format(history=hist, target=self.catalog.title(x.target) or "an item")

    def rationales(self, inputs: Sequence[TeacherInput]) -> list[str]:
        texts = self.backend.complete([self.prompt(x) for x in inputs], self.max_tokens)
        # one line, no think markers, bounded length: the rationale sits inside <think> ... </think>
        clean = [" ".join(t.replace("<think>", " ").replace("</think>", " ").split()[: self.max_words]) for t in texts]
        return [c or "the user continues the same interests." for c in clean]


def make_teacher(kind: str, catalog: Catalog, sid: SemanticIDs, labels: dict[int, str], endpoint: str | None = None,
                 model: str | None = None, api_key: str | None = None) -> Teacher:
    """``category`` | ``openai`` (needs `endpoint` and `model`) | ``vllm`` (needs `model`, a local folder)."""
    if kind == "category":
        return CategoryTeacher(catalog, sid, labels)
    if kind == "openai":
        if not endpoint or not model:
            raise ValueError("--teacher openai needs --teacher-endpoint and --teacher-model")
        return LLMTeacher(catalog, OpenAIChatBackend(endpoint, model, api_key))
    if kind == "vllm":
        if not model:
            raise ValueError("--teacher vllm needs --teacher-model (a local model folder)")
        return LLMTeacher(catalog, VLLMBackend(model, dtype="auto", enforce_eager=True))
    raise ValueError(f"teacher must be 'category', 'openai' or 'vllm', got {kind!r}")


# --------------------------------------------------------------------------------------------
# samples


def activation_samples(train: dict[int, list[int]], sid: SemanticIDs, teacher: Teacher, emb: ItemEmbeddings,
                       k_prune: int = 3, per_user: int = 2, cap: int = HISTORY_CAP, seed: int = 0,
                       batch: int = 256, item_ids: bool = False) -> list[Sample]:
    """Think-format SFT samples from training parts only: full history -> rationale(pruned) -> target.

    For each user, up to `per_user` target positions are drawn from the training part (the last one
    always included); the history is everything before the target, capped at `cap`.
    """
    if not isinstance(train, dict):
        raise TypeError(f"pass Splits.train (user -> training items), got {type(train).__name__}")
    rng = random.Random(seed)
    cases: list[tuple[list[int], int]] = []
    for user in sorted(train):
        seq = [i for i in train[user] if sid.has_item(i)]
        if len(seq) < 2:
            continue
        positions = list(range(1, len(seq) - 1))
        rng.shuffle(positions)
        for t in [len(seq) - 1] + positions[: per_user - 1]:
            cases.append((seq[:t][-cap:], seq[t]))
    out: list[Sample] = []
    for s in range(0, len(cases), batch):
        part = cases[s : s + batch]
        inputs = [TeacherInput(emb.prune(h, t, k_prune), t, tuple(h)) for h, t in part]
        for (h, t), r in zip(part, teacher.rationales(inputs), strict=True):
            prompt = generation_prefix([sid.codes_of(i) for i in h], item_ids=item_ids)
            out.append(Sample(prompt, think_target(r, sid.codes_of(t)), "think"))
    return out


def rehearsal_samples(train: dict[int, list[int]], sid: SemanticIDs, n_think: int, share: float, seed: int = 0,
                      item_ids: bool = False) -> list[Sample]:
    """Sequence texts (direct layout) to mix with `n_think` reasoning samples so that they are `share` of the mix.

    Drawn without replacement while the training sequences last, then with replacement; `share` in [0, 1).
    """
    if not 0.0 <= share < 1.0:
        raise ValueError(f"rehearsal share must be in [0, 1), got {share}")
    n = round(n_think * share / (1.0 - share))
    pool = seq_samples(train, sid, HISTORY_CAP, item_ids=item_ids) if n else []
    if not pool:
        return []
    rng = random.Random(seed)
    order = rng.sample(range(len(pool)), min(n, len(pool)))
    order += [rng.randrange(len(pool)) for _ in range(n - len(order))]
    return [pool[i] for i in order]


def rl_cases(train: dict[int, list[int]], sid: SemanticIDs, cap: int = HISTORY_CAP) -> list[tuple[list[int], int]]:
    """(history, target) for RL from training parts: the last training item is the target."""
    out = []
    for user in sorted(train):
        seq = [i for i in train[user] if sid.has_item(i)]
        if len(seq) >= 2:
            out.append((seq[:-1][-cap:], seq[-1]))
    return out
