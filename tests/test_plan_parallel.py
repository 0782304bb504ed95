"""`kvtool plan --parallel N --ctx C`: how many C-token sequences fit in a KV budget, stock vs mixed (f16/q8_0/q4_0).

Oracles: the count is maximal under the formula (N fits, N+1 does not); the formula's bytes for N sequences equal what
the runtime allocates for a context with n_seq_max = N (one stream per sequence, as llama-server -np N makes it, and
unified), and that context decodes in every sequence."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from toolchain.cli import cli
from toolchain.commands.inspect import LLAMA_MAX_SEQ, parallel_report, seq_plan
from toolchain.runtime.memory import dims_from_gguf

pytestmark = pytest.mark.usefixtures("patched_runtime")


def _budgets(path):
    from converters.gguf_budgets import read_budgets

    b = read_budgets(path)
    return b.head_window, b.sink


def test_plan_parallel_counts_are_maximal(smollm2_masked):
    res = CliRunner().invoke(cli, ["plan", str(smollm2_masked), "--mem", "1GiB", "--parallel", "4", "--ctx", "16384",
                                   "--json"])
    assert res.exit_code == 0, res.output
    r = json.loads(res.output)
    dims = dims_from_gguf(smollm2_masked)
    windows, sink = _budgets(smollm2_masked)
    budget = 1 << 30
    v = r["variants"]
    assert list(v) == ["stock", "stock+q8_0", "stock+q4_0", "mixed", "mixed+q8_0", "mixed+q4_0"]
    for name, row in v.items():
        mixed = name.startswith("mixed")
        n = row["max_seqs"]
        assert 1 <= n < LLAMA_MAX_SEQ
        assert seq_plan(dims, windows if mixed else None, sink, n, 16384, 512, row["cache_type"], mixed).mixed_bytes \
            == row["kv_bytes"] <= budget
        assert seq_plan(dims, windows if mixed else None, sink, n + 1, 16384, 512, row["cache_type"],
                        mixed).mixed_bytes > budget
        assert row["fits"] == (row["parallel_kv_bytes"] <= budget) == (n >= 4)
    # SmolLM2, 45 of 90 heads compressed (S=16, W=64): 360 MiB per stock 16K sequence, 188.4 MiB mixed
    assert v["stock"]["kv_bytes_per_seq"] == 360 * 2**20
    assert v["stock"]["max_seqs"] == 2 and v["mixed"]["max_seqs"] == 5
    assert v["mixed+q8_0"]["max_seqs"] >= 1.9 * v["stock+q8_0"]["max_seqs"]
    text = CliRunner().invoke(cli, ["plan", str(smollm2_masked), "--mem", "1GiB", "--parallel", "4"])
    assert text.exit_code == 0 and "16384-token sequences" in text.output
    assert "4 need 1440.0 MiB: does NOT fit" in text.output


def test_plan_parallel_cap_and_tiny_budget(smollm2_masked):
    r = parallel_report(str(smollm2_masked), 1 << 40, None, 512, 512)
    assert r["variants"]["mixed"]["max_seqs"] == LLAMA_MAX_SEQ  # llama.cpp's n_seq_max cap, not memory
    r = parallel_report(str(smollm2_masked), 1 << 20, 2, 16384, 512)
    assert all(row["max_seqs"] == 0 and row["kv_bytes"] == 0 and not row["fits"] for row in r["variants"].values())


@pytest.mark.parametrize("n_seq,unified,cache", [(3, False, "f16"), (2, False, "q8_0"), (3, True, "f16"),
                                                 (2, False, "q4_0")])
def test_parallel_bytes_equal_runtime(smollm2_masked, n_seq, unified, cache):
    from helpers_runtime import LowLevel

    from toolchain.runtime.library import kv_bytes, kv_groups

    ctx, n_ubatch = 1024, 64
    dims = dims_from_gguf(smollm2_masked)
    windows, sink = _budgets(smollm2_masked)
    for mixed in (False, True):
        plan = seq_plan(dims, windows if mixed else None, sink, n_seq, ctx, n_ubatch, cache, mixed, unified)
        ll = LowLevel(smollm2_masked, n_ctx=n_seq * ctx, n_ubatch=n_ubatch, n_seq_max=n_seq, unified=unified,
                      cache=cache, flash_attn=True, mixed=mixed)
        try:
            active, full, ring = kv_bytes(ll.ctx)
            assert active == mixed
            assert (full, ring) == (plan.full_bytes, plan.ring_bytes)
            if mixed:
                assert dict(kv_groups(ll.ctx)) == {0: plan.full_cells, **plan.ring_cells}
            # every sequence decodes in the one context
            rng = np.random.default_rng(n_seq)
            items = [(int(t), p, s) for s in range(n_seq) for p, t in enumerate(rng.integers(100, 1000, 8))]
            logits = ll.decode(items)
            assert len(logits) == 8 * n_seq and all(np.isfinite(x).all() for x in logits)
        finally:
            ll.close()


@pytest.mark.parametrize("args,needle", [
    (["--parallel", "0"], "--parallel"),
    (["--parallel", "300"], "--parallel"),
    (["--ctx", "0"], "--ctx"),
    (["--parallel", "2", "--sparsity", "0.5"], "drop --sparsity"),
])
def test_plan_parallel_bad_input_one_line(smollm2_masked, args, needle):
    res = subprocess.run([sys.executable, "-m", "toolchain.cli", "plan", str(smollm2_masked), "--mem", "1GiB", *args],
                         capture_output=True, text=True)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode != 0 and len(lines) == 1 and needle in lines[0], res.stderr
    assert res.stdout == ""
