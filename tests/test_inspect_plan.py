"""inspect / plan: predictions equal what the runtime allocates, and plan's contexts really fit the budget."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from toolchain.cli import cli
from toolchain.commands.inspect import inspect_report, max_ctx, parse_size
from toolchain.runtime.memory import dims_from_gguf, predict

pytestmark = pytest.mark.usefixtures("patched_runtime")


@pytest.mark.parametrize("n_ctx,cache", [(4096, "f16"), (2048, "q8_0")])
def test_inspect_prediction_equals_runtime(smollm2_masked, n_ctx, cache):
    from helpers_runtime import LowLevel

    from toolchain.runtime.library import kv_bytes

    r = inspect_report(str(smollm2_masked), n_ctx, 512, 1, cache, True)
    ll = LowLevel(smollm2_masked, n_ctx=n_ctx, n_ubatch=512, cache=cache, flash_attn=True)
    try:
        mixed, full, ring = kv_bytes(ll.ctx)
    finally:
        ll.close()
    assert mixed and r["mixed_active"]
    assert (full, ring) == (r["full_bytes"], r["ring_bytes"])
    assert r["mixed_bytes"] < r["stock_bytes"]


def test_inspect_cli_json_and_text(smollm2_masked):
    res = CliRunner().invoke(cli, ["inspect", str(smollm2_masked), "--ctx", "16384", "--json"])
    assert res.exit_code == 0, res.output
    r = json.loads(res.output)
    assert r["arch"] == "llama" and r["n_layer"] == 30 and r["windows"] == [64] and r["sink"] == 16
    assert r["ratio"] <= 0.53  # 45 of 90 heads full + a 768-cell ring
    text = CliRunner().invoke(cli, ["inspect", str(smollm2_masked), "--ctx", "16384"])
    assert "ratio" in text.output and "W64: 768 cells" in text.output


def test_plan_fits_and_is_maximal(smollm2_masked):
    dims = dims_from_gguf(smollm2_masked)
    from converters.gguf_budgets import read_budgets

    b = read_budgets(smollm2_masked)
    budget = parse_size("256MiB")
    for windows, cache, mixed in ((None, "f16", False), (b.head_window, "f16", True), (b.head_window, "q8_0", True)):
        c = max_ctx(dims, windows, b.sink, budget, 512, cache, mixed)
        assert predict(dims, windows, b.sink, c, 512, 1, cache, cache, True, mixed=mixed).mixed_bytes <= budget
        assert predict(dims, windows, b.sink, c + 256, 512, 1, cache, cache, True, mixed=mixed).mixed_bytes > budget
    res = CliRunner().invoke(cli, ["plan", str(smollm2_masked), "--mem", "256MiB", "--json"])
    plans = json.loads(res.output)["plans"]
    assert plans["mixed"]["max_ctx"] > 1.8 * plans["full"]["max_ctx"]
    assert plans["mixed+q8_0"]["max_ctx"] > plans["mixed"]["max_ctx"]


@pytest.mark.parametrize("args,needle", [
    (["inspect", "/nonexistent.gguf"], "nonexistent"),
    (["plan", "MODEL", "--mem", "lots"], "memory size"),
    (["inspect", "MODEL", "--cache-type", "q3_k"], "cache type"),
])
def test_bad_input_one_line(smollm2_masked, tmp_path, args, needle):
    import subprocess
    import sys

    args = [str(smollm2_masked) if a == "MODEL" else a for a in args]
    res = subprocess.run([sys.executable, "-m", "toolchain.cli", *args], capture_output=True, text=True)
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0], res.stderr


def test_non_gguf_rejected(tmp_path):
    import subprocess
    import sys

    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all" * 10)
    res = subprocess.run([sys.executable, "-m", "toolchain.cli", "inspect", str(junk)], capture_output=True, text=True)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1
