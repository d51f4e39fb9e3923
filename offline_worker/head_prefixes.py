"""Prefix ranking by the think model's item head, the offline tier's default when the checkpoint has one.

The code beam of `offline_worker.engine_interface` ranks (a, b) by log p(a) + log p(b|a). A checkpoint trained by
`model.think.fit` also carries an item head (`model.think.itemhead`): one score per catalogue item from
the final hidden state at the ``<|item_begin|>`` that opens the answer. Summing the head's probabilities
per (a, b) gives a prefix ranking that cached more test targets than the code beam at P=16 and P=32
(docs/think/prefix_recall_select.json). `HeadPrefixes.top` does that for a batch of contexts: one
forward pass, no level-a / level-b requests; the stored score is the log of the prefix's probability
mass, a log-probability of the prefix like the code beam's.

`EngineConfig.prefix_scores` chooses: ``auto`` (the head when the folder has one, else the code beam),
``item_head`` (required: a folder without a head is an error) or ``codes``. vLLM returns no hidden
states, so the vLLM engine runs this pass on a transformers copy of the (small) model; the HF engine
shares its own. With `EngineConfig.mix_onerec` the head's mass is mixed with the online OneRec's p(a) p(b|a) from
the same history (`mix_with`, `model.think.itemhead.mix_logmass`): the two models miss different users, so the
mixture caches more targets than either (docs/THINK.md section 9). With `EngineConfig.contrast` > 0 the online model
instead moves the ranking away from the prefixes it proposes itself (`model.think.itemhead.rank_with_online`), which the
served completion adds anyway from the fresher history; the stored score stays the head's own log mass
(docs/THINK.md section 12). Not here: the code beam
(`offline_worker.engine_interface`), training the head (`model.think.fit`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from model.semantic_ids import SemanticIDs
from model.think.itemhead import ItemHead, load_head, prefix_groups, prefix_mass, rank_with_online

if TYPE_CHECKING:
    from model.onerec import OneRec

PREFIX_SCORES = ("auto", "codes", "item_head")
Prefix = tuple[int, int, float]  # (a, b, log prefix probability); the engine's Prefix
ItemScore = tuple[int, float]  # (item id, the head's log-probability of the item)


class HeadPrefixes:
    """Top (a, b) prefixes by the item head's probability mass, for contexts ending in ``<|item_begin|>``."""

    def __init__(self, model: Any, head: ItemHead, sid: SemanticIDs, pad_id: int, batch_size: int = 32) -> None:
        self.model = model
        self.head = head.to(model.get_input_embeddings().weight.device)
        self.pad_id = pad_id
        self.batch_size = batch_size
        self.prefixes, self.group = prefix_groups(sid)  # (M, 2) catalogue prefixes, (N,) each item's row
        self.item_ids = np.asarray(sid.item_ids)  # head row -> item id
        self.mix: tuple[OneRec, float] | None = None  # (online model, think weight): `mix_with`
        self.contrast = 0.0  # > 0: the online model is contrasted, not mixed (`mix_with`)

    def mix_with(self, onerec_dir: str | Path, weight: float, sid: SemanticIDs, contrast: float = 0.0) -> None:
        """Rank by `weight` x the head's mass + (1 - `weight`) x the online OneRec at `onerec_dir` (same item codes);
        with `contrast` > 0 by log p_think - `contrast` x log p_online instead (`contrast_rank`)."""
        from model.onerec import OneRec

        if contrast < 0:
            raise ValueError(f"contrast must be >= 0, got {contrast}")
        onerec = OneRec.load(onerec_dir)  # with the codes it was trained on, compared here
        if not np.array_equal(onerec.sid.codes, sid.codes) or not np.array_equal(onerec.sid.item_ids, sid.item_ids):
            raise ValueError(f"mix_onerec {onerec_dir}: its semantic IDs differ from the think model's")
        self.mix, self.contrast = (onerec, weight), float(contrast)

    @classmethod
    def for_engine(cls, mode: str, model_dir: Path, sid: SemanticIDs, pad_id: int, model: Any = None,
                   batch_size: int = 32) -> HeadPrefixes | None:
        """The head ranking `mode` asks for, or None for the code beam; loads a transformers copy of the
        model when `model` is None (the vLLM engine)."""
        if mode not in PREFIX_SCORES:
            raise ValueError(f"prefix_scores: expected one of {PREFIX_SCORES}, got {mode!r}")
        if mode == "codes":
            return None
        from model.think.checkpoint import load_think, load_tokenizer

        _, tm = load_tokenizer(model_dir)
        if not tm.has_items and ItemHead.load(model_dir, sid) is None:
            if mode == "item_head":
                raise ValueError(f"prefix_scores=item_head but {model_dir} has no item head "
                                 "(item tokens or item_head/weight.safetensors); train the align stage with epochs "
                                 "(model.think.fit) or use prefix_scores=codes")
            return None
        if model is None:
            model, _, _ = load_think(model_dir)
        head = load_head(model_dir, sid, model, tm)  # a model with item tokens: its tied rows (`TiedItemHead`)
        assert head is not None
        return cls(model, head, sid, pad_id, batch_size)

    @torch.no_grad()
    def hidden(self, contexts: Sequence[Sequence[int]]) -> torch.Tensor:
        """(B, D) final normed hidden state at each context's last token (left-padded batches)."""
        from model.think.decode import final_hidden

        out: list[torch.Tensor] = [torch.empty(0)] * len(contexts)
        order = sorted(range(len(contexts)), key=lambda i: len(contexts[i]))
        for s in range(0, len(order), self.batch_size):
            rows = order[s : s + self.batch_size]
            h = final_hidden(self.model, [list(contexts[i]) for i in rows], self.pad_id)
            for j, i in enumerate(rows):
                out[i] = h[j]
        return torch.stack(out)

    def scores(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, M) log of the head's probability mass per catalogue prefix (-inf: no mass)."""
        return prefix_mass(self.head.logits(hidden), self.group, len(self.prefixes))

    def top(self, contexts: Sequence[Sequence[int]], m: int,
            histories: Sequence[Sequence[int] | None] | None = None) -> list[list[Prefix]]:
        """Best `m` prefixes per context, best first (`rank` without items)."""
        return self.rank(contexts, m, histories)[0]

    def rank(self, contexts: Sequence[Sequence[int]], m: int,
             histories: Sequence[Sequence[int] | None] | None = None, items: int = 0
             ) -> tuple[list[list[Prefix]], list[list[ItemScore]]]:
        """Best `m` prefixes per context, best first, and the head's own top-`items` items with their
        log-probabilities (the item log-softmax over the catalogue; [] per context when `items` is 0). A ranking
        with the online model (`mix_with`) needs each context's history. The stored prefix score is the ranking's
        log mass (the head's, or the mixture's); the items are always the head's own."""
        if not contexts:
            return [], []
        logits = self.head.logits(self.hidden(contexts))
        sc = prefix_mass(logits, self.group, len(self.prefixes))
        rank = sc
        if self.mix is not None:
            if histories is None or len(histories) != len(contexts) or any(h is None for h in histories):
                raise ValueError("history: the mixed prefix ranking (mix_onerec) needs every request's item history")
            onerec, weight = self.mix
            # think mode has T contexts per user, one history: the online model runs once per distinct history
            slot: dict[tuple[int, ...], int] = {}
            row = [slot.setdefault(tuple(h or ()), len(slot)) for h in histories]
            online = onerec.prefix_logprobs([list(h) for h in slot], self.prefixes)
            rank, sc = rank_with_online(sc, online[torch.as_tensor(row)], weight, self.contrast)
        idx = rank.topk(min(m, sc.shape[1]), dim=1).indices
        val = sc.gather(1, idx)
        prefixes = [[(int(self.prefixes[x][0]), int(self.prefixes[x][1]), float(v))
                     for x, v in zip(ix, vs, strict=True) if np.isfinite(v)]
                    for ix, vs in zip(idx.tolist(), val.tolist(), strict=True)]
        if items <= 0:
            return prefixes, [[] for _ in contexts]
        top_lp, top_ix = torch.log_softmax(logits, -1).topk(min(items, logits.shape[1]), dim=1)
        ids = self.item_ids[top_ix.cpu().numpy()]
        return prefixes, [[(int(i), float(v)) for i, v in zip(ir, vr, strict=True) if np.isfinite(v)]
                          for ir, vr in zip(ids.tolist(), top_lp.tolist(), strict=True)]
