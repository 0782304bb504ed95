#!/usr/bin/env bash
# Developer loop for the C++ side: sync patches/ + cpp/ into the persistent build tree and rebuild only libllama
# with CMake (seconds), then copy the library over the installed one. `kvtool build-runtime` remains the real path.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
py="$here/.venv/bin/python"
"$py" - <<'PY'
from toolchain.runtime.build import patch_hash, prepare_tree
from toolchain.sdist import fetch_sdist
prepare_tree(fetch_sdist(print), patch_hash(), "cpu", False, print)
PY
build="${KVTOOL_CACHE:-$HOME/.cache/kvtool}/build/cpu"
cmake --build "$build" --target llama -j "$(nproc)" 2>&1 | grep -E "error|warning: unused|Linking|^ninja: build stopped" || true
lib=$(find "$build" -name 'libllama.so*' -type f | head -1)
site=$("$py" -c 'import llama_cpp, os; print(os.path.dirname(llama_cpp.__file__))')
for n in libllama.so libllama.so.0 libllama.so.0.5.0; do cp "$lib" "$site/lib/$n"; done
echo "installed $lib -> $site/lib/libllama.so"
