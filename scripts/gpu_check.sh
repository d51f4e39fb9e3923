#!/usr/bin/env bash
# GPU check of the training and HF-inference code (results in docs/OPERATIONS.md, "GPU").
#
# Runs, each step on its own (a failed step is logged and the next one runs):
#   1. versions (nvidia-smi, torch, transformers, peft)
#   2. model.think base / align / activate / enhance on --device $DEV, short budgets, the
#      settings of the CPU run in docs/THINK.md (so tok/s compares), plus a larger base (512 x 8 layers)
#   3. evaluation think run on tiny-rl, 2,000 sampled test users (the CPU run of docs/think/eval_ia_r_2000.json)
#   4. the lightweight OneRec model (model.onerec) on $DEV: its CLI has no device option, so a short
#      loop here moves the model and batches (training) and tries its decoder as is
#   5. the offline HF engine: no device option (notes only)
# Needs: artifacts/sid, artifacts/think/{tiny-base,tiny-ia,tiny-act,tiny-rl} and the MiniLM item-embedding
# cache artifacts/think/item_emb_*.npy (activation); pydantic-settings (wheels in .whl are installed if missing).
#
#   DEV=cuda bash scripts/gpu_check.sh                 # on the GPU machine (writes $OUT, default runs/gpu_check)
#   DEV=cpu SMOKE=1 bash scripts/gpu_check.sh          # seconds-long CPU smoke test of every step
set -u -o pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
cd "$(dirname "$0")/.."
DEV=${DEV:-cuda}
SMOKE=${SMOKE:-0}
OUT=${OUT:-runs/gpu_check}
WORK=${WORK:-/tmp/gpu_check}
PY=${PY:-python3}
mkdir -p "$OUT" "$WORK"
LOG="$OUT/gpu_check.log"
: >"$LOG"
log() { echo "$@" | tee -a "$LOG"; }
step() {  # step NAME TIMEOUT_S CMD...: run, log output and wall time; never stops the script
  local name=$1 limit=$2; shift 2
  log "=== step $name: $*"
  local t0=$SECONDS
  # progress bars: \r becomes a line break, and only the 100% line of each bar is kept
  timeout "$limit" "$@" 2>&1 | tr '\r' '\n' | grep --line-buffered -v -E '(^|[^0-9])[0-9]{1,2}%\||^\s*$' \
    | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  log "=== step $name: rc=$rc wall_s=$((SECONDS - t0))"
  [ "$rc" = 0 ] || log "FAILED step $name (rc=$rc)"
}

if ! $PY -c "import pydantic_settings" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

if [ "$SMOKE" = 1 ]; then
  S_BASE=3; S_WARM=2; S_ALIGN=3; S_ACT=3; S_RL=1; S_BIG=2; USERS="--limit-users 300"; THR="--threads 1"
  EVAL="--limit 40"; EVAL_BIG="--limit 40"; ONEREC_BATCHES=3
  S_CPU=2; EVAL_CPU="--limit 20"; ONEREC_CPU_BATCHES=2
  export OMP_NUM_THREADS=1
else
  S_BASE=300; S_WARM=50; S_ALIGN=300; S_ACT=300; S_RL=10; S_BIG=200; USERS=""; THR=""
  EVAL="--sample 2000 --seed 0"; EVAL_BIG="--sample 2000 --seed 0"; ONEREC_BATCHES=0  # 0 = one full epoch
  S_CPU=100; EVAL_CPU="--sample 500 --seed 0"; ONEREC_CPU_BATCHES=40
fi
T=artifacts/think

# 1. versions
log "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown) ($(date -u +%FT%TZ))"
command -v nvidia-smi >/dev/null && step nvidia-smi 30 nvidia-smi
step versions 60 $PY - <<'EOF'
import sys, torch, transformers, peft
print(sys.version)
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
print("gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
print("transformers", transformers.__version__, "peft", peft.__version__)
EOF
if command -v nvidia-smi >/dev/null; then  # utilisation + memory once a second for the whole run
  nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 1 >"$OUT/gpu_util.csv" 2>/dev/null &
  SMI=$!
fi

# 2. training stages (same settings as the CPU run in docs/THINK.md, fewer steps)
step base 150 $PY -m model.think base --out $WORK/base --hidden 128 --layers 4 --heads 4 --kv-heads 2 \
  --head-dim 32 --intermediate 384 --bpe-vocab 2048 --steps $S_BASE --batch-size 64 --device $DEV $USERS $THR
step align 150 $PY -m model.think align --init $T/tiny-base --out $WORK/ia --tasks persona,seq,caption,lm \
  --warmup-steps $S_WARM --steps $S_ALIGN --w-seq 0.75 --w-persona 0.1 --w-caption 0.1 --w-lm 0.05 --batch-size 32 \
  --lr 1e-3 --device $DEV $USERS $THR
step activate 150 $PY -m model.think activate --init $T/tiny-ia --out $WORK/act --teacher category \
  --k-prune 3 --per-user 2 --steps $S_ACT --batch-size 32 --lr 1e-3 --lora-r 16 --cache-dir $T --device $DEV $USERS $THR
step enhance 150 $PY -m model.think enhance --init $T/tiny-act --out $WORK/rl --steps $S_RL --batch-size 8 \
  --group 4 --beam 10 --max-think 32 --temperature 1.0 --kl-beta 0.04 --lr 1e-5 --device $DEV $USERS $THR
step base_512x8 150 $PY -m model.think base --out $WORK/base512 --hidden 512 --layers 8 --heads 8 --kv-heads 4 \
  --head-dim 64 --intermediate 1536 --bpe-vocab 2048 --steps $S_BIG --batch-size 64 --device $DEV $USERS $THR

# 3. evaluation of tiny-rl (think mode, beam 10): batch 64 as on CPU, then 512
step eval_b64 150 $PY -m evaluation think run --checkpoint $T/tiny-rl --mode think $EVAL --show 0 \
  --batch-size 64 --device $DEV --out-json "$OUT/eval_tiny_rl_b64.json" $THR
step eval_b512 150 $PY -m evaluation think run --checkpoint $T/tiny-rl --mode think $EVAL_BIG --show 0 \
  --batch-size 512 --device $DEV --out-json "$OUT/eval_tiny_rl_b512.json" $THR
# same-host CPU baselines (all of the host's cores): the CPU figures in docs/THINK.md come from a loaded 2-core host
step base_hostcpu 120 $PY -m model.think base --out $WORK/base_cpu --hidden 128 --layers 4 --heads 4 --kv-heads 2 \
  --head-dim 32 --intermediate 384 --bpe-vocab 2048 --steps $S_CPU --batch-size 64 --device cpu $USERS $THR
step eval_hostcpu 120 $PY -m evaluation think run --checkpoint $T/tiny-rl --mode think $EVAL_CPU --show 0 \
  --batch-size 64 --device cpu --out-json "$OUT/eval_tiny_rl_hostcpu.json" $THR

# 4. lightweight OneRec on $DEV (no device option in its CLI: the loop below moves model and batches)
step onerec 150 env DEV="$DEV" BATCHES="$ONEREC_BATCHES" CPU_BATCHES="$ONEREC_CPU_BATCHES" OUTF="$OUT/onerec.json" $PY - <<'EOF'
import json, os, random, time
import torch
from model.onerec import OneRec, OneRecConfig, OneRecRecommender, build_model
from model.onerec.train import batch_tensors, length_batches, make_windows
from model.semantic_ids import SemanticIDs
from services.catalog import load_dataset

dev, nb = torch.device(os.environ["DEV"]), int(os.environ["BATCHES"])
sid, ds = SemanticIDs.load("artifacts/sid/current"), load_dataset("data/beauty")
seqs = make_windows(ds.splits.train, {int(i): r for r, i in enumerate(sid.item_ids)}, 50)
res = {"device": str(dev), "sequences": len(seqs), "torch_threads": torch.get_num_threads()}
runs = [("default_128x2", 128, 2, 2, dev, nb), ("wide_512x4", 512, 4, 8, dev, nb),
        ("default_128x2_hostcpu", 128, 2, 2, torch.device("cpu"), int(os.environ["CPU_BATCHES"]))]
for name, d, layers, heads, dev, nb in runs:
    cfg = OneRecConfig(d_model=d, n_layers=layers, n_heads=heads, d_ff=2 * d, item_loss_weight=1.0,
                       item_score_weight=1.0)
    model = build_model(cfg, sid, 0).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    rng = random.Random(0)
    batches = length_batches(seqs, 128, rng)
    batches = batches[:nb] if nb else batches
    model.train()
    t0 = time.perf_counter()
    for idx in batches:
        x, y = batch_tensors([seqs[i] for i in idx], cfg.max_len, rng)
        loss = model.loss(x.to(dev), y.to(dev))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    last = loss.item()
    secs = time.perf_counter() - t0
    res[name] = {"device": str(dev), "batches": len(batches), "batch_size": 128, "seconds": round(secs, 2),
                 "ms_per_batch": round(1000 * secs / len(batches), 2), "loss": round(last, 4),
                 "params": sum(p.numel() for p in model.parameters())}
    print(name, res[name], flush=True)
    model.eval()
    try:  # the serving decoder as it is (its tensors are built on the CPU)
        rec = OneRecRecommender(OneRec(model, sid), beam=20)
        rec.recommend(ds.splits.test[:64], 10)
        res[name]["decode_on_device"] = "ok"
    except Exception as e:  # noqa: BLE001
        res[name]["decode_on_device"] = f"{type(e).__name__}: {str(e)[:200]}"
    print(name, "decode on", dev, "->", res[name]["decode_on_device"], flush=True)
open(os.environ["OUTF"], "w").write(json.dumps(res, indent=2) + "\n")
EOF

# 5. HF offline engine (offline_worker.hf_engine.HFEngine): loads the model with load_think (CPU) and builds its
# inputs on the CPU; no device option, so not run here.
log "=== step hf_engine: skipped: HFEngine has no device option (model and inputs on the CPU)"

# summary of the training stages (stage records of each output folder)
step summary 60 $PY - "$WORK" "$OUT/summary.json" <<'EOF'
import json, sys
from pathlib import Path
work, out = Path(sys.argv[1]), Path(sys.argv[2])
res = {}
for name in ("base", "ia", "act", "rl", "base512", "base_cpu"):
    f = work / name / "itemic.json"
    if f.is_file():
        meta = json.loads(f.read_text())
        res[name] = {"params": meta.get("params"), "stage": meta["stages"][-1]}
out.write_text(json.dumps(res, indent=2) + "\n")
print(json.dumps(res, indent=2))
EOF
[ -n "${SMI:-}" ] && kill "$SMI" 2>/dev/null
log "done"
