#!/usr/bin/env bash
# Beacons where they pay: the long-chain task (cyclic_sum: 14-token prompt, 513-token chain). Trains the reasoner
# on it, trains beacons at each interval, converts both to GGUF and evaluates them through the runtime next to
# training-free baselines that keep the same number of cells (sink 4 + window, sliding window, sink = the prompt).
# Usage: examples/cpu_reasoner/long_chain.sh     (from the repository root, venv active)
# Settings (environment): OUT, MINUTES, N, INTERVALS, BEACON_STEPS, BEACON_LR, BEACON_ROW_LR, THREADS.
# The defaults are those of the measured run (docs/benchmarks_reasoner.md), except that it reached its 1000 steps in
# two legs: 400 steps of cosine to 0, then --resume --steps 1000 (the cosine restarted at 0.67 of the peak).
# Every step is skipped when its output exists, so a rerun resumes; delete $OUT to start over.
set -euo pipefail

OUT=${OUT:-out/cyclic}
MINUTES=${MINUTES:-30}          # reasoner training budget, wall clock
N=${N:-200}                     # eval problems per model
INTERVALS=${INTERVALS:-"16"}
BEACON_STEPS=${BEACON_STEPS:-1000}
BEACON_LR=${BEACON_LR:-1e-3}
BEACON_ROW_LR=${BEACON_ROW_LR:-3e-3}
THREADS=${THREADS:-2}
PY=${PYTHON:-python}
TASK=cyclic_sum

KV=("$PY" -c 'import sys; from toolchain.cli import main; sys.argv[0] = "kvtool"; main()')
kv() { "${KV[@]}" "$@"; }

mkdir -p "$OUT/masks" "$OUT/gguf"
HF="$OUT/hf"
BASE="$OUT/gguf/reasoner-f32.gguf"
P=$("$PY" -c 'from toolchain.tasks.cyclic_sum import PROMPT_LEN; print(PROMPT_LEN)')
G=$("$PY" -c 'from toolchain.tasks.cyclic_sum import COT_LEN; print(COT_LEN)')

# 1. the reasoner, trained from scratch on the task
[ -f "$OUT/train.json" ] || nice -n 19 "$PY" -m toolchain.train.reasoner train --task "$TASK" --out "$OUT" \
    --minutes "$MINUTES" --threads "$THREADS" --eval-every 300 --eval-n 64
if [ ! -f "$BASE" ]; then  # all heads full: a sparsity-0 mask (budgets written, nothing compressed)
    kv heads random --model "$HF" -s 0 --seed 0 --sink 4 --window 32 -o "$OUT/masks/full.json"
    kv convert "$HF" --mask "$OUT/masks/full.json" --outtype f32 -o "$BASE"
fi

# 2. beacons per interval ('#', id 3, is the vocabulary's reserved beacon character: never in the data, so reused),
#    then the equal-memory baselines: the beacon loop peaks at prompt + ceil(G / c) beacons + one open chunk
MODELS=("$BASE")
for c in $INTERVALS; do
    ck="$OUT/beacons/c$c/model"
    if [ ! -f "$ck/kvtool.json" ]; then
        OMP_NUM_THREADS=$THREADS nice -n 19 "${KV[@]}" train beacons --model "$HF" --task "$TASK" --interval "$c" \
            --steps "$BEACON_STEPS" --batch 8 --group 1 --max-new-tokens $((G + 8)) --full --lr "$BEACON_LR" --beacon-lr "$BEACON_ROW_LR" \
            --lr-schedule cosine --warmup 20 --pool 8192 --reuse-token 3 --out-dir "$OUT/beacons/c$c" --resume -q
    fi
    g="$OUT/gguf/beacons-c$c.gguf"
    [ -f "$g" ] || kv convert "$ck" --outtype f32 -o "$g"
    MODELS+=("$g")
    cells=$(( P + (G + c - 1) / c + c ))
    for sink in 4 0 "$P"; do
        m="$OUT/masks/window-S$sink-W$((cells - sink)).json"; g="$OUT/gguf/window-S$sink-W$((cells - sink)).gguf"
        [ -f "$m" ] || kv heads random --model "$BASE" -s 1 --seed 0 --sink "$sink" --window $((cells - sink)) -o "$m"
        [ -f "$g" ] || kv convert "$BASE" --mask "$m" -o "$g"
        MODELS+=("$g")
    done
done

# 3. everything through the runtime, same problems, exact match on the whole chain
kv eval "${MODELS[@]}" --task "$TASK" --n "$N" --seed 0 --max-tokens $((G + 8)) --ubatch 64 --threads "$THREADS" \
    --out "$OUT/eval_beacons.json" --plot "$OUT/pareto_beacons.png"
