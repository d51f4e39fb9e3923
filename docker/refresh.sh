#!/bin/sh
# Offline refresh, once or on a schedule: `python -m offline_worker refresh` for this worker's shard.
#   REFRESH_INTERVAL_S=0 (default)  run once and exit with the refresh's status (one-shot `refresh` service)
#   REFRESH_INTERVAL_S=N            run, then start the next run N seconds after this one started; a failed
#                                   run is logged and retried at the next tick (a refresh resumes where it
#                                   stopped, so nothing is recomputed)
#   REFRESH_SHARD=i/N               this worker's part of the version (default 0/1); the last shard to
#                                   finish verifies the version and flips `current`
#   REFRESH_ARGS                    extra flags for `refresh`, e.g. "--users changed --engine hf"
#   REFRESH_FULL_EVERY=K            with an interval: a full refresh (new version) every K-th run, starting
#                                   with the first; the runs between are incremental (`refresh
#                                   --incremental`, stale users only, into the live version; shard 0/1
#                                   only, other shards skip them). Default 1: every run is a full refresh
#   REFRESH_INCREMENTAL_ARGS        flags of the incremental runs (default: ONEREC_REFRESH_MIN_STALENESS)
# Every other setting is an ONEREC_* environment variable (services/config.py).
set -eu

PY="${PYTHON:-python3}"
interval="${REFRESH_INTERVAL_S:-0}"
shard="${REFRESH_SHARD:-0/1}"
full_every="${REFRESH_FULL_EVERY:-1}"

case "$interval" in
  ''|*[!0-9]*) echo "[refresh] REFRESH_INTERVAL_S must be a whole number of seconds, got '$interval'" >&2; exit 2 ;;
esac
case "$full_every" in
  ''|0|*[!0-9]*) echo "[refresh] REFRESH_FULL_EVERY must be a whole number >= 1, got '$full_every'" >&2; exit 2 ;;
esac

stop=0
child=""
run=0
# as PID 1 the shell gets `docker stop`'s SIGTERM: pass it on to the running refresh (which resumes
# later) or sleep
trap 'stop=1; if [ -n "$child" ]; then kill -TERM "$child" 2>/dev/null || true; fi' TERM INT

while :; do
  started=$(date +%s)
  if [ $((run % full_every)) -eq 0 ]; then
    echo "[refresh] $(date -u +%Y-%m-%dT%H:%M:%SZ) shard $shard: starting"
    # shellcheck disable=SC2086  # REFRESH_ARGS is a list of flags
    "$PY" -m offline_worker refresh --shard "$shard" --no-progress ${REFRESH_ARGS:-} &
    child=$!
  elif [ "$shard" = "0/1" ]; then
    echo "[refresh] $(date -u +%Y-%m-%dT%H:%M:%SZ) incremental: starting"
    # shellcheck disable=SC2086  # REFRESH_INCREMENTAL_ARGS is a list of flags
    "$PY" -m offline_worker refresh --incremental --no-progress ${REFRESH_INCREMENTAL_ARGS:-} &
    child=$!
  else
    true &  # incremental runs belong to one worker: the other shards wait for the next full refresh
    child=$!
  fi
  run=$((run + 1))
  rc=0
  # `wait` returns early when a trapped signal arrives: wait again until the refresh has really exited
  while :; do
    wait "$child" && rc=0 || rc=$?
    kill -0 "$child" 2>/dev/null || break
  done
  child=""
  echo "[refresh] $(date -u +%Y-%m-%dT%H:%M:%SZ) shard $shard: finished with status $rc"
  if [ "$interval" -eq 0 ]; then
    exit "$rc"
  fi
  [ "$stop" -eq 1 ] && exit 0
  wait_s=$((started + interval - $(date +%s)))
  [ "$wait_s" -lt 1 ] && wait_s=1
  echo "[refresh] next run in ${wait_s}s"
  # sleep in the background so that a SIGTERM ends the wait (and the sleep) at once
  sleep "$wait_s" &
  child=$!
  wait "$child" || true
  child=""
  [ "$stop" -eq 1 ] && exit 0
done
