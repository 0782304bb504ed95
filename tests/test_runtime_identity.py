"""Identity: a file with no budgets, with kvtool.kv.enabled=false, or with every window 0 runs bit-identically to the
same file without keys (the stock code path), for f16 and F32 caches, flash attention on and off."""
from __future__ import annotations

import numpy as np
import pytest
from helpers_runtime import load, runtime_logits, write_windows

from toolchain.runtime.library import kv_bytes

pytestmark = pytest.mark.usefixtures("patched_runtime")


@pytest.mark.parametrize("flash_attn", [False, True])
@pytest.mark.parametrize("f32_kv", [False, True])
def test_no_budgets_is_bit_identical(tiny_gguf, tokens, tmp_path, flash_attn, f32_kv):
    variants = {
        "disabled": write_windows(tiny_gguf, tmp_path / "off.gguf", [[32, 32]] * 3, 4, enabled=False),
        "all_full": write_windows(tiny_gguf, tmp_path / "zero.gguf", [[0, 0]] * 3, 4),
        "window_covers_ctx": write_windows(tiny_gguf, tmp_path / "huge.gguf", [[4096, 0]] * 3, 4),
    }
    masked = write_windows(tiny_gguf, tmp_path / "masked.gguf", [[32, 0]] * 3, 4)
    base = runtime_logits(load(tiny_gguf, n_ubatch=64, f32_kv=f32_kv, flash_attn=flash_attn), tokens)
    for name, path in variants.items():
        llm = load(path, n_ubatch=64, f32_kv=f32_kv, flash_attn=flash_attn)
        assert kv_bytes(llm._ctx.ctx)[0] is False, name
        assert np.array_equal(runtime_logits(llm, tokens), base), name
    # the override switches a masked file back to the stock path, bit for bit
    llm = load(masked, n_ubatch=64, f32_kv=f32_kv, flash_attn=flash_attn, mixed=False)
    assert np.array_equal(runtime_logits(llm, tokens), base)
    # and the masked file really is different when mixed (the comparison above is not vacuous)
    llm = load(masked, n_ubatch=64, f32_kv=f32_kv, flash_attn=flash_attn)
    assert kv_bytes(llm._ctx.ctx)[0] is True
    assert not np.array_equal(runtime_logits(llm, tokens), base)


def test_sink_without_compressed_heads_is_fine(tiny_gguf, tokens, tmp_path):
    path = write_windows(tiny_gguf, tmp_path / "sinkonly.gguf", [[0, 0]] * 3, 16)
    base = runtime_logits(load(tiny_gguf), tokens)
    assert np.array_equal(runtime_logits(load(path), tokens), base)
