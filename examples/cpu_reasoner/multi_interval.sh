#!/usr/bin/env bash
# One beacon for several intervals (issue 20, item 4) on the long-chain task (cyclic_sum: 14-token prompt, 513-token
# chain): trains a single-interval beacon model per c and one multi-interval model (--interval 8,16,32), converts
# them, and evaluates through the runtime: the full cache, each single-interval model, the multi-interval model at
# each c (--beacon-interval C), and the multi-interval model in adaptive mode (--beacon-interval auto --kv-budget).
# Usage: examples/cpu_reasoner/multi_interval.sh     (from the repository root, venv active)
# Settings (environment): OUT, HF (a trained cyclic_sum reasoner; trained here when absent), MINUTES, N,
#   INTERVALS, BEACON_STEPS, BATCH, BEACON_LR, BEACON_ROW_LR, BUDGET_CELLS, THREADS, NICE.
# The defaults are the full evidence run (about 4 x 2.2 h of one CPU core at BEACON_STEPS=1000); the committed
# smoke run used BEACON_STEPS=4 BATCH=4 N=20 (docs/benchmarks_reasoner/multi_interval/README.md).
# Every step is skipped when its output exists, so a rerun resumes; trainings run one at a time.
set -euo pipefail

OUT=${OUT:-out/multi_interval}
HF=${HF:-$OUT/hf}
MINUTES=${MINUTES:-30}
N=${N:-200}
INTERVALS=${INTERVALS:-"8 16 32"}
BEACON_STEPS=${BEACON_STEPS:-1000}
BATCH=${BATCH:-8}
BEACON_LR=${BEACON_LR:-1e-3}
BEACON_ROW_LR=${BEACON_ROW_LR:-3e-3}
BUDGET_CELLS=${BUDGET_CELLS:-70}
THREADS=${THREADS:-1}
NICE=${NICE:-5}
PY=${PYTHON:-python}
TASK=cyclic_sum

KV=("$PY" -c 'import sys; from toolchain.cli import main; sys.argv[0] = "kvtool"; main()')
kv() { "${KV[@]}" "$@"; }

mkdir -p "$OUT/masks" "$OUT/gguf" "$OUT/eval"
G=$("$PY" -c 'from toolchain.tasks.cyclic_sum import COT_LEN; print(COT_LEN)')
MAXT=$((G + 8))

# 1. the reasoner (reused when $HF exists) and its full-cache GGUF
if [ ! -f "$HF/config.json" ]; then
    nice -n "$NICE" "$PY" -m toolchain.train.reasoner train --task "$TASK" --out "$(dirname "$HF")" \
        --minutes "$MINUTES" --threads "$THREADS" --eval-every 300 --eval-n 64
fi
BASE="$OUT/gguf/reasoner-f32.gguf"
if [ ! -f "$BASE" ]; then
    kv heads random --model "$HF" -s 0 --seed 0 --sink 4 --window 32 -o "$OUT/masks/full.json"
    kv convert "$HF" --mask "$OUT/masks/full.json" --outtype f32 -o "$BASE"
fi

train() {  # train NAME INTERVAL_SPEC
    local ck="$OUT/beacons/$1/model"
    if [ ! -f "$ck/kvtool.json" ]; then
        OMP_NUM_THREADS=$THREADS nice -n "$NICE" "${KV[@]}" train beacons --model "$HF" --task "$TASK" \
            --interval "$2" --steps "$BEACON_STEPS" --batch "$BATCH" --group 1 --max-new-tokens "$MAXT" --full \
            --lr "$BEACON_LR" --beacon-lr "$BEACON_ROW_LR" --lr-schedule cosine --warmup 20 --pool 8192 \
            --reuse-token 3 --out-dir "$OUT/beacons/$1" --resume -q
    fi
    [ -f "$OUT/gguf/beacons-$1.gguf" ] || kv convert "$ck" --outtype f32 -o "$OUT/gguf/beacons-$1.gguf"
}

# 2. one model per interval, then the multi-interval one (same steps, same batch: the same compute each)
MULTI=$(echo "$INTERVALS" | tr ' ' ',')
for c in $INTERVALS; do train "c$c" "$c"; done
train multi "$MULTI"

# 3. through the runtime, same problems, exact match on the whole chain
ev() { nice -n "$NICE" "${KV[@]}" eval "$@" --task "$TASK" --n "$N" --seed 0 --max-tokens "$MAXT" --ubatch 64 \
    --threads "$THREADS" -q; }
[ -f "$OUT/eval/full.json" ] || ev "$BASE" --variants full --out "$OUT/eval/full.json"
singles=()
for c in $INTERVALS; do singles+=("$OUT/gguf/beacons-c$c.gguf"); done
[ -f "$OUT/eval/single.json" ] || ev "${singles[@]}" --out "$OUT/eval/single.json"
for c in $INTERVALS; do
    [ -f "$OUT/eval/multi_c$c.json" ] || ev "$OUT/gguf/beacons-multi.gguf" --beacon-interval "$c" \
        --out "$OUT/eval/multi_c$c.json"
done
# adaptive: BUDGET_CELLS cells of the f16 cache (4 layers x K,V x 4 KV heads x 32 x 2 bytes = 2048 bytes per cell)
BUDGET=$((BUDGET_CELLS * 2048))
[ -f "$OUT/eval/multi_auto.json" ] || ev "$OUT/gguf/beacons-multi.gguf" --beacon-interval auto \
    --kv-budget "$BUDGET" --out "$OUT/eval/multi_auto.json"

# 4. one table
"$PY" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1]) / "eval"
rows = []
for f in ["full.json", "single.json"] + sorted(p.name for p in out.glob("multi_*.json")):
    for r in json.loads((out / f).read_text())["rows"]:
        rows.append((f, r))
print("| file | model | c | exact [95% CI] | token acc | peak cells | budget cells | switched |")
print("|---|---|---|---|---|---|---|---|")
for f, r in rows:
    lo, hi = r["ci95"]
    ta = (r.get("metrics") or {}).get("token_acc")
    print(f"| {f} | {r['model']} | {r.get('beacon_interval', '-')} | {r['accuracy']:.3f} [{lo:.3f}, {hi:.3f}] | "
          f"{'-' if ta is None else f'{ta:.4f}'} | {r['peak_live_cells']} | {r.get('budget_cells', '-')} | "
          f"{r.get('switched_frac', '-')} |")
EOF
