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
