"""Gemma-3-270M KV memory at 16K (issue 19): stock with swa_full off/on, and mixed with 2 of 3 global heads
compressed (S=16, W=64), each measured by kvtool_kv_bytes after a load and checked against the prediction.

    .venv/bin/python bench/gemma3_memory.py [--ctx 16384] [--ubatch 512]
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from converters.convert import convert_model
from toolchain.heads import random_mask
from toolchain.models_gemma3 import fetch_gemma3
from toolchain.runtime.memory import dims_from_gguf
from toolchain.runtime.model import Model
from toolchain.swa_mask import restrict_to_global


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ctx", type=int, default=16384)
    ap.add_argument("--ubatch", type=int, default=512)
    a = ap.parse_args()
    src = fetch_gemma3(print)
    dims = dims_from_gguf(src)
    mask = random_mask(dims.n_layer, dims.n_head_kv[0], 0.67, seed=0, sink=16, window=64)
    mask, note = restrict_to_global(mask, [dims.swa_layer(i) for i in range(dims.n_layer)])
    print(note)
    with tempfile.TemporaryDirectory() as tmp:
        mixed = convert_model(src, mask, Path(tmp) / "gemma3-mixed.gguf")
        rows = []
        for name, path, swa_full in (("stock, swa_full off", src, False), ("stock, swa_full on", src, True),
                                     ("mixed, swa_full off", mixed, False), ("mixed, swa_full on", mixed, True)):
            with Model.load(path, n_ctx=a.ctx, n_ubatch=a.ubatch, swa_full=swa_full, flash_attn=True) as m:
                st = m.kv_stats()
            assert st["allocated_bytes"] == st["predicted_bytes"], st
            rows.append((name, st["allocated_bytes"], st["predicted_bytes"]))
    base = rows[0][1]
    print(f"| Gemma-3-270M @ {a.ctx}, ubatch {a.ubatch}, f16, FA on | measured KV | predicted | vs stock swa_full off |")
    print("|---|---|---|---|")
    for name, got, pred in rows:
        print(f"| {name} | {got / 2**20:.2f} MiB ({got} B) | {pred / 2**20:.2f} MiB | {got / base:.3f}x |")


if __name__ == "__main__":
    main()
