"""Memory: the bytes the runtime allocates (kvtool_kv_bytes) equal the documented formula (toolchain/runtime/memory.py,
docs/memory.md) for several contexts, ubatch sizes, sequence counts and cache types; quantized caches and mixed
allocation multiply."""
from __future__ import annotations

import pytest
from helpers_runtime import LowLevel, write_windows

from toolchain.runtime.library import kv_bytes, kv_groups
from toolchain.runtime.memory import dims_from_gguf, predict

pytestmark = pytest.mark.usefixtures("patched_runtime")

WINDOWS = [[32, 0, 64, 32], [0, 0, 0, 0], [32, 32, 32, 32]]  # two windows, a full layer, a compressed layer


@pytest.fixture(scope="module")
def model32(tmp_path_factory):
    """head dim 32 so that q8_0/q4_0 rows of a single head are whole blocks."""
    pytest.importorskip("torch")
    from helpers_models import make_tiny_hf

    from converters.hf_to_gguf import hf_to_gguf

    d = tmp_path_factory.mktemp("mem")
    hf = make_tiny_hf(d / "hf", n_layer=3, n_head=8, n_head_kv=4, head_dim=32, vocab=100, seed=2)
    src = hf_to_gguf(hf, d / "f32.gguf", "f32")
    return src, write_windows(src, d / "masked.gguf", WINDOWS, 8)


CASES = [
    # n_ctx, n_ubatch, n_seq, unified, cache, flash_attn
    (1024, 512, 1, False, "f16", True),
    (4096, 64, 1, False, "q8_0", True),
    (1000, 32, 1, False, "f16", False),
    (8192, 128, 1, False, "q4_0", True),
    (2048, 64, 2, True, "f16", True),
    (2048, 64, 3, False, "f16", True),
    (768, 512, 1, False, "f32", False),
]


@pytest.mark.parametrize("n_ctx,n_ubatch,n_seq,unified,cache,fa", CASES)
def test_measured_bytes_equal_formula(model32, n_ctx, n_ubatch, n_seq, unified, cache, fa):
    src, masked = model32
    dims = dims_from_gguf(masked)
    for path, windows in ((masked, WINDOWS), (src, None)):
        ll = LowLevel(path, n_ctx=n_ctx, n_ubatch=n_ubatch, n_seq_max=n_seq, unified=unified, cache=cache, flash_attn=fa)
        try:
            mixed, full, ring = kv_bytes(ll.ctx)
            plan = predict(dims, windows, 8, n_ctx, n_ubatch, n_seq, cache, cache, fa, unified)
            assert mixed == plan.mixed
            assert (full, ring) == (plan.full_bytes, plan.ring_bytes)
            if windows is None:
                assert full == plan.stock_bytes
            else:
                assert dict(kv_groups(ll.ctx)) == {0: plan.full_cells, **plan.ring_cells}
        finally:
            ll.close()


def test_savings_multiply_with_quantized_cache(model32):
    src, masked = model32
    dims = dims_from_gguf(masked)
    f16 = predict(dims, WINDOWS, 8, 16384, 128, type_k="f16")
    q8 = predict(dims, WINDOWS, 8, 16384, 128, type_k="q8_0")
    assert q8.mixed_bytes < f16.mixed_bytes < f16.stock_bytes
    # the two factors multiply: mixed q8_0 / stock f16 == (mixed/stock) * (q8_0/f16)
    assert q8.mixed_bytes / f16.stock_bytes == pytest.approx(f16.ratio * (q8.stock_bytes / f16.stock_bytes), rel=1e-9)


def test_quantized_cache_runs_mixed(model32, tokens):
    import numpy as np

    src, masked = model32
    for cache in ("q8_0", "q4_0"):
        ll = LowLevel(masked, n_ctx=512, n_ubatch=64, cache=cache, flash_attn=True)
        try:
            assert kv_bytes(ll.ctx)[0] is True
            assert np.isfinite(ll.run(tokens[:200], chunk=64)).all()
        finally:
            ll.close()
