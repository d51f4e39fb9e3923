"""Prompts of the offline worker: a user's history -> the token ids both engines continue from.

The text format belongs to `model.think.align_data` (``generation_prefix``: history items then ``<think>``;
the model writes the rationale, ``</think>``, then ``<|item_begin|>`` and the codes). This module only
caps the history, maps item ids to codes, tokenizes once (so vLLM and HF see identical ids) and
provides the ids that close the reasoning and open the item block. It does not decode or touch Redis.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from model.semantic_ids import ITEM_BEGIN, SemanticIDs, item_id_token
from model.think.align_data import generation_prefix
from model.think.tokens import THINK_END
from services.catalog import HISTORY_CAP


def answer_ids(tokenizer: Any) -> list[int]:
    """Token ids that follow the reasoning: ``</think>`` then ``<|item_begin|>`` (see `think_target`)."""
    ids = tokenizer(THINK_END + ITEM_BEGIN, add_special_tokens=False)["input_ids"]
    vocab = tokenizer.get_vocab()
    if ids != [vocab[THINK_END], vocab[ITEM_BEGIN]]:
        raise ValueError(f"tokenizer splits {THINK_END + ITEM_BEGIN!r} into {ids}; expected the two marker tokens")
    return list(ids)


@dataclass
class PromptBuilder:
    """Builds prompt token ids for users; items without codes are skipped and counted."""

    tokenizer: Any
    sid: SemanticIDs
    history_cap: int = HISTORY_CAP
    skipped_items: int = 0
    empty_users: list[int] = field(default_factory=list)
    item_ids: bool = field(init=False, default=False)  # the model reads item tokens (`TokenMap.has_items`)

    def __post_init__(self) -> None:
        if self.history_cap < 1:
            raise ValueError(f"history_cap: expected >= 1, got {self.history_cap}")
        self.item_ids = len(self.sid) > 0 and item_id_token(self.sid.codes[0]) in self.tokenizer.get_vocab()

    def history_codes(self, history: Sequence[int]) -> list[tuple[int, ...]]:
        """Codes of the last `history_cap` items that have codes (oldest first)."""
        known = [i for i in history if self.sid.has_item(i)]
        self.skipped_items += len(history) - len(known)
        return [self.sid.codes_of(i) for i in known[-self.history_cap :]]

    def text(self, history: Sequence[int]) -> str:
        return generation_prefix(self.history_codes(history), item_ids=self.item_ids)

    def ids(self, history: Sequence[int]) -> list[int]:
        return list(self.tokenizer(self.text(history), add_special_tokens=False)["input_ids"])

    def build(self, users: Iterable[tuple[int, Sequence[int]]]) -> list[tuple[int, list[int]]]:
        """``[(user, prompt ids)]`` in input order. A history with no known item still gets a prompt (an
        empty history, so every selected user gets an entry) and is listed in `empty_users`."""
        out = []
        for user, history in users:
            codes = self.history_codes(history)
            if not codes:
                self.empty_users.append(user)
            text = generation_prefix(codes, item_ids=self.item_ids)
            out.append((user, list(self.tokenizer(text, add_special_tokens=False)["input_ids"])))
        return out
