"""The GPU table's structural columns for one model and context: graph split counts (stock vs mixed), where the
KV buffers live, and the measured KV bytes against the documented formula (docs/memory.md).

Why a separate script: `kvtool bench` measures speed; these columns come from context creation alone (the split
count is read from llama.cpp's log, toolchain/runtime/graph_splits.py) and need no timing. Same settings as the
bench: flash attention on, f16 cache, n_ubatch 512.

    python bench/gpu_splits.py MODEL.gguf --gpu-layers all --ctx 16384 [--ctx 4096 ...]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def measure(path: str, ctx: int, gpu_layers: int, ubatch: int = 512) -> dict:
    from llama_cpp import Llama

    from converters.gguf_budgets import read_budgets
    from toolchain.runtime.graph_splits import load_with_splits
    from toolchain.runtime.handles import ctx_ptr
    from toolchain.runtime.library import kv_buffers, kv_bytes
    from toolchain.runtime.memory import dims_from_gguf, predict

    def mk(mixed: bool):
        return Llama(path, n_ctx=ctx, n_batch=ubatch, n_ubatch=ubatch, flash_attn=True, type_k=1, type_v=1,
                     verbose=False, n_gpu_layers=gpu_layers, kv_overrides={"kvtool.kv.enabled": mixed})

    b = read_budgets(path)
    plan = predict(dims_from_gguf(path), b.head_window if b else None, b.sink if b else 0, ctx, n_ubatch=ubatch)
    row = {"ctx": ctx, "gpu_layers": gpu_layers, "formula_stock_bytes": plan.stock_bytes,
           "formula_mixed_bytes": plan.mixed_bytes}
    for name, mixed in (("stock", False), ("mixed", True)):
        llm, (pp, tg) = load_with_splits(lambda m=mixed: mk(m))
        active, full, ring = kv_bytes(ctx_ptr(llm))
        row[name] = {"mixed_active": active, "kv_bytes": full + ring, "splits_pp": pp, "splits_tg": tg,
                     "kv_buffers": kv_buffers(ctx_ptr(llm))}
        llm.close()
    row["splits_equal"] = (row["stock"]["splits_pp"], row["stock"]["splits_tg"]) == \
                          (row["mixed"]["splits_pp"], row["mixed"]["splits_tg"])
    row["kv_bytes_equal_formula"] = (row["stock"]["kv_bytes"] == plan.stock_bytes
                                     and row["mixed"]["kv_bytes"] == plan.mixed_bytes)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--gpu-layers", default="all")
    ap.add_argument("--ctx", type=int, action="append", required=True)
    a = ap.parse_args()
    ngl = -1 if a.gpu_layers == "all" else int(a.gpu_layers)
    print(json.dumps([measure(a.model, c, ngl) for c in a.ctx], indent=1))


if __name__ == "__main__":
    main()
