"""The HF reference engine (`HFEngine`): transformers ``generate`` for the reasoning, one batched forward
for level a and a KV-cache continuation for level b. The benchmark baseline of `offline_worker.vllm_engine`;
same interface and token ids (`offline_worker.engine_interface`)."""
from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from offline_worker.engine_interface import Engine, EngineConfig, Prefix, UserGrammar, _Path, select_prefixes


class HFEngine(Engine):
    """transformers reference: batched ``generate`` + a cached two-step forward for the prefixes."""

    name = "hf"

    def __init__(
        self,
        model_dir: Path | str,
        sid_dir: Path | str,
        config: EngineConfig | None = None,
        batch_size: int = 32,
        dtype: str = "float32",
        threads: int | None = None,
    ) -> None:
        import torch

        from model.think.checkpoint import load_think

        super().__init__(model_dir, sid_dir, config)
        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        self.model, _, _ = load_think(self.model_dir, dtype=getattr(torch, dtype))
        self.batch_size = batch_size
        self._compiler: Any = None  # xgrammar compiler of grounded reasoning (built on first use)
        self.pad_id = int(self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.stop_ids[0])
        self._attach_head(self.model, batch_size)

    def _batches(self, seqs: Sequence[Sequence[int]], rows: list[int] | None = None) -> list[list[int]]:
        """Row indices grouped into batches of similar length (less left padding to compute)."""
        order = sorted(rows if rows is not None else range(len(seqs)), key=lambda i: len(seqs[i]))
        return [order[s : s + self.batch_size] for s in range(0, len(order), self.batch_size)]

    def _pad(self, seqs: list[list[int]]) -> tuple[Any, Any, Any]:
        """Left-pad to (B, L) ids, attention mask and position ids (positions start at 0 per row)."""
        from model.think.decode import left_pad

        ids, mask = left_pad(seqs, self.pad_id)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        return ids, mask, pos

    def _grammar_processor(self, grammars: list[UserGrammar]) -> Any:
        """xgrammar's transformers logits processor, one grammar per batch row (the library vLLM uses); a
        finished grammar allows only ``</think>``. Compiled grammars are cached per engine."""
        import xgrammar as xgr
        from xgrammar.contrib.hf import LogitsProcessor

        if self._compiler is None:
            info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.model.config.vocab_size,
                                                      stop_token_ids=[self.think_end])
            self._compiler = xgr.GrammarCompiler(info)
        return LogitsProcessor([self._compiler.compile_grammar(g.text) for g in grammars])

    def _reason(self, prompts: list[list[int]], paths: list[_Path], grammars: list[UserGrammar] | None = None
                ) -> list[list[int]]:
        torch, cfg = self.torch, self.config
        out: list[list[int]] = [[] for _ in paths]
        # greedy paths batched together; sampled paths per batch with one seed (HF has no per-row seeds)
        for greedy in (True, False):
            todo = [i for i, p in enumerate(paths) if p.greedy == greedy]
            path_prompts = [prompts[p.req] for p in paths]
            for rows in self._batches(path_prompts, todo):
                ids, mask, _ = self._pad([prompts[paths[i].req] for i in rows])
                kw: dict[str, Any] = {"do_sample": False}
                if not greedy:
                    torch.manual_seed(paths[rows[0]].seed)
                    kw = {"do_sample": True, "temperature": cfg.temperature, "top_p": cfg.top_p, "top_k": cfg.top_k}
                budget = cfg.max_reasoning_tokens
                if grammars is not None:  # each row stops at its grammar's end; the batch runs to its longest budget
                    row_grammars = [grammars[paths[i].req] for i in rows]
                    kw["logits_processor"] = [self._grammar_processor(row_grammars)]
                    budget = max(g.max_tokens for g in row_grammars)
                with torch.inference_mode():
                    gen = self.model.generate(
                        input_ids=ids, attention_mask=mask, max_new_tokens=budget,
                        eos_token_id=self.stop_ids, pad_token_id=self.pad_id, **kw,
                    )  # fmt: skip
                for row, i in enumerate(rows):
                    out[i] = gen[row, ids.shape[1] :].tolist()
        return out

    def _masked_logprobs(self, logits: Any, allowed: list[list[int]]) -> Any:
        """log-softmax over each row's allowed ids only (B, V); others -inf."""
        torch = self.torch
        bias = torch.full_like(logits, -math.inf)
        for r, a in enumerate(allowed):
            bias[r, a] = 0.0
        return torch.log_softmax(logits.float() + bias, dim=-1)

    def _topk(self, logprobs: Any, allowed: list[list[int]], k: int) -> list[list[tuple[int, float]]]:
        vals, idx = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)
        out = []
        for r, a in enumerate(allowed):
            n = min(k, len(a))
            out.append([(int(t), float(v)) for t, v in zip(idx[r, :n].tolist(), vals[r, :n].tolist(), strict=True)])
        return out

    def _top_next(self, contexts: list[list[int]], allowed: list[list[int]], k: int) -> list[list[tuple[int, float]]]:
        torch = self.torch
        out: list[list[tuple[int, float]]] = [[] for _ in contexts]
        for rows in self._batches(contexts):
            ids, mask, pos = self._pad([contexts[i] for i in rows])
            with torch.inference_mode():
                logits = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=1).logits
            sub = [allowed[i] for i in rows]
            for i, best in zip(rows, self._topk(self._masked_logprobs(logits[:, -1], sub), sub, k), strict=True):
                out[i] = best
        return out

    def prefix_beam(self, contexts: list[list[int]], m: int | None = None) -> list[list[Prefix]]:
        """Level a from one forward over the contexts, level b from its KV cache (no re-prefill); `m` prefixes per
        context (default `EngineConfig.prefixes_per_sample`)."""
        torch, cfg, lvl = self.torch, self.config, self.tokmap
        m = m or cfg.prefixes_per_sample
        root = self.allowed_ids([])
        out: list[list[Prefix]] = [[] for _ in contexts]
        for rows in self._batches(contexts):
            t0 = time.perf_counter()
            ids, mask, pos = self._pad([contexts[i] for i in rows])
            n = ids.shape[0]
            with torch.inference_mode():
                res = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
            top_a = self._topk(self._masked_logprobs(res.logits[:, -1], [root] * n), [root] * n, cfg.k_a)
            t1 = time.perf_counter()
            k = len(top_a[0])  # every row has the same root set, so the same count
            cache = res.past_key_values
            cache.batch_repeat_interleave(k)
            a_tok = torch.tensor([[tok] for row in top_a for tok, _ in row], dtype=torch.long)  # (n*k, 1)
            mask2 = torch.cat([mask.repeat_interleave(k, 0), torch.ones((n * k, 1), dtype=torch.long)], dim=1)
            pos2 = (pos[:, -1:] + 1).repeat_interleave(k, 0)
            allowed_b = [self.allowed_ids([lvl.level_code(tok)[1]]) for row in top_a for tok, _ in row]
            with torch.inference_mode():
                logits_b = self.model(
                    input_ids=a_tok, attention_mask=mask2, position_ids=pos2, past_key_values=cache, use_cache=True
                ).logits[:, -1]
            top_b = self._topk(self._masked_logprobs(logits_b, allowed_b), allowed_b, m)
            self._add_time("level_a_s", t1 - t0)
            self._add_time("level_b_s", time.perf_counter() - t1)
            for r, i in enumerate(rows):
                a_list = [(lvl.level_code(tok)[1], lp) for tok, lp in top_a[r]]
                b_lists = [[(lvl.level_code(t)[1], lp) for t, lp in top_b[r * k + j]] for j in range(k)]
                out[i] = select_prefixes(a_list, b_lists, m)
        return out
