#!/usr/bin/env bash
# llama.cpp's own tests on the patched tree (docs/architecture.md §7 "peer suites"): a separate CMake build of the patched
# vendor/llama.cpp with LLAMA_BUILD_TESTS=ON. Written by others, so we cannot tune them to pass.
# Usage: bench/peer_tests.sh [MASKED_GGUF]   (needs `kvtool build-runtime` to have prepared the source tree)
set -euo pipefail
cache="${KVTOOL_CACHE:-$HOME/.cache/kvtool}"
src="$cache/src/cpu/llama_cpp_python-0.3.36/vendor/llama.cpp"
build="$cache/build/peer-tests"
[ -d "$src" ] || { echo "patched source tree missing: run kvtool build-runtime" >&2; exit 2; }
cmake -S "$src" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DLLAMA_BUILD_TESTS=ON -DLLAMA_BUILD_EXAMPLES=OFF \
      -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF >/dev/null
targets="test-llama-archs test-save-load-state test-batch-alloc test-backend-ops test-state-restore-fragmented test-recurrent-state-rollback"
cmake --build "$build" -j "$(nproc)" --target $targets
bin="$build/bin"
models="$build/test-models"
rm -rf "$models"; mkdir -p "$models"
status=0
cd "$build"  # some tests write files (dump_state.bin) into the working directory
run() { echo "== $*"; if "$@" > "$build/last.log" 2>&1; then echo "PASS $1"; else echo "FAIL $1 (see $build/last.log)"; tail -20 "$build/last.log"; status=1; fi; }
run "$bin/test-llama-archs"
run "$bin/test-llama-archs" -o "$models"
run "$bin/test-save-load-state" --models "$models"
run "$bin/test-recurrent-state-rollback" --models "$models"
run "$bin/test-batch-alloc"
# ggml is unpatched; check the ops the mixed graph adds (FLASH_ATTN_EXT alone runs > 5 min on 2 cores: left out)
for op in GET_ROWS CONCAT SET_ROWS SOFT_MAX; do run "$bin/test-backend-ops" -b CPU -o "$op"; done
if [ $# -ge 1 ]; then
  run "$bin/test-state-restore-fragmented" -m "$1"
fi
# llama-cpp-python's own tests against the installed patched build; those that download from the hub cannot run here
py="$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/python"
sdist_root="$cache/src/cpu/llama_cpp_python-0.3.36"
echo "== llama-cpp-python tests (offline)"
(cd "$sdist_root" && HF_HUB_OFFLINE=1 "$py" -P -m pytest tests -q -p no:cacheprovider --import-mode=importlib \
    --junitxml="$build/lcp.xml") > "$build/lcp.log" 2>&1 || true
tail -1 "$build/lcp.log"
# a failure counts unless its cause is a file that must come from the Hugging Face hub (no network here)
offline_fail=$("$py" - "$build/lcp.xml" <<'PY'
import sys, xml.etree.ElementTree as ET
bad = 0
for case in ET.parse(sys.argv[1]).getroot().iter("testcase"):
    for tag in ("failure", "error"):
        for el in case.findall(tag):
            text = (el.get("message") or "") + (el.text or "")
            if "LocalEntryNotFoundError" not in text:
                bad += 1
                print(case.get("name"), file=sys.stderr)
print(bad)
PY
)
if [ "$offline_fail" = "0" ]; then echo "PASS llama-cpp-python offline tests"; else echo "FAIL llama-cpp-python offline tests"; status=1; fi
exit $status
