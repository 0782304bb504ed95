"""Max |Δlogit| between the patched runtime and the PyTorch reference, per model, mask and ubatch size.

The same comparison tests/test_runtime_parity.py asserts (≤ 1e-3), printed as a table for docs/benchmarks.md.
F32 weights, F32 KV cache, flash attention off, 300 random tokens, S=4, W=32.
Usage: .venv/bin/python bench/parity_report.py [--smollm2]
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from helpers_models import make_tiny_hf  # noqa: E402
from helpers_runtime import load, runtime_logits, write_windows  # noqa: E402

from converters.hf_to_gguf import hf_to_gguf  # noqa: E402
from toolchain.heads import random_mask  # noqa: E402
from toolchain.train.attention import reference_logits  # noqa: E402

S, W, T = 4, 32, 300


def report(name, model, gguf, windows, tokens, tmp, ubatches=(1, 7, 64, 512)):
    path = write_windows(gguf, tmp / ("".join(c if c.isalnum() else "_" for c in name) + ".gguf"), windows, S)
    ref = reference_logits(model, torch.tensor(tokens), windows, S).numpy()
    effect = float(np.abs(ref - reference_logits(model, torch.tensor(tokens), 0, S).numpy()).max())
    errs = {u: float(np.abs(runtime_logits(load(path, n_ubatch=u), tokens) - ref).max()) for u in ubatches}
    cells = [f"{errs[u]:.1e}" if u in errs else "—" for u in (1, 7, 64, 512)]
    print(f"| {name} | {effect:.2f} | " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    torch.set_num_threads(2)
    print("| model / mask | mask effect (max Δ vs full) | ubatch 1 | ubatch 7 | ubatch 64 | ubatch 512 |")
    print("|---|---:|---:|---:|---:|---:|")
    tokens = np.random.default_rng(7).integers(3, 100, size=T).tolist()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for arch in ("llama", "qwen2", "qwen3", "mistral"):
            hf = make_tiny_hf(tmp / arch, arch=arch, n_layer=3, n_head=4, n_head_kv=2, head_dim=16, vocab=100, seed=1)
            gguf = hf_to_gguf(hf, tmp / f"{arch}.gguf", "f32")
            model = transformers.AutoModelForCausalLM.from_pretrained(hf, torch_dtype=torch.float32).eval()
            rng = np.random.default_rng(0)
            several = rng.choice([0, 16, W], size=(3, 2)).tolist()
            report(f"tiny {arch}, windows 0/16/32", model, gguf, several, tokens, tmp)
        if "--smollm2" in sys.argv:
            from toolchain.paths import models_dir

            hf, gguf = models_dir() / "SmolLM2-135M-Instruct.F32-hf", models_dir() / "SmolLM2-135M-Instruct.F32.gguf"
            model = transformers.AutoModelForCausalLM.from_pretrained(hf, torch_dtype=torch.float32).eval()
            windows = [[0 if f else W for f in row] for row in random_mask(30, 3, 0.5, seed=1).full]
            toks = np.random.default_rng(0).integers(100, 40000, size=T).tolist()
            report("SmolLM2-135M F32, random s=0.5", model, gguf, windows, toks, tmp, (7, 64, 512))


if __name__ == "__main__":
    main()
