#!/usr/bin/env python3
"""llama.cpp's own ``llama-bench`` (patched build) on one kvtool file, stock vs mixed (issue 18, docs/benchmarks.md).

llama-bench has no ``--override-kv`` (llama-server, llama-cli, llama-perplexity and llama-batched-bench do), so the
stock side is a copy of the file that differs only in ``kvtool.kv.enabled = false``: the same tensors and the same
budgets, the key the override would set. Both files go to one llama-bench run, which prints its own Markdown table.

Usage: bench/llama_bench.py MODEL [--depth 4096,16384] [--pp 512] [--tg 32] [--reps 3] [--ubatch 512] [--threads 2]
                             [--json OUT.json]
``--json``: llama-bench's own rows (its ``-oe jsonl`` on stderr) as a JSON list, the files named by base name only.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from converters.gguf_budgets import T_BOOL, Value, rewrite_gguf  # noqa: E402
from toolchain.gguf_keys import K_ENABLED  # noqa: E402
from toolchain.runtime.tools import tool_path  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--depth", default="4096,16384")
    ap.add_argument("--pp", type=int, default=512)
    ap.add_argument("--tg", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--ubatch", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", dest="json_out", default=None)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="kvtool-llama-bench-") as d:
        stock = Path(d) / ("stock-" + Path(a.model).name)
        rewrite_gguf(a.model, stock, {K_ENABLED: Value(T_BOOL, False)}, drop=lambda k: k == K_ENABLED)
        cmd = [str(tool_path("llama-bench")), "-m", str(stock), "-m", a.model, "-d", a.depth, "-p", str(a.pp),
               "-n", str(a.tg), "-r", str(a.reps), "-ub", str(a.ubatch), "-fa", "1", "-t", str(a.threads),
               "-ngl", "0", "-o", "md"]
        print("$ " + " ".join(cmd), flush=True)
        if not a.json_out:
            sys.exit(subprocess.run(cmd).returncode)
        res = subprocess.run(cmd + ["-oe", "jsonl"], stderr=subprocess.PIPE, text=True)
        rows = []
        for line in res.stderr.splitlines():
            if line.startswith("{"):
                row = json.loads(line)
                row["model_filename"] = Path(row.get("model_filename", "")).name
                rows.append(row)
            else:
                print(line, file=sys.stderr)
        if res.returncode == 0:
            Path(a.json_out).write_text(json.dumps(rows, indent=1) + "\n")
        sys.exit(res.returncode)


if __name__ == "__main__":
    main()
