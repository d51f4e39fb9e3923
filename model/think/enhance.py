"""Reasoning Enhancement: GRPO with the paper's Rollout-Beam reward, as a compact own loop.

For each training case (history -> target) the policy samples G reasoning texts after ``<think>``;
each is closed with ``</think><|item_begin|>`` and a trie-constrained beam of width K is run over the
codes. Reward (Rollout-Beam): ``R = max over the beam of sum_l 1[code_l == target_l]`` (0..L). With
``reward="head"`` (a model with an item head) the K candidates are instead the item head's top K after the
rationale, the list think mode serves with ``--code-weight 0``, so the reward scores what is served. Advantages
are normalised within each group of G; the loss is the on-policy policy gradient on the reasoning
tokens (and the closing ``</think>``) plus ``beta * KL(policy || reference)`` (k3 estimator per token).
TRL's GRPOTrainer is not used: its reward is computed on finished text, while this reward needs a
constrained beam search that continues from the policy's own KV cache.
Not here: data (`model.think.activate_data.rl_cases`), CLI and checkpoints (`model.think.stages`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from model.semantic_ids import SemanticIDs
from model.think.align_data import generation_prefix
from model.think.decode import Decoder


def rollout_beam_reward(beam_codes: Sequence[Sequence[int]], target: Sequence[int]) -> float:
    """max over beam candidates of the number of levels whose code equals the target's (0 if no beam)."""
    best = 0
    for codes in beam_codes:
        if len(codes) != len(target):
            raise ValueError(f"candidate {tuple(codes)} and target {tuple(target)} differ in length")
        best = max(best, sum(int(c) == int(t) for c, t in zip(codes, target, strict=True)))
    return float(best)


def group_advantages(rewards: np.ndarray, group: int, eps: float = 1e-4) -> np.ndarray:
    """(N,) rewards in consecutive groups of `group` -> (r - group mean) / (group std + eps)."""
    r = rewards.reshape(-1, group)
    adv = (r - r.mean(1, keepdims=True)) / (r.std(1, keepdims=True) + eps)
    return adv.reshape(-1)


@dataclass
class GRPOConfig:
    """One GRPO step = `prompts` cases x `group` rollouts."""

    prompts: int = 8
    group: int = 4
    beam: int = 10
    max_think: int = 32
    temperature: float = 1.0
    top_k: int = 0
    kl_beta: float = 0.04
    lr: float = 2e-5
    max_len: int = 320
    reward: str = "beam"  # candidates the reward scores: "beam" (code beam) or "head" (the item head's top `beam`)


def completion_logprobs(model: Any, seqs: list[list[int]], starts: list[int], pad: int,
                        text_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs (N, T-1) of `seqs` (right-padded) and the mask of completion positions.

    Position j of the result scores token j+1; completion tokens are those at index >= starts[i].
    With `text_mask`, the distribution is the one sampling used (codes and markers masked out).
    """
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    att = torch.zeros((len(seqs), width), dtype=torch.long)
    comp = torch.zeros((len(seqs), width - 1), dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        att[i, : len(s)] = 1
        comp[i, starts[i] - 1 : len(s) - 1] = True
    dev = next(model.parameters()).device
    ids, att, comp = ids.to(dev), att.to(dev), comp.to(dev)
    logits = model(input_ids=ids, attention_mask=att).logits[:, :-1].float()  # (N, T-1, V)
    if text_mask is not None:
        logits = logits.masked_fill(~text_mask[: logits.shape[-1]], float("-inf"))
    logp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return logp.masked_fill(~comp, 0.0), comp


def grpo_step(policy: Any, ref: Any, decoder: Decoder, optimizer: torch.optim.Optimizer,
              cases: Sequence[tuple[list[int], int]], sid: SemanticIDs, cfg: GRPOConfig,
              generator: torch.Generator | None = None) -> dict[str, float]:
    """Sample, reward, and apply one policy-gradient update; returns step statistics."""
    tok = decoder.tok
    items = decoder.tm.has_items
    prompts = [generation_prefix([sid.codes_of(i) for i in h], item_ids=items)
               for h, _ in cases for _ in range(cfg.group)]
    targets = [sid.codes_of(t) for _, t in cases for _ in range(cfg.group)]
    policy.eval()
    decoder.model = policy
    b = decoder.prefill(decoder.encode_prefixes(prompts, cfg.max_len))
    reasoning = decoder.reason(b, cfg.max_think, cfg.temperature, cfg.top_k, generator)
    decoder.close_think(b)
    beams = decoder.head_candidates(b, cfg.beam, 0.0) if cfg.reward == "head" else decoder.beam_codes(b, cfg.beam)
    rewards = np.array([
        rollout_beam_reward([c for c, s in zip(beams.codes[i], beams.scores[i], strict=True) if np.isfinite(s)],
                            targets[i])
        for i in range(len(prompts))
    ], dtype=np.float64)
    adv = torch.tensor(group_advantages(rewards, cfg.group), dtype=torch.float32, device=decoder.device)

    # teacher-forced pass over prompt + reasoning + </think> (the tokens the policy chose)
    prompt_ids = [tok(p, add_special_tokens=False)["input_ids"][-cfg.max_len :] for p in prompts]
    seqs = [p + r + [decoder.think_end] for p, r in zip(prompt_ids, reasoning, strict=True)]
    starts = [len(p) for p in prompt_ids]
    policy.train()
    logp, comp = completion_logprobs(policy, seqs, starts, decoder.pad, decoder.text_mask)
    with torch.no_grad():
        ref_logp, _ = completion_logprobs(ref, seqs, starts, decoder.pad, decoder.text_mask)
    diff = (ref_logp - logp).masked_fill(~comp, 0.0)
    kl = torch.exp(diff) - diff - 1.0  # k3 estimator, >= 0
    per_tok = -(adv[:, None] * logp) + cfg.kl_beta * kl  # on-policy: ratio == 1, grad = A * grad log p
    n_tok = comp.sum(1).clamp(min=1)
    loss = ((per_tok * comp).sum(1) / n_tok).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
    optimizer.step()
    policy.eval()
    groups = rewards.reshape(-1, cfg.group)
    return {
        "reward": float(rewards.mean()),
        "reward_max": float(groups.max(1).mean()),
        "full_hit": float((rewards == len(targets[0])).mean()),
        "kl": float(((kl.detach() * comp).sum(1) / n_tok).mean()),
        "loss": float(loss.detach()),
        "think_len": float(np.mean([len(r) for r in reasoning])),
        "informative_groups": float((groups.std(1) > 0).mean()),
    }
