#!/bin/sh
# One-shot build of every artifact the stack serves, into $ONEREC_ARTIFACTS_DIR (the `artifacts` volume):
# semantic IDs, the lightweight OneRec (online tier), and OneRec-Think (offline tier) stage by stage.
# A stage whose output is complete is skipped and an interrupted one resumes, so after a failure
# `docker compose --profile train run --rm train` is simply run again. Knobs (all optional):
#   TRAIN_SID_ARGS      extra flags of `python -m model.semantic_ids build`
#   TRAIN_ONEREC_ARGS   extra flags of `python -m model.onerec train` (e.g. "--max-minutes 10")
#   TRAIN_THINK_STAGES  OneRec-Think stages to run, in order (default "base align activate enhance");
#                       the last one becomes think/current
#   TRAIN_THINK_ARGS    extra flags given to every `python -m model.think` stage (e.g. "--limit-users 500")
set -eu

PY="${PYTHON:-python3}"
A="${ONEREC_ARTIFACTS_DIR:-/artifacts}"
stages="${TRAIN_THINK_STAGES:-base align activate enhance}"
log() { echo "[train] $(date -u +%H:%M:%S) $*"; }

# 1. semantic IDs: <A>/sid/current is only pointed at a folder once it is complete
if [ -e "$A/sid/current" ]; then
  log "semantic IDs: done ($A/sid/current)"
else
  log "semantic IDs"
  # shellcheck disable=SC2086
  "$PY" -m model.semantic_ids build --out "$A/sid" ${TRAIN_SID_ARGS:-}
fi

# 2. lightweight OneRec: <A>/onerec/current appears when training ends; --resume picks up state.pt
if [ -e "$A/onerec/current" ]; then
  log "OneRec: done ($A/onerec/current)"
else
  log "OneRec"
  # shellcheck disable=SC2086
  "$PY" -m model.onerec train --sid "$A/sid/current" --out "$A/onerec" --name stack --resume ${TRAIN_ONEREC_ARGS:-}
fi

# 3. OneRec-Think: a stage is complete when its itemic.json records it last and no trainer state is left
stage_done() {
  [ -f "$1/itemic.json" ] && [ ! -f "$1/trainer_state.pt" ] && "$PY" -c "
import json, sys
stages = json.load(open(sys.argv[1] + '/itemic.json')).get('stages', [])
sys.exit(0 if stages and stages[-1].get('stage') == sys.argv[2] else 1)" "$1" "$2"
}
last=""
for stage in $stages; do last="$stage"; done
prev=""
for stage in $stages; do
  out="$A/think/$stage"
  if stage_done "$out" "$stage"; then
    log "OneRec-Think $stage: done ($out)"
  else
    log "OneRec-Think $stage"
    set -- --out "$out" --sid-dir "$A/sid/current" --resume
    [ -n "$prev" ] && set -- "$@" --init "$prev"
    [ "$stage" = "$last" ] && set -- "$@" --current
    # shellcheck disable=SC2086
    "$PY" -m model.think "$stage" "$@" ${TRAIN_THINK_ARGS:-}
  fi
  prev="$out"
done
if [ -n "$last" ] && [ -d "$A/think/$last" ] && [ ! -e "$A/think/current" ]; then
  # every stage was already done but current was never pointed (e.g. the stage list changed)
  ln -sfn "$last" "$A/think/current"
fi
log "artifacts ready in $A: $(ls "$A" | tr '\n' ' ')"
