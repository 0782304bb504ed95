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
    from converters.hf_to_gguf import hf_to_gguf
    from helpers_models import make_tiny_hf

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
    """SmolLM2 with a seeded random s=0.5 mask, S=16, W=64 (ARCHITECTURE's bench setting)."""
    from converters.gguf_budgets import apply_mask
    from toolchain.heads import random_mask

    mask = random_mask(30, 3, 0.5, seed=0)
    return apply_mask(smollm2, tmp_path_factory.mktemp("smol") / "smol-s05.gguf", mask)
