"""Configuration of the lightweight OneRec (`OneRecConfig`, saved as config.json in each checkpoint) and the
`DeadlineExceeded` error its decoders raise between steps. No torch here: the API imports it cheaply."""

from __future__ import annotations

from dataclasses import dataclass

from services.catalog import HISTORY_CAP

DEFAULT_EPOCHS = 20  # maximum epochs of a selection run (the cosine schedule ends there)


class DeadlineExceeded(RuntimeError):
    """The caller's deadline passed between decode steps."""


@dataclass
class OneRecConfig:
    """Architecture of the lightweight model (saved as config.json in each checkpoint)."""

    num_items: int = 0  # rows of the code table; item-id embeddings use these row indices (+1, 0 = pad)
    num_levels: int = 4
    codebook_size: int = 256
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 2
    d_ff: int = 256
    max_len: int = HISTORY_CAP  # history items the trunk reads (the one history cap)
    dropout: float = 0.3
    use_item_emb: bool = True
    # auxiliary next-item softmax tied to the item embeddings (SASRec-style): trained with this loss
    # weight, and at decode time `item_score_weight` x its log-prob is added to each complete item's
    # code score (the trie-constrained code beam still proposes the candidates)
    item_loss_weight: float = 0.0
    item_score_weight: float = 0.0
