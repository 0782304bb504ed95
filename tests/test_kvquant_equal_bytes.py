"""The equal-memory pairs of docs/benchmarks.md ("Accuracy: the CPU reasoner's task at equal KV bytes"), from the
allocation formula: for the reasoner's shape (4 layers x 4 KV heads of dim 32, half the heads at S=4, W=32,
ubatch 64) mixed f16 takes exactly stock q8_0's bytes at n_ctx 4096, and mixed+q8_0 is within 0.35% of stock q4_0.
At the task's own context (287 tokens, 512 cells) the 256-cell rings make mixed 0.75x. The table's pairing rests on
these numbers; the runtime's equality with the formula is tests/test_runtime_memory.py's job."""
from __future__ import annotations

import pytest

from toolchain.runtime.memory import ModelDims, predict

DIMS = ModelDims("llama", 4, (4, 4, 4, 4), 32, 32)
HALF = [[0, 32, 0, 32]] * 4  # 8 of 16 heads compressed; which ones does not change the bytes


def _stock(n_ctx: int, t: str) -> int:
    return predict(DIMS, None, 4, n_ctx, n_ubatch=64, type_k=t, mixed=False).stock_bytes


def _mixed(n_ctx: int, t: str) -> int:
    return predict(DIMS, HALF, 4, n_ctx, n_ubatch=64, type_k=t).mixed_bytes


def test_pairs_at_4k():
    assert _stock(4096, "f16") == 8 * 2**20
    assert _mixed(4096, "f16") == _stock(4096, "q8_0") == 4456448  # 4.25 MiB, what the eval measured
    assert _stock(4096, "q4_0") == 2359296
    assert _mixed(4096, "q8_0") == 2367488
    assert _mixed(4096, "q8_0") / _stock(4096, "q4_0") == pytest.approx(1.0035, abs=1e-4)


@pytest.mark.parametrize("n_ctx", [287, 512])
def test_not_equal_at_the_task_context(n_ctx):
    full = _stock(n_ctx, "f16")
    assert full == 2**20  # 512 cells
    assert _mixed(n_ctx, "f16") / full == 0.75  # ring 256 cells against 512
    assert _mixed(n_ctx, "f16") > _stock(n_ctx, "q8_0")
    assert _mixed(n_ctx, "q8_0") > _stock(n_ctx, "q4_0")
