"""Shared fixtures. Test files import helpers from this folder (helpers_models, helpers_runtime)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def patched_runtime():
    """Skip nothing: a stock runtime is a setup error that must fail loudly (make test builds the runtime)."""
    from toolchain.runtime.library import runtime_info

    info = runtime_info()
    if not info["runtime_patched"]:
        pytest.fail("the installed llama-cpp-python is not kvtool's patched build: run kvtool build-runtime")
    return info


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory):
    """A random 3-layer llama (4 query heads, 2 KV heads, head dim 16) as an F32 GGUF without kvtool keys."""
    pytest.importorskip("torch")
    from helpers_models import make_tiny_hf

    from converters.hf_to_gguf import hf_to_gguf

    d = tmp_path_factory.mktemp("tiny-session")
    hf = make_tiny_hf(d / "hf", arch="llama", n_layer=3, n_head=4, n_head_kv=2, head_dim=16, vocab=100, seed=5)
    return hf_to_gguf(hf, d / "tiny-f32.gguf", "f32")


@pytest.fixture(scope="session")
def tokens():
    import numpy as np

    return np.random.default_rng(11).integers(3, 100, size=300).tolist()


@pytest.fixture(scope="session")
def smollm2():
    """The demo model (fetched once into ~/.cache/kvtool/models; CI caches it)."""
    from toolchain.models import fetch_smollm2

    return fetch_smollm2(echo=lambda m: None)


@pytest.fixture(scope="session")
def smollm2_masked(smollm2, tmp_path_factory):
    """SmolLM2 with a seeded random s=0.5 mask, S=16, W=64 (the bench setting of docs/benchmarks.md)."""
    from converters.gguf_budgets import apply_mask
    from toolchain.heads import random_mask

    mask = random_mask(30, 3, 0.5, seed=0)
    return apply_mask(smollm2, tmp_path_factory.mktemp("smol") / "smol-s05.gguf", mask)


@pytest.fixture(scope="session")
def smollm2_f32(smollm2):
    """SmolLM2 dequantized by transformers (Q4_1 -> F32 HF dir) and converted back to an F32 GGUF by the vendored
    convert_hf_to_gguf.py: the real-model parity pair. Cached under ~/.cache/kvtool/models (about a minute to make)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    import shutil
    import tempfile

    from converters.hf_to_gguf import hf_to_gguf
    from toolchain.paths import models_dir

    hf = models_dir() / "SmolLM2-135M-Instruct.F32-hf"
    gguf = models_dir() / "SmolLM2-135M-Instruct.F32.gguf"
    if not (hf / "config.json").exists():
        tmp = Path(tempfile.mkdtemp(prefix=".f32-hf.", dir=models_dir()))
        try:
            src = Path(smollm2)
            tok = transformers.AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
            q = transformers.AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, torch_dtype=torch.float32)
            cfg = q.config
            if hasattr(cfg, "quantization_config"):  # transformers marks GGUF loads as unserializable
                delattr(cfg, "quantization_config")
            m = transformers.AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32)
            m.load_state_dict(q.state_dict())
            m.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            if hf.exists():
                shutil.rmtree(hf)
            tmp.rename(hf)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if not gguf.exists():
        hf_to_gguf(hf, gguf, "f32")
    return hf, gguf
