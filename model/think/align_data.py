"""Prompt formats (the one owner) and the training-text builders of Itemic Alignment.

Prompt format (the offline worker imports these):

- ``rec_prompt(history_codes, persona=None)`` is the text the model is conditioned on::

      [persona: <text>\\n]history:<|item_begin|><a_1><b_2><c_3><d_0><|item_end|><|item_begin|>...<|item_end|>

  (no separator after the last item: during alignment the next item follows the history directly).
- ``generation_prefix(history_codes)`` = ``rec_prompt(...) + "<think>"``: exactly the text an engine
  continues from in think mode. The model writes `` <rationale> </think>``, then ``<|item_begin|>``, then
  one code token per level (``<a_*><b_*><c_*><d_*>``) and ``<|item_end|>``. Engines should stop the free
  text at ``</think>`` and force ``<|item_begin|>`` before constrained code decoding.
- ``direct_prefix(history_codes)`` = ``rec_prompt(...) + "<|item_begin|>"``: no reasoning (Base / +IA).
- ``item_ids=True`` (a model with item tokens, ``TokenMap.has_items``): every history block is followed by
  the item's own token ``<i_a_b_c_d>`` (`model.semantic_ids.item_id_token`); the answer block is unchanged.
- ``think_target(rationale, codes)`` = `` <rationale> </think><|item_begin|>...<|item_end|>``.

Alignment tasks (paper section 3.2), each a list of `Sample` (prompt without loss, target with loss):
interleaved user persona grounding, sequential preference modelling, itemic dense captioning and
general language modelling. Builders that read interactions take ``Splits.train`` (the training part
of every sequence) and nothing else, so no validation/test target can reach a training text.
Captioning reads the catalogue only (item side information, no interactions).
Not here: rationales (`model.think.activate_data`), training loops (`model.think.stages`).
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from model.semantic_ids import ITEM_BEGIN, SemanticIDs, item_id_token, item_string
from model.think.tokens import THINK_BEGIN, THINK_END
from services.catalog import HISTORY_CAP, Catalog

Codes = tuple[int, ...]
HISTORY_TAG = "history:"
PERSONA_TAG = "persona:"


# --------------------------------------------------------------------------------------------
# prompt format


def items_text(history_codes: Iterable[Sequence[int]], item_ids: bool = False) -> str:
    """History items as item blocks; with `item_ids` (a model with item tokens, `TokenMap.has_items`) each
    block is followed by the item's own token: ``<|item_begin|>...<|item_end|><i_a_b_c_d>``."""
    if item_ids:
        return "".join(item_string(tuple(c)) + item_id_token(tuple(c)) for c in history_codes)
    return "".join(item_string(tuple(c)) for c in history_codes)


def rec_prompt(history_codes: Sequence[Sequence[int]], persona: str | None = None, item_ids: bool = False) -> str:
    """Text the model is conditioned on for recommendation (history oldest first, already capped)."""
    head = f"{PERSONA_TAG} {persona.strip()}\n" if persona else ""
    return head + HISTORY_TAG + items_text(history_codes, item_ids)


def generation_prefix(history_codes: Sequence[Sequence[int]], persona: str | None = None,
                      item_ids: bool = False) -> str:
    """Think mode: the engine continues from here with `` rationale </think>``, then the item block."""
    return rec_prompt(history_codes, persona, item_ids) + THINK_BEGIN


def direct_prefix(history_codes: Sequence[Sequence[int]], persona: str | None = None, item_ids: bool = False) -> str:
    """No-reasoning mode: the next tokens are the target's codes."""
    return rec_prompt(history_codes, persona, item_ids) + ITEM_BEGIN


def think_target(rationale: str, target_codes: Sequence[int]) -> str:
    """What follows `generation_prefix`: rationale, ``</think>``, then the item block."""
    return f" {rationale.strip()} {THINK_END}{item_string(tuple(target_codes))}"


# --------------------------------------------------------------------------------------------
# readable category labels: keywords of each level-a cluster

STOPWORDS = frozenset(
    "a an and the of for with in on to by from or at as is it its this that oz ml fl pack set count pcs piece "
    "pieces inch inches new size one two 1 2 3 4 5 6 8 10 12 x & - / + ounce ounces g mm lb".split()
)
_WORD = re.compile(r"[a-z][a-z'-]{2,}")


def category_labels(catalog: Catalog, sid: SemanticIDs, words: int = 2) -> dict[int, str]:
    """Level-a code -> label of its `words` most distinctive title keywords (tf-idf over clusters)."""
    per: dict[int, Counter[str]] = {}
    for item in catalog.item_ids:
        if not sid.has_item(item):
            continue
        a = sid.codes_of(item)[0]
        toks = {w for w in _WORD.findall(catalog.title(item).lower()) if w not in STOPWORDS}
        per.setdefault(a, Counter()).update(toks)
    df: Counter[str] = Counter()
    for cnt in per.values():
        df.update(cnt.keys())
    n = max(len(per), 1)
    labels: dict[int, str] = {}
    for a, cnt in per.items():
        scored = sorted(cnt.items(), key=lambda kv: (-kv[1] * math.log(1 + n / df[kv[0]]), kv[0]))
        top = [w for w, _ in scored[:words]]
        labels[a] = " ".join(top) if top else f"group {a}"
    return labels


def label_of(labels: dict[int, str], codes: Sequence[int]) -> str:
    return labels.get(int(codes[0]), f"group {int(codes[0])}")


# --------------------------------------------------------------------------------------------
# samples


@dataclass(frozen=True)
class Sample:
    """One training text: ``prompt`` is context (no loss), ``target`` carries the loss."""

    prompt: str
    target: str
    task: str


def _check_train(train: dict[int, list[int]]) -> None:
    if not isinstance(train, dict):
        raise TypeError(f"pass Splits.train (user -> training items), got {type(train).__name__}")


def seq_samples(train: dict[int, list[int]], sid: SemanticIDs, cap: int = HISTORY_CAP,
                item_ids: bool = False) -> list[Sample]:
    """Sequential preference modelling: every training sequence as one text, chunked to cap+1 items.

    The loss on each item given the items before it covers every sliding-window target at once, in
    the same layout as `direct_prefix` (the next item follows the history directly).
    """
    _check_train(train)
    out: list[Sample] = []
    for user in sorted(train):
        seq = [i for i in train[user] if sid.has_item(i)]
        for s in range(0, max(len(seq) - 1, 1), cap):
            chunk = seq[s : s + cap + 1]
            if len(chunk) >= 2:
                out.append(Sample(HISTORY_TAG, items_text((sid.codes_of(i) for i in chunk), item_ids), "seq"))
    return out


def persona_text(items: Sequence[int], catalog: Catalog, sid: SemanticIDs, labels: dict[int, str],
                 max_items: int = 8) -> tuple[str, str]:
    """(persona summary, interleaved item/title list) from the given (training) items only."""
    cats = Counter(label_of(labels, sid.codes_of(i)) for i in items)
    summary = "likes " + ", ".join(c for c, _ in cats.most_common(3))
    recent = items[-max_items:]
    inter = "; ".join(f"{sid.item_string(i)} {catalog.title(i) or 'item'}" for i in recent)
    return summary, inter


def persona_samples(train: dict[int, list[int]], catalog: Catalog, sid: SemanticIDs, labels: dict[int, str],
                    max_items: int = 8) -> list[Sample]:
    """Interleaved user persona grounding: a persona summary with items and their titles interleaved."""
    _check_train(train)
    out: list[Sample] = []
    for user in sorted(train):
        items = [i for i in train[user] if sid.has_item(i)]
        if not items:
            continue
        summary, inter = persona_text(items, catalog, sid, labels, max_items)
        out.append(Sample(f"{PERSONA_TAG} {summary}.", f" bought: {inter}.", "persona"))
    return out


def caption_samples(catalog: Catalog, sid: SemanticIDs, labels: dict[int, str] | None = None) -> list[Sample]:
    """Itemic dense captioning, both directions (codes -> title + category, title -> codes)."""
    out: list[Sample] = []
    for item in catalog.item_ids:
        if not sid.has_item(item):
            continue
        title = catalog.title(item) or "untitled item"
        s = sid.item_string(item)
        cat = f" ({label_of(labels, sid.codes_of(item))})" if labels else ""
        out.append(Sample(f"item:{s} title:", f" {title}{cat}", "caption"))
        out.append(Sample(f"title: {title} item:", s, "caption"))
    return out


def lm_samples(lines: Iterable[str], max_chars: int = 400) -> list[Sample]:
    """General language modelling: plain text lines (long lines cut at `max_chars`)."""
    out = []
    for line in lines:
        line = " ".join(line.split())
        for s in range(0, len(line), max_chars):
            if line[s : s + max_chars].strip():
                out.append(Sample("", line[s : s + max_chars], "lm"))
    return out


def default_lm_corpus(catalog: Catalog, labels: dict[int, str]) -> list[str]:
    """Default general-language text: catalogue titles and category labels as short sentences.

    A from-scratch base has no general ability to preserve; this keeps it fluent in the words the
    rationales use. With a real base model pass any text file instead (``--lm-corpus``).
    """
    lines = [f"{catalog.title(i)}." for i in catalog.item_ids if catalog.title(i)]
    lines += [f"the {lab} category." for lab in labels.values()]
    return lines


def mix(groups: dict[str, list[Sample]], weights: dict[str, float], n: int, seed: int = 0) -> list[Sample]:
    """`n` samples drawn from the task groups in proportion to `weights` (with replacement past one pass)."""
    rng = random.Random(seed)
    keys = [k for k in groups if groups[k] and weights.get(k, 0) > 0]
    if not keys:
        raise ValueError(f"no samples for tasks {sorted(weights)}")
    total = sum(weights[k] for k in keys)
    out: list[Sample] = []
    for k in keys:
        want = round(n * weights[k] / total)
        pool = groups[k][:]
        while want > 0:
            rng.shuffle(pool)
            out.extend(pool[:want])
            want -= len(pool[:want])
    rng.shuffle(out)
    return out
