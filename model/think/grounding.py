"""Grounded rationales: the one owner of their text format, the per-user grammar and the parser.

A grounded rationale names only the user's own history items (by a short title form), the
catalogue's category labels (`model.think.align_data.category_labels`) and a fixed set of connectives::

    recently "nail polish coral" and "face cream spf". likes nail polish and face cream. next: face cream.

- `Grounding.grammar(history)` is that user's grammar (EBNF in the GBNF dialect that xgrammar and
  vLLM's ``StructuredOutputsParams(grammar=...)`` read): its item alternatives are the user's recent
  history items only and its "likes" categories those of the user's last `RECENT` items, so a decoder
  under it cannot invent a product or a taste, nor cite one the user left long ago; "next" (the
  prediction) is any catalogue category; an item or a category is never named twice.
  `Grounding.longest(history)` bounds its length (the engines' reasoning budget under it). The engines
  stop the text with a stop token once the grammar is complete, then write ``</think>``
  (`offline_worker.engine_interface`).
- `Grounding.rationale(...)` writes the same format for the activation stage's teacher
  (`model.think.activate_data.CategoryTeacher`), so the model is trained on what it will decode.
- `parse` reads a stored rationale back (item mentions, liked categories, next category); the grounding
  report (``python -m evaluation reasoning``) and the web page use it.

Item mentions are double-quoted so that they parse back unambiguously; short titles are lower-case
words of ``[a-z0-9]`` only (no quote can appear inside one). Not here: decoding (the engines), the
report (`evaluation.reasoning`).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from model.semantic_ids import SemanticIDs
from model.think.align_data import category_labels, label_of
from services.catalog import HISTORY_CAP, Catalog

RECENTLY, AND, LIKES, NEXT, END = "recently ", " and ", ". likes ", ". next: ", "."  # the connectives
TITLE_WORDS = 4  # words of a short title: concrete, but short (reasoning length costs decode time)
MAX_ITEMS = 12  # the most recent distinct history items a user's grammar offers
RECENT = 5  # "recent history": "likes" names only categories of the user's last RECENT coded items
_WORD = re.compile(r"[a-z0-9]+")
_MENTION = re.compile(r'"([^"]*)"')
_FORMAT = re.compile(r'^(?:recently (?P<items>.*?)\. )?(?:likes (?P<likes>.*?)\. )?next: (?P<next>.*?)\.$')


def short_title(title: str, words: int = TITLE_WORDS) -> str:
    """First `words` lower-case ``[a-z0-9]`` words of a title ("" for a title without any)."""
    return " ".join(_WORD.findall(title.lower())[:words])


def _quote(text: str) -> str:
    """An EBNF string literal (the pieces are ``[a-z0-9 '-]`` text, so only quotes need care)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _one_or_two(pieces: Sequence[str]) -> str:
    """EBNF body: one of `pieces`, optionally `AND` a different one (never the same piece twice)."""
    alt = {p: _quote(p) for p in pieces}
    return " | ".join(alt[p] + (f" ({_quote(AND)} ({' | '.join(alt[o] for o in pieces if o != p)}))?"
                                if len(pieces) > 1 else "") for p in pieces)  # fmt: skip


def _two_longest(pieces: Sequence[str]) -> list[str]:
    """The (at most) two longest different pieces in UTF-8 bytes: the longest ``x[ and y]`` `_one_or_two` allows."""
    return sorted(set(pieces), key=lambda x: -len(x.encode()))[:2]


@dataclass(frozen=True)
class Rationale:
    """A rationale read back by `parse`; ``well_formed`` is False for free text (then only mentions count)."""

    mentions: list[str]  # quoted item mentions, in order
    likes: list[str]  # liked categories
    next: str  # the announced next category ("" if none)
    well_formed: bool


def parse(text: str) -> Rationale:
    """Mentions, categories and the next category of a rationale (any text: unknown parts are empty)."""
    text = text.strip()
    mentions = _MENTION.findall(text)
    m = _FORMAT.match(text)
    if m is None:
        return Rationale(mentions, [], "", False)
    likes = [c for c in (m.group("likes") or "").split(AND) if c]
    return Rationale(mentions, likes, m.group("next"), True)


@dataclass
class Grounding:
    """Short titles and category labels of one catalogue + semantic IDs; builds grammars and rationales."""

    sid: SemanticIDs
    titles: dict[int, str]  # item id -> short title (items with codes and a non-empty short title)
    labels: dict[int, str]  # level-a code -> category label
    max_items: int = MAX_ITEMS
    by_title: dict[str, set[int]] = field(init=False, default_factory=dict)
    _categories: list[str] = field(init=False, default_factory=list)  # sorted once: every user's grammar names them

    def __post_init__(self) -> None:
        if self.max_items < 1:
            raise ValueError(f"max_items: expected >= 1, got {self.max_items}")
        self._categories = sorted(set(self.labels.values()))
        for item, t in self.titles.items():
            self.by_title.setdefault(t, set()).add(item)

    @classmethod
    def build(cls, catalog: Catalog, sid: SemanticIDs, labels: dict[int, str] | None = None,
              words: int = TITLE_WORDS, max_items: int = MAX_ITEMS) -> Grounding:
        titles = {i: short_title(catalog.title(i), words) for i in catalog.item_ids if sid.has_item(i)}
        return cls(sid, {i: t for i, t in titles.items() if t}, labels or category_labels(catalog, sid),
                   max_items)

    # ---- pieces
    def category(self, item: int) -> str:
        return label_of(self.labels, self.sid.codes_of(item))

    def categories(self) -> list[str]:
        """Every category label of the catalogue, sorted (the grammar's category alternatives)."""
        return list(self._categories)

    def recent(self, history: Sequence[int]) -> list[int]:
        """The last `max_items` distinct history items that have a short title, most recent first."""
        out: list[int] = []
        seen: set[str] = set()
        for i in reversed(history):
            t = self.titles.get(i)
            if t and t not in seen:
                seen.add(t)
                out.append(i)
                if len(out) == self.max_items:
                    break
        return out

    # ---- the format
    def _pieces(self, history: Sequence[int]) -> tuple[list[str], list[str]]:
        """(the user's item alternatives: recent titled history items, sorted; the user's categories: those of
        the last `RECENT` coded history items, sorted)."""
        items = sorted({self.titles[i] for i in self.recent(history)})
        return items, sorted({self.category(i) for i in self.recent_coded(history)})

    def recent_coded(self, history: Sequence[int]) -> list[int]:
        """The user's last `RECENT` history items that have codes (within the prompt's `HISTORY_CAP`)."""
        return [i for i in history[-HISTORY_CAP:] if self.sid.has_item(i)][-RECENT:]

    def bounded(self, history: Sequence[int]) -> tuple[str, int]:
        """(`grammar(history)`, its reasoning budget: bytes of `longest(history)` + 1 for the stop token), from one
        pass over the user's pieces (the refresh calls this once per user)."""
        pieces = self._pieces(history)
        return self._grammar(*pieces), len(self._longest(*pieces).encode()) + 1

    def grammar(self, history: Sequence[int]) -> str:
        """The user's grammar: ``recently <item>[ and <item>]. likes <mine>[ and <mine>]. next: <cat>.`` (the two
        items, and the two categories, different)
        with <item> one of the user's recent history items, <mine> a category of the user's last `RECENT`
        coded items and <cat> any catalogue category (the prediction).
        Without a titled history item, only ``likes <mine>[ and <mine>]. next: <cat>.``; without any coded
        history item (nothing known about the user), only ``next: <cat>.``."""
        return self._grammar(*self._pieces(history))

    def _grammar(self, items: list[str], mine: list[str]) -> str:
        cats = "cat ::= " + " | ".join(_quote(c) for c in self._categories)
        if not mine:
            return f"root ::= {_quote(NEXT[2:])} cat {_quote(END)}\n{cats}"
        tail = f"mine {_quote(NEXT)} cat {_quote(END)}"
        rules = [f"root ::= {_quote(LIKES[2:])} {tail}"]
        if items:
            rules = [f"root ::= {_quote(RECENTLY)} items {_quote(LIKES)} {tail}",
                     "items ::= " + _one_or_two([f'"{t}"' for t in items])]
        return "\n".join([*rules, "mine ::= " + _one_or_two(mine), cats])

    def longest(self, history: Sequence[int]) -> str:
        """The longest (in UTF-8 bytes) rationale `grammar(history)` derives. A byte-level BPE spells any text
        in at most its byte count of tokens, so a reasoning budget of ``len(longest(h).encode()) + 1`` (the
        stop token) lets every decode under the grammar complete, however the model splits the words."""
        return self._longest(*self._pieces(history))

    def _longest(self, items: list[str], mine: list[str]) -> str:
        def big(xs: Sequence[str]) -> str:
            return max(xs, key=lambda x: len(x.encode()))

        nxt = f"{NEXT[2:]}{big(self._categories)}{END}"
        if not mine:
            return nxt
        body = f"{LIKES[2:]}{AND.join(_two_longest(mine))}. {nxt}"
        if not items:
            return body
        return RECENTLY + AND.join(f'"{t}"' for t in _two_longest(items)) + f". {body}"

    def rationale(self, named: Sequence[int], likes: Sequence[str], next_category: str) -> str:
        """A rationale in the grammar's format: 0-2 named items (0: the category-only form), 1-2 liked
        categories, the next category."""
        names = [self.titles[i] for i in named if i in self.titles][:2]
        if not likes:
            if names:
                raise ValueError("likes: a rationale that names items needs at least one of their categories")
            return f"{NEXT[2:]}{next_category}{END}"
        body = f"{LIKES[2:]}{AND.join(list(likes)[:2])}{NEXT}{next_category}{END}"
        quoted = [f'"{t}"' for t in names]
        return f"{RECENTLY}{AND.join(quoted)}. {body}" if names else body

    def teach(self, history: Sequence[int], pruned: Sequence[int], target: int) -> str:
        """The teacher's rationale for (history, its items related to the target, target): up to two related
        items among those the user's grammar offers (else the most recent one), the two most common categories
        of the related items among the recent ones the grammar offers (else of the recent items), the target's
        category; without a titled item, the category-only form."""
        offered = self.recent(history)
        named = [i for i in offered if i in set(pruned)][:2] or offered[:1]
        recent = [self.category(i) for i in self.recent_coded(history)]
        related = Counter(c for c in (self.category(i) for i in pruned if self.sid.has_item(i)) if c in set(recent))
        cats = related or Counter(recent)
        return self.rationale(named, [c for c, _ in cats.most_common(2)], self.category(target))

    def grounded_items(self, text: str, history: Sequence[int]) -> tuple[list[set[int]], bool]:
        """(items each mention can denote, every mention names an item of `history`)."""
        mine = {self.titles[i] for i in history if i in self.titles}
        mentions = parse(text).mentions
        return [self.by_title.get(m, set()) for m in mentions], all(m in mine for m in mentions)


def accepts(grammar: str, text: str) -> bool:
    """Whether `grammar` derives exactly `text` (xgrammar, the library vLLM uses; character level)."""
    import xgrammar as xgr

    compiled = xgr.GrammarCompiler(xgr.TokenizerInfo([])).compile_grammar(grammar)
    matcher = xgr.GrammarMatcher(compiled, terminate_without_stop_token=True)
    return bool(matcher.accept_string(text)) and matcher.is_completed()
