#!/usr/bin/env bash
# The one prepared CUDA check of issue 15, for a machine with an NVIDIA GPU, nvcc, CMake and ~16 cores but no
# network. Two steps, from the repository root:
#
#   bench/gpu_check.sh prepare [DIR]       # here, with network; DIR defaults to gpu_pack/ (git-ignored)
#   bench/gpu_check.sh run [DIR] [OUT]     # there; OUT defaults to out/gpu_check/
#
# prepare: the pruned, pre-patched CUDA source archive (`kvtool build-runtime --export-source`, < 60 MiB), a wheelhouse
#   of kvtool's small pure-Python dependencies, and a skeleton of the bench model (SmolLM2-135M Q4_1, random half of
#   the 90 KV heads compressed, S=16, W=64; header only, see bench/gguf_skeleton.py).
# run: builds the CUDA runtime for the native arch with plain CMake (no pip, no download), runs
#   tests/test_gpu_vulkan.py on CUDA (parity needs torch+transformers on that machine and is skipped without them;
#   identity, KV placement, split count and test-backend-ops need only the runtime), then
#   `kvtool bench --gpu-layers all --ctx 4096,16384,32768 --json` on the inflated model, and writes everything into
#   OUT (log.txt, build.txt, tests.txt, bench.json, bench.md, env.txt). Budget: under 9 minutes on 16 cores; each
#   phase prints its elapsed time.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
mode=${1:-}
DIR=${2:-gpu_pack}
ARCHIVE=$DIR/kvtool-src-cuda.tar.gz
SKEL=$DIR/smol-s05.skel
DEPS="numpy gguf click tqdm diskcache jinja2 MarkupSafe typing-extensions pytest pytest-timeout"

stamp() { echo "[gpu_check] $(( $(date +%s) - T0 ))s: $*"; }

if [ "$mode" = prepare ]; then
    T0=$(date +%s)
    KV=${KVTOOL:-.venv/bin/kvtool}
    PY=${PYTHON:-.venv/bin/python}
    mkdir -p "$DIR/wheels"
    "$KV" build-runtime --backend cuda --export-source "$ARCHIVE"
    "$PY" -m pip download -q -d "$DIR/wheels" --only-binary :all: $DEPS
    model=$("$KV" fetch smollm2)
    "$KV" heads random --model "$model" --sparsity 0.5 --seed 0 --sink 16 --window 64 -o "$DIR/h.json"
    "$KV" convert "$model" --mask "$DIR/h.json" -o "$DIR/smol-s05.gguf"
    "$PY" bench/gguf_skeleton.py strip "$DIR/smol-s05.gguf" "$SKEL"
    rm -f "$DIR/smol-s05.gguf"
    du -sh "$DIR" "$ARCHIVE"
    stamp "prepared $DIR (carry it to the GPU machine with the repository)"
    exit 0
fi
if [ "$mode" != run ]; then
    echo "usage: bench/gpu_check.sh prepare [DIR] | run [DIR] [OUT]" >&2
    exit 2
fi

OUT=${3:-out/gpu_check}
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
T0=$(date +%s)
for tool in nvcc cmake python3; do
    command -v $tool >/dev/null || { echo "gpu_check: error: $tool not found" >&2; exit 1; }
done
[ -f "$ARCHIVE" ] || { echo "gpu_check: error: $ARCHIVE missing (run 'bench/gpu_check.sh prepare' first)" >&2; exit 1; }
JOBS=$(nproc)
{ nvidia-smi || true; nvcc --version; cmake --version | head -1; python3 --version; echo "cores: $JOBS"; } > "$OUT/env.txt" 2>&1
stamp "environment in $OUT/env.txt"

# Python: a venv that sees the machine's packages (torch, if any), plus the carried wheels.
VENV=$DIR/venv
[ -x "$VENV/bin/python" ] || python3 -m venv --system-site-packages "$VENV"
PY=$VENV/bin/python
if [ -d "$DIR/wheels" ]; then
    "$PY" -m pip install -q --no-index --find-links "$DIR/wheels" $DEPS || echo "[gpu_check] some wheels did not install; using what the machine has"
fi

# Build: the exported tree with kvtool's CMake arguments, the native arch, all cores.
WORK=$(mktemp -d /tmp/gpu_check.XXXXXX)
tar xzf "$ARCHIVE" -C "$WORK"
PROJ=$(echo "$WORK"/llama_cpp_python-*)
mapfile -t ARGS < <("$PY" -c "import json,sys; print('\n'.join(json.load(open(sys.argv[1]))['cmake_args']))" "$PROJ/kvtool_export.json")
GEN=(); command -v ninja >/dev/null && GEN=(-G Ninja)
stamp "configuring (${ARGS[*]})"
{
    cmake -S "$PROJ" -B "$WORK/build" "${GEN[@]}" -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=native \
          "${ARGS[@]}"
    cmake --build "$WORK/build" -j "$JOBS"
    cmake --install "$WORK/build" --prefix "$WORK/prefix"
} > "$OUT/build.txt" 2>&1 || { tail -30 "$OUT/build.txt"; echo "gpu_check: error: CUDA build failed (see $OUT/build.txt)" >&2; exit 1; }
stamp "CUDA runtime built into $PROJ/llama_cpp/lib"

export PYTHONPATH=$PROJ:$REPO
export KVTOOL_LLAMA_CPP_SRC=$PROJ/vendor/llama.cpp   # test-backend-ops is compiled from the same tree
export KVTOOL_CACHE=$WORK/cache
kvtool() { "$PY" -c 'import sys; from toolchain.cli import main; sys.argv[0] = "kvtool"; main()' "$@"; }
kvtool doctor > "$OUT/doctor.txt" 2>&1 || true
"$PY" -c "from toolchain.runtime.library import runtime_info as r; i = r(); print(i); raise SystemExit(0 if i['backend'] == 'cuda' else 1)" \
    || { echo "gpu_check: error: the built runtime does not load as kvtool's CUDA build" >&2; exit 1; }

stamp "tests on CUDA"
set +e
"$PY" -m pytest -q -m vulkan -p no:cacheprovider tests/test_gpu_vulkan.py > "$OUT/tests.txt" 2>&1
tests_rc=$?
set -e
tail -3 "$OUT/tests.txt"
stamp "tests done (exit $tests_rc)"

if [ -f "$SKEL" ]; then
    "$PY" bench/gguf_skeleton.py inflate "$SKEL" "$WORK/smol-s05.gguf"
    kvtool bench "$WORK/smol-s05.gguf" --gpu-layers all --ctx 4096,16384,32768 --variants stock,mixed \
        --repeats 3 --json --md "$OUT/bench.md" > "$OUT/bench.json"
    "$PY" bench/gpu_splits.py "$WORK/smol-s05.gguf" --gpu-layers all --ctx 16384 > "$OUT/splits.json"
    stamp "bench done"
else
    echo "[gpu_check] no $SKEL: bench skipped"
fi
rm -rf "$WORK"
stamp "finished; results in $OUT"
exit $tests_rc
