"""Item-level head of OneRec-Think: a next-item softmax over the catalogue at the answer position.

The LLM predicts an item code by code; this head scores whole items from the final hidden state at
the ``<|item_begin|>`` that opens the answer (the position whose LM logits predict level a):

    item_logit(h, i) = h . E[i]          E (N, D), one row per catalogue item (SID order)

`E` starts from the sum of the item's code-token embeddings (tied to the LM's table at init), so a
fresh head already ranks items like a crude code model. It is trained with the sequence task (a
cross-entropy over all N items at every ``<|item_begin|>`` of a training text, weight
``ItemHeadConfig.loss_weight``) and at decoding time re-ranks the leaves of the code beam:
``score = sum of code log-probs + weight * item_logit`` (`rerank`), the rule that took the online
OneRec from .0550 to .0837. `prefix_scores` sums the head's probabilities per (a, b) prefix, which the
offline tier can mix into its prefix ranking.

Storage: ``<folder>/item_head/weight.safetensors`` (``weight`` (N, D)) + ``item_head/head.json`` (config,
item order hash), in a subfolder because vLLM loads every ``*.safetensors`` at the folder's root as model
weights (a head file there made vLLM refuse the folder). The HF model files are untouched, so the folder
still loads in vLLM; an engine that
wants the head reads the final hidden state at ``<|item_begin|>`` and applies `logits`.
Not here: the training loop (`model.think.fit`), the code beam (`model.think.decode`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from model.semantic_ids import SemanticIDs
from model.trie import TokenMap

HEAD_DIR = "item_head"
HEAD_FILE = f"{HEAD_DIR}/weight.safetensors"
HEAD_JSON = f"{HEAD_DIR}/head.json"
LEGACY_FILE = "item_head.safetensors"  # the first layout, at the folder root: breaks vLLM's weight loading


@dataclass
class ItemHeadConfig:
    """Item head settings (saved as item_head/head.json)."""

    loss_weight: float = 1.0  # weight of the item cross-entropy next to the LM loss
    score_weight: float = 1.0  # weight of item_logit when re-ranking beam leaves (0 = codes only)


def items_hash(sid: SemanticIDs) -> str:
    """Identity of the row order of `E` (the SID item order and codes)."""
    h = hashlib.sha1(np.asarray(sid.item_ids, dtype=np.int64).tobytes())
    h.update(np.asarray(sid.codes, dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


class ItemHead(torch.nn.Module):
    """N x D item table; rows follow `sid.item_ids`."""

    def __init__(self, num_items: int, dim: int, cfg: ItemHeadConfig | None = None):
        super().__init__()
        self.cfg = cfg or ItemHeadConfig()
        self.weight = torch.nn.Parameter(torch.zeros(num_items, dim))

    @classmethod
    def from_codes(cls, model: Any, tm: TokenMap, sid: SemanticIDs, cfg: ItemHeadConfig | None = None) -> ItemHead:
        """Init each row as the sum of the item's code-token embeddings (tied start)."""
        emb = model.get_input_embeddings().weight.detach().float()
        ids = code_token_ids(tm, sid)  # (N, L)
        head = cls(ids.shape[0], emb.shape[1], cfg)
        with torch.no_grad():
            head.weight.copy_(emb[ids].sum(1) / ids.shape[1] ** 0.5)
        return head.to(model.get_input_embeddings().weight.device)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """h (..., D) -> (..., N) unnormalised item scores."""
        return h.float() @ self.weight.T

    def save(self, folder: Path | str, sid: SemanticIDs) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        (folder / HEAD_DIR).mkdir(parents=True, exist_ok=True)
        save_file({"weight": self.weight.detach().float().contiguous().cpu()}, folder / HEAD_FILE)
        (folder / HEAD_JSON).write_text(json.dumps({**asdict(self.cfg), "num_items": int(self.weight.shape[0]),
                                                    "items_hash": items_hash(sid)}, indent=2) + "\n")

    @classmethod
    def load(cls, folder: Path | str, sid: SemanticIDs | None = None) -> ItemHead | None:
        """The folder's head, or None when it has none; refuses a head built for another item order."""
        from safetensors.torch import load_file

        folder = Path(folder)
        if (folder / LEGACY_FILE).is_file():
            raise ValueError(f"{folder / LEGACY_FILE}: an item head at the folder root makes vLLM refuse the folder; "
                             f"move it to {folder / HEAD_FILE} and item_head.json to {folder / HEAD_JSON}")
        if not (folder / HEAD_FILE).is_file():
            return None
        meta = json.loads((folder / HEAD_JSON).read_text())
        if sid is not None and meta.get("items_hash") != items_hash(sid):
            raise ValueError(f"{folder / HEAD_FILE}: built for another item order/codes than the given SIDs")
        w = load_file(folder / HEAD_FILE)["weight"]
        keys = ItemHeadConfig.__dataclass_fields__
        head = cls(w.shape[0], w.shape[1], ItemHeadConfig(**{k: v for k, v in meta.items() if k in keys}))
        with torch.no_grad():
            head.weight.copy_(w)
        return head


class TiedItemHead(ItemHead):
    """The item head of a model with item tokens: the item-token rows of its (tied) embedding table.

    ``logits(h) = h . E[item_offset : item_offset + N]``: the rows the history positions read
    (`model.think.tokens.add_item_id_tokens`), so input and output item vectors are one, as in the online
    OneRec. It owns no parameter and no file: the rows are model weights, saved in the HF folder and loaded by
    vLLM with it; only ``item_head/head.json`` (config, ``tied: true``) is written.
    """

    def __init__(self, model: Any, tm: TokenMap, cfg: ItemHeadConfig | None = None):
        torch.nn.Module.__init__(self)
        if not tm.has_items:
            raise ValueError("TiedItemHead: the model has no item tokens (TokenMap.item_offset is None)")
        self.cfg = cfg or ItemHeadConfig()
        self._model = [model]  # a list: not registered as a submodule (its parameters stay the model's)
        self.start, self.n = int(tm.item_offset or 0), int(tm.num_items)

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        return self._model[0].get_input_embeddings().weight[self.start : self.start + self.n]

    def save(self, folder: Path | str, sid: SemanticIDs) -> None:
        folder = Path(folder)
        (folder / HEAD_DIR).mkdir(parents=True, exist_ok=True)
        (folder / HEAD_JSON).write_text(json.dumps({**asdict(self.cfg), "num_items": self.n, "tied": True,
                                                    "items_hash": items_hash(sid)}, indent=2) + "\n")


def load_head(folder: Path | str, sid: SemanticIDs, model: Any, tm: TokenMap) -> ItemHead | None:
    """The head a folder's model scores items with: the tied item-token rows when it has item tokens (config
    from ``item_head/head.json`` when present), else the stored `ItemHead`, else None."""
    if tm.has_items:
        path = Path(folder) / HEAD_JSON
        meta = json.loads(path.read_text()) if path.is_file() else {}
        if meta.get("items_hash", items_hash(sid)) != items_hash(sid):
            raise ValueError(f"{path}: built for another item order/codes than the given SIDs")
        keys = ItemHeadConfig.__dataclass_fields__
        return TiedItemHead(model, tm, ItemHeadConfig(**{k: v for k, v in meta.items() if k in keys}))
    return ItemHead.load(folder, sid)


def code_token_ids(tm: TokenMap, sid: SemanticIDs) -> torch.Tensor:
    """(N, L) token id of each item's code at each level."""
    codes = torch.as_tensor(np.asarray(sid.codes), dtype=torch.long)
    return tm.offset + torch.arange(tm.num_levels) * tm.codebook_size + codes


def targets_at_item_begin(ids: torch.Tensor, labels: torch.Tensor, tm: TokenMap,
                          row_of_codes: dict[tuple[int, ...], int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions (K, 2) of every ``<|item_begin|>`` whose next L tokens are a labelled item, and its row (K,).

    ids/labels (B, T) from the training collate (labels -100 on prompt and padding).
    """
    L, T = tm.num_levels, ids.shape[1]
    begin = torch.eq(ids, int(tm.item_begin or 0))  # (B, T)
    pos = torch.nonzero(begin[:, : T - L] & (labels[:, 1 : T - L + 1] != -100))
    if pos.numel() == 0:
        return pos, torch.zeros(0, dtype=torch.long)
    codes = torch.stack([ids[pos[:, 0], pos[:, 1] + 1 + lv] for lv in range(L)], 1)  # (K, L) token ids
    codes = codes - tm.offset - torch.arange(L, device=ids.device) * tm.codebook_size
    rows = [row_of_codes.get(tuple(c), -1) for c in codes.tolist()]
    keep = torch.tensor([r >= 0 for r in rows], dtype=torch.bool)
    return pos[keep], torch.tensor([r for r in rows if r >= 0], dtype=torch.long)


def item_loss(head: ItemHead, hidden: torch.Tensor, pos: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over all N items at the given positions; hidden (B, T, D) final (normed) states."""
    if rows.numel() == 0:
        return hidden.new_zeros(())
    h = hidden[pos[:, 0], pos[:, 1]]  # (K, D)
    return F.cross_entropy(head.logits(h), rows.to(h.device))


def rerank(item_logits: torch.Tensor, leaf_rows: np.ndarray, scores: np.ndarray, weight: float
           ) -> tuple[np.ndarray, np.ndarray]:
    """New order and scores of beam leaves: score + weight * item_logit.

    item_logits (B, N); leaf_rows (B, W) catalogue row of each leaf (-1 = no item); scores (B, W) code
    log-probs (-inf = dead beam). Returns (order (B, W), new scores (B, W)), best first.
    """
    il = item_logits.float().cpu().numpy()
    safe = np.where(leaf_rows >= 0, leaf_rows, 0)
    extra = np.take_along_axis(il, safe, 1) * weight
    new = np.where((leaf_rows >= 0) & np.isfinite(scores), scores + extra, -np.inf)
    order = np.argsort(-new, axis=1, kind="stable")
    return order, np.take_along_axis(new, order, 1)


def prefix_groups(sid: SemanticIDs) -> tuple[np.ndarray, torch.Tensor]:
    """Every catalogue (a, b) prefix (M, 2) and each item's prefix row (N,), in SID item order."""
    pref, inv = np.unique(np.asarray(sid.codes)[:, :2], axis=0, return_inverse=True)
    return pref, torch.as_tensor(inv.reshape(-1), dtype=torch.long)


def prefix_mass(item_logits: torch.Tensor, group: torch.Tensor, num_prefixes: int) -> torch.Tensor:
    """(B, M) log of the head's probability mass per prefix (-inf: no mass); item_logits (B, N)."""
    logp = torch.log_softmax(item_logits.float().cpu(), -1)
    # logsumexp per group: max-shifted scatter-add of probabilities
    m = logp.max(-1, keepdim=True).values
    mass = torch.zeros(logp.shape[0], num_prefixes).index_add_(1, group, (logp - m).exp())
    return torch.where(mass > 0, mass.log() + m, torch.full_like(mass, float("-inf")))


def mix_logmass(think: torch.Tensor, online: torch.Tensor, weight: float) -> torch.Tensor:
    """(B, M) log(`weight` p_think + (1 - `weight`) p_online) over the same M prefixes, each side renormalised over
    them: the think head's prefix mass (`prefix_mass`) mixed with the online model's p(a) p(b|a)
    (`OneRec.prefix_logprobs`). A weight of 0 or 1 keeps one side exactly (log 0 = -inf on the other)."""
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"mix weight must be in [0, 1], got {weight}")
    w = torch.tensor(float(weight))
    with torch.no_grad():
        return torch.logaddexp(think.log_softmax(-1) + w.log(), online.log_softmax(-1) + (1 - w).log())


ONLINE_LOG_FLOOR = -50.0  # the online model's log p below which a prefix counts as "not proposed" (contrast)


def contrast_rank(think: torch.Tensor, online: torch.Tensor, beta: float) -> torch.Tensor:
    """(B, M) ranking scores log p_think - `beta` log p_online over the same M prefixes, each side renormalised over
    them (the online side floored at `ONLINE_LOG_FLOOR`, so a prefix it gives no mass gets a finite bonus): the think
    head's prefixes, moved away from those the online model proposes itself from the same history. The served
    completion adds the online model's own top prefixes from the fresher history, so a cached slot spent on one of
    them buys little. A ranking, not a probability: the refresh stores the think model's own log mass."""
    if beta < 0:
        raise ValueError(f"contrast must be >= 0, got {beta}")
    with torch.no_grad():
        return think.log_softmax(-1) - beta * online.log_softmax(-1).clamp(min=ONLINE_LOG_FLOOR)


def rank_with_online(think: torch.Tensor, online: torch.Tensor, weight: float, contrast: float = 0.0
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(ranking, stored score), both (B, M): the think head's prefix mass `think` with the online model's log p
    `online` over the same prefixes. `contrast` > 0: rank by `contrast_rank`, store the head's own mass; else the
    mixture at think weight `weight` (`mix_logmass`) for both. The one rule of the refresh
    (`offline_worker.head_prefixes`) and of `evaluation.prefix_recall`."""
    if contrast > 0:
        return contrast_rank(think, online, contrast), think
    mixed = mix_logmass(think, online, weight)
    return mixed, mixed


def prefix_scores(item_logits: torch.Tensor, sid: SemanticIDs) -> tuple[np.ndarray, torch.Tensor]:
    """Log of the head's probability mass per (a, b) prefix: returns (prefixes (M, 2), scores (B, M))."""
    pref, group = prefix_groups(sid)
    return pref, prefix_mass(item_logits, group, len(pref))
