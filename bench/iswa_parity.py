"""Parity of the mixed cache on sliding-window hybrids (issue 19): tiny random Gemma-3 and gpt-oss against the
PyTorch reference, per ubatch, with the masks of tests/test_runtime_iswa.py. Prints a markdown table.

    .venv/bin/python bench/iswa_parity.py
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers_runtime import load, runtime_logits, write_windows  # noqa: E402
from helpers_swa_models import gptoss_converter_path, make_tiny_gemma3, make_tiny_gptoss, use_ggml_cpu_gelu  # noqa: E402
from test_runtime_iswa import N_TOKENS, S, global_masks  # noqa: E402

from converters.hf_to_gguf import hf_to_gguf  # noqa: E402
from toolchain.train.attention import reference_logits  # noqa: E402


def main() -> None:
    print("| model / mask | mask effect (max Δ vs full) | ubatch 1 | ubatch 7 | ubatch 64 |")
    print("|---|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for arch in ("gemma3", "gpt-oss"):
            d = Path(tmp) / arch
            if arch == "gemma3":
                hf = make_tiny_gemma3(d / "hf", seed=1)
                gguf = hf_to_gguf(hf, d / "f32.gguf", "f32")
            else:
                hf = make_tiny_gptoss(d / "hf", seed=1)
                old = os.environ.get("PYTHONPATH")
                os.environ["PYTHONPATH"] = gptoss_converter_path(d)
                try:
                    gguf = hf_to_gguf(hf, d / "f32.gguf", "f32")
                finally:
                    os.environ.pop("PYTHONPATH") if old is None else os.environ.__setitem__("PYTHONPATH", old)
            model = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
            if arch == "gemma3":
                use_ggml_cpu_gelu(model)
            tokens = np.random.default_rng(7).integers(3, model.config.vocab_size, size=N_TOKENS).tolist()
            ids = torch.tensor(tokens)
            full = reference_logits(model, ids, 0, S).numpy()
            for name, windows in global_masks(model).items():
                path = write_windows(gguf, d / f"{name}.gguf", windows, S)
                ref = reference_logits(model, ids, windows, S).numpy()
                errs = [float(np.abs(runtime_logits(load(path, n_ubatch=u, swa_full=False), tokens) - ref).max())
                        for u in (1, 7, 64)]
                print(f"| tiny {arch}, mask {name} | {float(np.abs(ref - full).max()):.2f} | "
                      + " | ".join(f"{e:.1e}" for e in errs) + " |", flush=True)


if __name__ == "__main__":
    main()
