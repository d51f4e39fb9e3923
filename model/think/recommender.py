"""OneRec-Think as a recommender: `ThinkRecommender` implements the `model.metrics.Recommender` protocol.

Per batch of users (sorted by history length so padding stays small) it prefills the prompt, writes the
reasoning greedily (think mode), forces ``</think><|item_begin|>`` and runs a trie-constrained beam (width
>= k) over all codes with a KV cache. ``direct`` mode skips the reasoning (the Base and +IA rows of the
ablation). `ThinkRecommender.top_prefixes` gives the model's top (a, b) prefixes per user (what prefix
recall measures). The OneRec counterpart is `model.onerec.OneRecRecommender`.
Not here: the evaluation commands (`evaluation.think`, `evaluation.prefix_recall`), the metrics
(`model.metrics`), training, the offline worker's vLLM engine.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from model.metrics import PrefixCodes
from model.semantic_ids import SemanticIDs
from model.think.align_data import direct_prefix, generation_prefix
from model.think.checkpoint import chosen_mode, load_think, read_itemic
from model.think.decode import Decoder
from model.trie import CodeTrie, TokenMap
from services.catalog import Example


class ThinkRecommender:
    """OneRec-Think as a `Recommender`: reasoning (optional) then constrained beam over all codes."""

    def __init__(self, model: Any, tokenizer: Any, tokmap: TokenMap, sid: SemanticIDs, beam: int = 10,
                 think: bool = True, max_think: int = 32, batch_size: int = 64, max_len: int = 320,
                 item_head: Any = None, bf16: bool = False, code_weight: float | None = None):
        if beam < 1:
            raise ValueError(f"beam must be >= 1, got {beam}")
        self.sid = sid
        self.trie = CodeTrie(sid.codes, sid.item_ids, sid.codebook_size)
        self.decoder = Decoder(model, tokenizer, tokmap, self.trie, item_head=item_head)
        self.beam, self.think, self.max_think = beam, think, max_think
        self.batch_size, self.max_len = batch_size, max_len
        self.bf16 = bf16  # bf16 autocast on CPU while decoding (scores in float32)
        # with an item head: None = re-rank the code beam's leaves; a number = rank the head's top-`beam`
        # items over the whole catalogue by item log-prob + code_weight * code log-prob
        self.code_weight = code_weight
        self.reasoning: dict[int, str] = {}  # user -> last reasoning text written for them

    @classmethod
    def load(cls, folder: Path | str, beam: int = 10, think: bool | None = None, sid_dir: Path | None = None,
             device: str | None = None, item_weight: float | None = None, **kw: Any) -> ThinkRecommender:
        """From an HF folder written by `model.think.stages`; `think=None` serves the mode chosen on validation for
        these weights (`model.think.checkpoint.chosen_mode`) when one is recorded, else follows the last stage.

        The folder's item head (``item_head/weight.safetensors``), if any, re-ranks the beam's leaves with its
        saved weight; `item_weight` overrides it (0 = codes only).
        """
        from model.think.itemhead import load_head

        folder = Path(folder)
        model, tok, tm = load_think(folder)
        if device:
            model = model.to(device)
        meta = read_itemic(folder)
        if sid_dir is None:
            if (folder / "sid" / "codes.tsv").is_file():
                sid_dir = folder / "sid"
            else:
                from services.config import get_settings

                sid_dir = get_settings().resolved("sid")
        sid = SemanticIDs.load(sid_dir)
        head = load_head(folder, sid, model, tm)
        if head is not None and item_weight is not None:
            head.cfg.score_weight = item_weight
        if head is not None and head.cfg.score_weight == 0:
            head = None
        if think is None:
            chosen = chosen_mode(meta)
            think = bool(meta.get("think", False)) if chosen is None else chosen == "think"
        return cls(model, tok, tm, sid, beam, think, item_head=head, **kw)

    def prefix(self, history: Sequence[int], think: bool | None = None) -> str:
        """The prompt for `history`: the think-mode one or the direct one (`think`, default: this recommender's)."""
        codes = [self.sid.codes_of(i) for i in history if self.sid.has_item(i)]
        items = self.decoder.tm.has_items
        think = self.think if think is None else think
        return generation_prefix(codes, item_ids=items) if think else direct_prefix(codes, item_ids=items)

    def recommend(self, examples: Sequence[Example], k: int) -> list[list[int]]:
        if k > self.beam:
            raise ValueError(f"k={k} is larger than the beam width {self.beam}")
        order = sorted(range(len(examples)), key=lambda i: len(examples[i].history))
        out: list[list[int]] = [[] for _ in examples]
        for s in range(0, len(order), self.batch_size):
            chunk = order[s : s + self.batch_size]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
                beams, texts = self.decoder.recommend([self.prefix(examples[i].history) for i in chunk], self.beam,
                                                      self.think, self.max_think, self.max_len,
                                                      code_weight=self.code_weight)
            for j, i in enumerate(chunk):
                out[i] = beams.items[j][:k]
                if self.think:
                    self.reasoning[examples[i].user_id] = texts[j]
        return out

    @torch.no_grad()
    @torch.no_grad()
    def prefix_logmass(self, histories: Sequence[Sequence[int]]) -> tuple[Any, torch.Tensor]:
        """The item head's log probability mass per catalogue (a, b) prefix: (prefixes (M, 2), scores (B, M)),
        direct prompt (no reasoning), users in the given order. Needs a folder with an item head."""
        from model.think.itemhead import prefix_groups, prefix_mass

        dec = self.decoder
        if dec.item_head is None:
            raise ValueError("prefix_logmass needs an item head (the folder has none)")
        pref, group = prefix_groups(self.sid)
        out = torch.empty(len(histories), len(pref))
        order = sorted(range(len(histories)), key=lambda i: len(histories[i]))
        for s in range(0, len(order), self.batch_size):
            chunk = order[s : s + self.batch_size]
            b = dec.prefill(dec.encode_prefixes([self.prefix(histories[j], think=False) for j in chunk], self.max_len))
            assert b.hidden is not None
            out[chunk] = prefix_mass(dec.item_head.logits(b.hidden), group, len(pref))
        return pref, out

    def top_prefixes(self, histories: Sequence[Sequence[int]], p_max: int, batch_size: int = 64
                     ) -> dict[str, list[list[PrefixCodes]]]:
        """Top-`p_max` (a, b) per user, best first (what the offline tier would cache; prefix recall measures
        it): ``codes`` (two-level constrained beam, log p(a) + log p(b|a)) and, when the folder has an item
        head, ``item_head`` (log of the head's probability mass per prefix)."""
        from model.think.itemhead import prefix_scores

        dec = self.decoder
        out: dict[str, list[list[PrefixCodes]]] = {"codes": [[] for _ in histories]}
        if dec.item_head is not None:
            out["item_head"] = [[] for _ in histories]
        order = sorted(range(len(histories)), key=lambda i: len(histories[i]))
        for s in range(0, len(order), batch_size):
            chunk = order[s : s + batch_size]
            b = dec.prefill(dec.encode_prefixes([self.prefix(histories[i]) for i in chunk], self.max_len))
            if self.think:
                dec.reason(b, self.max_think)
                dec.close_think(b)
            hidden = b.hidden
            beams = dec.beam_codes(b, p_max, levels=2)
            for j, i in enumerate(chunk):
                out["codes"][i] = [(int(c[0]), int(c[1])) for c, sc in zip(beams.codes[j], beams.scores[j], strict=True)
                                   if math.isfinite(float(sc))]
            if dec.item_head is not None and hidden is not None:
                pref, sc = prefix_scores(dec.item_head.logits(hidden), self.sid)
                top = sc.topk(min(p_max, sc.shape[1]), dim=1).indices.tolist()
                for j, i in enumerate(chunk):
                    out["item_head"][i] = [(int(pref[x][0]), int(pref[x][1])) for x in top[j]]
        return out
