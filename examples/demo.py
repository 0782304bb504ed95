"""`make demo`: one question to SmolLM2-135M with the full KV cache and with a mixed per-head cache.

SmolLM2 has no published RLKV scores, so the demo compresses a seeded random half of its 90 KV heads
(S=16, W=64): it shows the memory mechanics on a real model, not RLKV's accuracy (see docs/benchmarks.md for that).
"""
from __future__ import annotations

import sys

from converters.gguf_budgets import apply_mask
from toolchain import Model
from toolchain.heads import random_mask
from toolchain.models import fetch_smollm2
from toolchain.paths import models_dir

QUESTION = "In one sentence: why does a long chain of thought need a lot of KV-cache memory?"
N_CTX = 8192


def mib(b: int) -> str:
    return f"{b / 2**20:7.1f} MiB"


def main() -> int:
    src = fetch_smollm2(echo=lambda m: print(m, file=sys.stderr))
    dst = models_dir() / "SmolLM2-135M-Instruct.Q4_1.random-s0.5.gguf"
    if not dst.exists():
        apply_mask(src, dst, random_mask(30, 3, 0.5, seed=0))
    print(f"model: {dst.name} (45 of 90 KV heads keep 16 sink + 64 recent tokens)\n")
    for mixed in (False, True):
        with Model.load(dst, n_ctx=N_CTX, mixed=mixed) as m:
            answer = m.chat([{"role": "user", "content": QUESTION}], max_tokens=60)
            s, g = m.kv_stats(), m.last_stats
            label = "mixed" if mixed else "full "
            print(f"[{label}] {answer.strip()}")
            print(f"[{label}] KV allocated for {N_CTX} tokens: {mib(s['allocated_bytes'])} "
                  f"(full-cache equivalent {mib(s['stock_bytes'])}, ratio {s['ratio']:.3f}); "
                  f"decode {g.decode_tok_s or 0:.1f} tok/s\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
