#!/usr/bin/env bash
# The CPU reasoner end to end: train -> HF dir -> GGUF (+ masks) -> kvtool eval, full vs masks.
# Usage: examples/cpu_reasoner/run.sh            (from the repository root, venv active)
# Settings (environment): OUT, MINUTES, N, SINK, WINDOW, SPARSITIES, SEEDS, ORACLE=1, RLKV=1, RLKV_STEPS, THREADS,
#   BEACONS=1, INTERVALS, BEACON_STEPS (beacon training per interval + equal-memory window baselines, step 6).
# Every step is skipped when its output exists, so a rerun resumes; delete $OUT to start over.
set -euo pipefail

OUT=${OUT:-out/cpu_reasoner}
MINUTES=${MINUTES:-28}          # training budget, wall clock (the cosine schedule runs over it)
N=${N:-200}                     # eval problems per model
SINK=${SINK:-4}
WINDOW=${WINDOW:-32}
SPARSITIES=${SPARSITIES:-"0.25 0.5 0.75"}
SEEDS=${SEEDS:-"0 1 2"}         # random masks per sparsity
ORACLE=${ORACLE:-1}             # labelled per-head sensitivity mask (seconds)
RLKV=${RLKV:-0}                 # kvtool train heads on the task (long on CPU)
RLKV_STEPS=${RLKV_STEPS:-600}
BEACONS=${BEACONS:-0}           # kvtool train beacons per interval, then beacons vs window baselines (long on CPU)
INTERVALS=${INTERVALS:-"4 8 16 32"}
BEACON_STEPS=${BEACON_STEPS:-500}
THREADS=${THREADS:-2}          # runtime eval threads
TRAIN_THREADS=${TRAIN_THREADS:-0}  # torch threads; 0 = auto (1 vs 2, re-probed: the machine is shared)
PY=${PYTHON:-python}

# kvtool with the reasoner's task registered (kvtool train heads --task long_addition needs it)
KV=("$PY" -c 'import sys; from toolchain.cli import main; sys.argv[0] = "kvtool"; main()')
kv() { "${KV[@]}" "$@"; }
kv_eval() {  # `kvtool eval` once cli.py registers it; the command object directly until then
    if kv eval --help >/dev/null 2>&1; then kv eval "$@"; else
        "$PY" -c 'import sys; from toolchain.cli import main; from toolchain.commands.eval import eval_cmd
from toolchain.cli import cli; cli.add_command(eval_cmd); sys.argv[0] = "kvtool"; main()' eval "$@"
    fi
}

mkdir -p "$OUT/masks" "$OUT/gguf"
HF="$OUT/hf"
BASE="$OUT/gguf/reasoner-f32.gguf"

# 1. train from scratch (nice: the machine is shared)
if [ ! -f "$OUT/train.json" ]; then
    nice -n 19 "$PY" -m toolchain.train.reasoner train --out "$OUT" --minutes "$MINUTES" --threads "$TRAIN_THREADS" \
        --eval-every 400
fi

# 2. HF -> F32 GGUF with all heads full (a sparsity-0 mask: budgets written, nothing compressed)
if [ ! -f "$BASE" ]; then
    kv heads random --model "$HF" -s 0 --seed 0 --sink "$SINK" --window "$WINDOW" -o "$OUT/masks/full.json"
    kv convert "$HF" --mask "$OUT/masks/full.json" --outtype f32 -o "$BASE"
fi

# 3. masks: random baselines at each sparsity, the labelled oracle, optionally RLKV
MODELS=("$BASE")
for s in $SPARSITIES; do
    for seed in $SEEDS; do
        m="$OUT/masks/random-s$s-seed$seed.json"; g="$OUT/gguf/random-s$s-seed$seed.gguf"
        [ -f "$m" ] || kv heads random --model "$BASE" -s "$s" --seed "$seed" --sink "$SINK" --window "$WINDOW" -o "$m"
        [ -f "$g" ] || kv convert "$BASE" --mask "$m" -o "$g"
        MODELS+=("$g")
    done
done
if [ "$ORACLE" = 1 ]; then
    [ -f "$OUT/masks/oracle.json" ] || "$PY" -m toolchain.train.reasoner oracle "$HF" --sink "$SINK" \
        --window "$WINDOW" --threads "$THREADS" -o "$OUT/masks/oracle.json" >/dev/null
    for s in $SPARSITIES; do
        g="$OUT/gguf/oracle-s$s.gguf"
        [ -f "$g" ] || kv convert "$BASE" --mask "$OUT/masks/oracle.json" --sparsity "$s" -o "$g"
        MODELS+=("$g")
    done
fi
if [ "$RLKV" = 1 ]; then
    R="$OUT/masks/rlkv-$RLKV_STEPS.json"
    if [ ! -f "$R" ]; then
        # one torch thread: on the loaded 2-core machine float32 steps took 12.8 s with 2 threads, 2.7 s with 1.
        # --resume: a longer RLKV_STEPS continues the last run (bit for bit the same as running it in one go)
        OMP_NUM_THREADS=${RLKV_THREADS:-1} nice -n 19 "${KV[@]}" train heads --model "$HF" --task long_addition --sink "$SINK" --window "$WINDOW" \
            --max-new-tokens 210 --steps "$RLKV_STEPS" --batch 4 --group 4 --pool 64 --out-dir "$OUT/rlkv" --resume \
            -o "$R" -q
    fi
    for s in $SPARSITIES; do
        g="$OUT/gguf/rlkv$RLKV_STEPS-s$s.gguf"
        [ -f "$g" ] || kv convert "$BASE" --mask "$R" --sparsity "$s" -o "$g"
        MODELS+=("$g")
    done
fi

# 4. accuracy vs KV memory through the runtime (resumable: records in eval.jsonl)
kv_eval "${MODELS[@]}" --task long_addition --n "$N" --seed 0 --max-tokens 210 --ubatch 64 \
    --threads "$THREADS" --out "$OUT/eval.json" --plot "$OUT/pareto.png"

# 5. fidelity without labels: perplexity and KL(full || mixed) over 100 held-out sequences
[ -f "$OUT/sequences.txt" ] || "$PY" -m toolchain.train.reasoner text "$OUT/sequences.txt" --n 100 >/dev/null
PPL_MODELS=()
for s in $SPARSITIES; do
    PPL_MODELS+=("$OUT/gguf/random-s$s-seed0.gguf")
    [ "$ORACLE" = 1 ] && PPL_MODELS+=("$OUT/gguf/oracle-s$s.gguf")
    [ "$RLKV" = 1 ] && PPL_MODELS+=("$OUT/gguf/rlkv$RLKV_STEPS-s$s.gguf")
done
kv_eval "${PPL_MODELS[@]}" --ppl "$OUT/sequences.txt" --n-ctx 278 --ubatch 64 --threads "$THREADS" \
    --out "$OUT/ppl.json" -q

# 6. beacons: one distillation run per interval c, converted to GGUF, evaluated next to training-free baselines that
#    keep the same number of cells (every head: sink 4 + window, sliding window only, sink = the prompt + window),
#    and the full cache.
#    '#' (id 3) is the vocabulary's reserved beacon character: never in the training data, so it is reused.
if [ "$BEACONS" = 1 ]; then
    BMODELS=("$BASE")
    P=$("$PY" -c 'from toolchain.tasks.long_addition import PROMPT_LEN; print(PROMPT_LEN)')
    G=$("$PY" -c 'from toolchain.tasks.long_addition import COT_LEN; print(COT_LEN)')
    for c in $INTERVALS; do
        ck="$OUT/beacons/c$c/model"
        if [ ! -f "$ck/kvtool.json" ]; then
            OMP_NUM_THREADS=${BEACON_THREADS:-1} nice -n 19 "${KV[@]}" train beacons --model "$HF" --task long_addition \
                --interval "$c" --steps "$BEACON_STEPS" --batch 8 --group 1 --max-new-tokens 210 --full --lr 3e-4 \
                --reuse-token 3 --out-dir "$OUT/beacons/c$c" -q
        fi
        g="$OUT/gguf/beacons-c$c.gguf"
        [ -f "$g" ] || kv convert "$ck" --outtype f32 -o "$g"
        BMODELS+=("$g")
        # the beacon loop's peak live cells: prompt + ceil(G / c) beacons + one open chunk
        cells=$(( P + (G + c - 1) / c + c ))
        for sink in 4 0 "$P"; do  # StreamingLLM (S=4), sliding window (S=0), and a sink that holds the whole prompt
            m="$OUT/masks/window-S$sink-W$((cells - sink)).json"; g="$OUT/gguf/window-S$sink-W$((cells - sink)).gguf"
            [ -f "$m" ] || kv heads random --model "$BASE" -s 1 --seed 0 --sink "$sink" --window $((cells - sink)) -o "$m"
            [ -f "$g" ] || kv convert "$BASE" --mask "$m" -o "$g"
            BMODELS+=("$g")
        done
    done
    # beacons together with the mixed per-head cache: c = 8 distilled under the RLKV s = 0.5 mask (--mask), converted
    # with the same mask, so the file runs exactly the rule it was trained under
    if [ "$RLKV" = 1 ]; then
        R="$OUT/masks/rlkv-$RLKV_STEPS.json"; ck="$OUT/beacons/c8mask/model"
        [ -f "$ck/kvtool.json" ] || OMP_NUM_THREADS=${BEACON_THREADS:-1} nice -n 19 "${KV[@]}" train beacons \
            --model "$HF" --task long_addition --interval 8 --steps "$BEACON_STEPS" --batch 8 --group 1 \
            --max-new-tokens 210 --full --lr 3e-4 --reuse-token 3 --mask "$R" --out-dir "$OUT/beacons/c8mask" -q
        g="$OUT/gguf/beacons-c8-rlkv$RLKV_STEPS-s0.5.gguf"
        [ -f "$g" ] || kv convert "$ck" --mask "$R" --sparsity 0.5 --outtype f32 -o "$g"
        BMODELS+=("$g")
    fi
    kv_eval "${BMODELS[@]}" --task long_addition --n "$N" --seed 0 --max-tokens 210 --ubatch 64 \
        --threads "$THREADS" --out "$OUT/eval_beacons.json" --plot "$OUT/pareto_beacons.png"
fi
