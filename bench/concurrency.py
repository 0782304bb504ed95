#!/usr/bin/env python3
"""Memory becomes concurrency (issue 18): aggregate decode tok/s of N parallel sequences at equal KV memory.

Over llama.cpp's own ``llama-batched-bench`` (patched build, ``kvtool tools``), so the decode loop is upstream's:
1. mixed: ``--mixed-seqs`` sequences of ``--depth`` prompt tokens (+ ``--tg`` decoded), one KV stream each;
2. the KV bytes mixed allocated (read from llama.cpp's own log, checked against ``runtime.memory.predict``);
3. stock (``--override-kv kvtool.kv.enabled=bool:false``, same file) gets the most sequences whose stock cache fits
   in those bytes, and runs the same depth and decode length;
4. report sequences and aggregate decode tok/s (batched-bench's S_TG: all sequences' tokens / decode time), and
   their ratios. The shared prompt (``-pps``) is prefilled once and copied to every sequence, so the run time goes to
   the decode phase being compared.

Usage: bench/concurrency.py MODEL [--depth 16384] [--tg 32] [--mixed-seqs 8] [--ubatch 128] [--threads 2]
                              [--json OUT.json]
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from converters.gguf_budgets import read_budgets  # noqa: E402
from toolchain.commands.llama_server import parse_kv_log  # noqa: E402
from toolchain.runtime.memory import dims_from_gguf, predict  # noqa: E402
from toolchain.runtime.tools import tool_path  # noqa: E402

_ROW = re.compile(r"^\{.*\"speed_tg\".*\}$", re.M)


def run_batched(model: str, n_seq: int, depth: int, tg: int, ubatch: int, threads: int, stock: bool) -> dict:
    exe = str(tool_path("llama-batched-bench"))
    cmd = [exe, "-m", model, "-c", str(n_seq * (depth + tg)), "-b", "2048", "-ub", str(ubatch), "-npp", str(depth),
           "-ntg", str(tg), "-npl", str(n_seq), "-pps", "-fa", "on", "-t", str(threads), "-tb", str(threads),
           "--no-kv-unified", "--output-format", "jsonl", "-ngl", "0", "-lv", "4"]
    if stock:
        cmd += ["--override-kv", "kvtool.kv.enabled=bool:false"]
    t0 = time.time()
    res = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.time() - t0
    log = res.stdout + res.stderr
    if res.returncode != 0:
        raise SystemExit(f"llama-batched-bench failed ({res.returncode}): {log[-2000:]}")
    rows = [json.loads(m.group(0)) for m in _ROW.finditer(log)]
    if len(rows) != 1:
        raise SystemExit(f"expected one result row, got {len(rows)}: {log[-2000:]}")
    kv = parse_kv_log(log)
    return {"variant": "stock" if stock else "mixed", "sequences": n_seq, "kv_bytes": kv.allocated_bytes,
            "kv_buffers": kv.buffers, "decode_tok_s": rows[0]["speed_tg"], "prefill_tok_s": rows[0]["speed_pp"],
            "t_tg_s": rows[0]["t_tg"], "t_pp_s": rows[0]["t_pp"], "wall_s": round(wall, 1), "cmd": " ".join(cmd)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--depth", type=int, default=16384, help="prompt tokens per sequence")
    ap.add_argument("--tg", type=int, default=32, help="decoded tokens per sequence")
    ap.add_argument("--mixed-seqs", type=int, default=8)
    ap.add_argument("--ubatch", type=int, default=128, help="smaller rings: W + S + ubatch cells, padded to 256")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", dest="json_out", default=None)
    a = ap.parse_args()

    dims, b = dims_from_gguf(a.model), read_budgets(a.model)
    if b is None or not b.enabled:
        raise SystemExit(f"{a.model} has no enabled kvtool budgets")
    ctx_seq = a.depth + a.tg

    def plan(n: int, mixed: bool):
        return predict(dims, b.head_window if mixed else None, b.sink, n * ctx_seq, a.ubatch, n, "f16", "f16", True,
                       unified=False, mixed=mixed)

    mixed_pred = plan(a.mixed_seqs, True).mixed_bytes
    n_stock = max((n for n in range(1, 4 * a.mixed_seqs + 1) if plan(n, False).stock_bytes <= mixed_pred), default=0)
    if n_stock < 1:
        raise SystemExit("not even one stock sequence fits in the mixed cache's bytes")
    mixed = run_batched(a.model, a.mixed_seqs, a.depth, a.tg, a.ubatch, a.threads, stock=False)
    stock = run_batched(a.model, n_stock, a.depth, a.tg, a.ubatch, a.threads, stock=True)
    out = {"model": a.model, "depth": a.depth, "tg": a.tg, "ubatch": a.ubatch, "threads": a.threads,
           "predicted_mixed_bytes": mixed_pred, "predicted_stock_bytes": plan(n_stock, False).stock_bytes,
           "mixed": mixed, "stock": stock,
           "sequences_ratio": mixed["sequences"] / stock["sequences"],
           "decode_ratio": mixed["decode_tok_s"] / stock["decode_tok_s"],
           "kv_bytes_ratio": mixed["kv_bytes"] / stock["kv_bytes"]}
    print("| variant | sequences | KV bytes (log) | aggregate decode tok/s | prefill tok/s |")
    print("|---|---|---|---|---|")
    for r in (stock, mixed):
        print(f"| {r['variant']} | {r['sequences']} | {r['kv_bytes'] / 2**20:.1f} MiB | {r['decode_tok_s']:.1f} | "
              f"{r['prefill_tok_s']:.1f} |")
    print(f"mixed/stock: {out['sequences_ratio']:.2f}x sequences, {out['decode_ratio']:.2f}x aggregate decode, "
          f"{out['kv_bytes_ratio']:.3f}x KV bytes")
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
