"""Training cost of the OneRec-Think LLM on this CPU: tokens/s of forward + backward + AdamW.

Grid: model sizes x {fp32, bf16 autocast} x {1, 2} threads, every cell measured in rounds that
alternate the settings (the machine is shared, so only ratios inside one run mean anything).
Also reported: the padding share of length-bucketed batches of Beauty's real sequence texts (what
sequence packing could save) and, with ``--compile``, `torch.compile` on the middle size.

    python -m benchmarks.think_train_speed --steps 6 --rounds 2 --results

Writes ``docs/results/think_train_speed.json`` with ``--results``. It is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from typing import Any

import torch

# (name, hidden, layers, heads, kv_heads, head_dim, intermediate)
SIZES = [("s", 128, 4, 4, 2, 32, 384), ("m", 256, 4, 4, 2, 64, 512), ("l", 384, 6, 6, 2, 64, 1024)]
VOCAB = 3136  # BPE 2,048 + 4 x 256 code tokens + markers, padded to 64 (the tiny base's table)


def build(hidden: int, layers: int, heads: int, kv: int, head_dim: int, inter: int) -> Any:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim,
                      max_position_embeddings=1024, tie_word_embeddings=True, dtype="float32")
    return Qwen3ForCausalLM(cfg)


def measure(model: Any, opt: torch.optim.Optimizer, batch: int, seq: int, steps: int, bf16: bool,
            threads: int) -> float:
    """tokens/s over `steps` steps (one untimed warm-up step first)."""
    torch.set_num_threads(threads)
    ids = torch.randint(0, VOCAB, (batch, seq))
    model.train()

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * seq * steps / (time.perf_counter() - t0)


def padding_share(batch_size: int = 64) -> dict[str, float]:
    """Padding share of Beauty's sequence texts in length-bucketed batches (pools of 50 batches, as trained)."""
    from model.semantic_ids import SemanticIDs
    from services.catalog import HISTORY_CAP, load_dataset
    from services.config import get_settings

    ds = load_dataset(get_settings().data_dir)
    sid = SemanticIDs.load(get_settings().resolved("sid"))
    per_item = sid.num_levels + 2  # <|item_begin|> codes <|item_end|>
    lens = []
    for seq in ds.splits.train.values():
        n = sum(1 for i in seq if sid.has_item(i))
        for s in range(0, max(n - 1, 1), HISTORY_CAP):
            k = min(n - s, HISTORY_CAP + 1)
            if k >= 2:
                lens.append(2 + per_item * k)
    rng = random.Random(0)
    rng.shuffle(lens)
    pool, real, padded = batch_size * 50, 0, 0
    for s in range(0, len(lens), pool):
        chunk = sorted(lens[s : s + pool])
        for j in range(0, len(chunk), batch_size):
            b = chunk[j : j + batch_size]
            real += sum(b)
            padded += max(b) * len(b)
    return {"texts": len(lens), "tokens_per_epoch": real, "padding_share": round(1 - real / padded, 4),
            "mean_tokens": round(real / len(lens), 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=32, help="sequences per step")
    p.add_argument("--seq", type=int, default=192, help="tokens per sequence")
    p.add_argument("--steps", type=int, default=6, help="timed steps per cell per round")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds (the upper median is reported)")
    p.add_argument("--sizes", default="s,m,l", help="comma list of s, m, l")
    p.add_argument("--compile", action="store_true", help="also time torch.compile (size m, bf16, 2 threads)")
    p.add_argument("--results", action="store_true", help="write docs/results/think_train_speed.json")
    args = p.parse_args()
    sizes = [s for s in SIZES if s[0] in args.sizes.split(",")]
    cells: dict[str, list[float]] = {}
    params: dict[str, int] = {}
    models = {}
    for name, *dims in sizes:
        m = build(*dims)
        params[name] = int(sum(q.numel() for q in m.parameters()))
        models[name] = (m, torch.optim.AdamW(m.parameters(), lr=1e-4))
    for r in range(args.rounds):
        for name, *_ in sizes:
            m, opt = models[name]
            order = [(bf, th) for bf in (False, True) for th in (1, 2)]
            if r % 2:
                order.reverse()
            for bf, th in order:
                key = f"{name}_{'bf16' if bf else 'fp32'}_{th}t"
                cells.setdefault(key, []).append(measure(m, opt, args.batch, args.seq, args.steps, bf, th))
                print(f"round {r} {key} ({params[name]:,} params): {cells[key][-1]:.0f} tok/s", flush=True)
    med = {k: sorted(v)[len(v) // 2] for k, v in cells.items()}
    metrics: dict[str, Any] = {f"{k}_tok_per_s": round(v, 1) for k, v in med.items()}
    metrics["params"] = params
    for name, *_ in sizes:
        metrics[f"{name}_bf16_over_fp32_2t"] = round(med[f"{name}_bf16_2t"] / med[f"{name}_fp32_2t"], 2)
        metrics[f"{name}_2t_over_1t_bf16"] = round(med[f"{name}_bf16_2t"] / med[f"{name}_bf16_1t"], 2)
    if args.compile:
        m = build(*SIZES[1][1:])
        opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
        eager = measure(m, opt, args.batch, args.seq, args.steps, True, 2)
        t0 = time.perf_counter()
        cm = torch.compile(m)
        try:
            measure(cm, opt, args.batch, args.seq, 1, True, 2)
            compile_s = time.perf_counter() - t0
            comp = measure(cm, opt, args.batch, args.seq, args.steps, True, 2)
            metrics |= {"m_compile_s": round(compile_s, 1), "m_compiled_over_eager_bf16_2t": round(comp / eager, 2)}
        except Exception as exc:  # report, do not hide: the compile path is optional
            metrics["m_compile_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    metrics |= {f"beauty_{k}": v for k, v in padding_share().items()}
    metrics["load_average_1m"] = round(os.getloadavg()[0], 2)
    metrics["batch"], metrics["seq"], metrics["rounds"] = args.batch, args.seq, args.rounds
    print(json.dumps(metrics, indent=2))
    if args.results:
        from services.results import write_result

        note = (f"alternated cells, upper median of {args.rounds} rounds (with 2 rounds: the faster one); "
                f"shared 2-core machine (other engineers' "
                f"jobs running, load {metrics['load_average_1m']}); transformers Qwen3, forward+backward+AdamW")
        print(write_result("think_train_speed", metrics, note=note))
    assert math.isfinite(sum(med.values()))


if __name__ == "__main__":
    main()
