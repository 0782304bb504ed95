"""``--kv-budget``: the least compression whose KV cache fits, by the memory formula (no model load), the same in
``Model.load``, the commands and ``kvtool plan --mem``."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from helpers_cli import assert_one_line_error, kvtool
from test_convert import make_gguf

from converters import gguf_budgets as gb
from toolchain.cli import cli
from toolchain.errors import KvtoolError
from toolchain.heads import mask_from_scores, n_compressed, random_mask
from toolchain.runtime.kv_budget import choose, sparsity_for
from toolchain.runtime.memory import dims_from_gguf, predict


@pytest.fixture
def scored(tmp_path):
    """8 layers x 2 KV heads (head dim 32, 128 B per head and token in f16), trained context 4096, a seeded random
    s=0.5 mask with scores, S=4, W=512 (rings of pad256(512 + 4 + 64) = 768 cells)."""
    src = make_gguf(tmp_path / "m.gguf", n_layer=8, head_count=2)
    src = gb.rewrite_gguf(src, tmp_path / "m4k.gguf", {"llama.context_length": gb.Value(gb.T_U32, 4096)})
    return gb.apply_mask(src, tmp_path / "scored.gguf", random_mask(8, 2, 0.5, seed=4, sink=4, window=512))


def kv(dims, b, s, n_ctx, n_ubatch=64):
    """Bytes at sparsity s (None = the file's mask) by the formula, for an independent check of choose()."""
    wins = b.head_window if s is None else [[0 if f else b.heads_window for f in row]
                                            for row in mask_from_scores(b.scores, s, b.per_layer)]
    return predict(dims, wins, b.sink, n_ctx, n_ubatch, 1, "f16", "f16", True).mixed_bytes


def test_sparsity_names_exactly_k_heads():
    for n in (1, 6, 7, 16, 20, 90, 256):
        for k in range(n + 1):
            s = sparsity_for(k, n)
            assert n_compressed(s, n) == k and len(repr(s)) <= 9, (k, n, s)


def test_fixed_ctx_picks_the_smallest_sparsity_that_fits(scored):
    dims, b = dims_from_gguf(scored), gb.read_budgets(scored)
    full = kv(dims, b, 0.0, 4096)
    assert choose(dims, b, full, 4096, 64).sparsity == 0.0  # room for a full cache: no compression
    for budget in (full - 1, int(full * 0.7), int(full * 0.4)):
        c = choose(dims, b, budget, 4096, 64)
        assert c.kv_bytes == kv(dims, b, c.sparsity, 4096) <= budget
        k = n_compressed(c.sparsity, 16)
        assert k >= 1 and kv(dims, b, sparsity_for(k - 1, 16), 4096) > budget  # one head fewer would not fit
        assert c.n_compressed == k and c.n_ctx == 4096
    with pytest.raises(KvtoolError, match="nothing fits n_ctx 4096"):
        choose(dims, b, kv(dims, b, 1.0, 4096) - 1, 4096, 64)


def test_auto_ctx_at_the_file_sparsity_then_higher(scored):
    dims, b = dims_from_gguf(scored), gb.read_budgets(scored)
    assert dims.n_ctx_train == 4096
    # the training context fits at the file's sparsity: no override
    c = choose(dims, b, kv(dims, b, None, 4096), "auto", 64)
    assert (c.n_ctx, c.sparsity, c.n_compressed) == (4096, None, 8)
    # it does not: the smallest higher sparsity where it does
    budget = kv(dims, b, None, 4096) - 1
    c = choose(dims, b, budget, "auto", 64)
    assert c.n_ctx == 4096 and c.n_compressed > 8 and c.kv_bytes == kv(dims, b, c.sparsity, 4096) <= budget
    assert kv(dims, b, sparsity_for(c.n_compressed - 1, 16), 4096) > budget
    # it fits nowhere (768-cell rings take 1.5 MiB at s=1): the largest context at the file's sparsity
    c = choose(dims, b, 1 << 20, "auto", 64)
    assert (c.n_ctx, c.sparsity) == (512, None)
    assert kv(dims, b, None, 512) <= 1 << 20 < kv(dims, b, None, 768)
    with pytest.raises(KvtoolError, match="not even a 256-token context fits"):
        choose(dims, b, kv(dims, b, None, 256) - 1, "auto", 64)


def test_file_without_scores_only_chooses_the_context(tmp_path):
    src = make_gguf(tmp_path / "m.gguf", n_layer=8)
    m = random_mask(8, 2, 0.5, seed=4)
    m.scores = None
    p = gb.apply_mask(src, tmp_path / "plain.gguf", m)
    dims, b = dims_from_gguf(p), gb.read_budgets(p)
    need = kv(dims, b, None, 2048)
    assert choose(dims, b, need, 2048, 64).sparsity is None
    with pytest.raises(KvtoolError, match="no kvtool.heads.scores, so its mask cannot change"):
        choose(dims, b, need - 1, 2048, 64)


def test_plan_shows_the_same_choice(scored):
    dims, b = dims_from_gguf(scored), gb.read_budgets(scored)
    for ctx, want in (("auto", choose(dims, b, 3 << 20, "auto", 512)), ("4096", choose(dims, b, 3 << 20, 4096, 512))):
        res = CliRunner().invoke(cli, ["plan", str(scored), "--mem", "3MiB", "--ctx", ctx, "--json"])
        assert res.exit_code == 0, res.output
        got = json.loads(res.output)["kv_budget"]
        assert (got["n_ctx"], got["sparsity"], got["kv_bytes"]) == (want.n_ctx, want.sparsity, want.kv_bytes)
        text = CliRunner().invoke(cli, ["plan", str(scored), "--mem", "3MiB", "--ctx", ctx]).output
        assert f"--kv-budget --n-ctx {ctx}: {want.summary()}" in text


def test_inspect_says_the_scores_are_there(scored, tmp_path):
    res = CliRunner().invoke(cli, ["inspect", str(scored), "--ctx", "1024"])
    assert res.exit_code == 0 and "head scores stored: any sparsity at load time" in res.output
    assert json.loads(CliRunner().invoke(cli, ["inspect", str(scored), "--json"]).output)["scores"] is True


def test_llama_args_map_onto_the_override(scored):
    dims, b = dims_from_gguf(scored), gb.read_budgets(scored)
    c = choose(dims, b, int(kv(dims, b, 0.0, 4096) * 0.7), 4096, 64)
    assert c.llama_args() == ["--ctx-size", "4096", "--override-kv", f"kvtool.kv.sparsity=float:{c.sparsity!r}"]


@pytest.mark.parametrize("args,needle", [
    (["generate", "M", "-p", "x", "--kv-budget", "lots"], "cannot read memory size 'lots'"),
    (["generate", "M", "-p", "x", "--kv-budget", "1KiB"], "--kv-budget 1.0 KiB: nothing fits n_ctx 4096"),
    (["chat", "M", "--n-ctx", "auto"], "n_ctx 'auto' needs a KV budget"),
    (["generate", "M", "-p", "x", "--n-ctx", "big"], "--n-ctx must be an integer or 'auto'"),
    (["plan", "M", "--mem", "1MiB", "--ctx", "x"], "--ctx must be an integer or 'auto'"),
])
def test_cli_errors_are_one_line(scored, args, needle):
    res = kvtool(*[str(scored) if a == "M" else a for a in args])
    assert_one_line_error(res, contains=needle)


def test_swa_full_is_counted_on_sliding_window_models(scored):
    """--kv-budget with --swa-full plans the full-size SWA cache llama.cpp then allocates (it used to plan the small
    one, so the choice could overrun the budget)."""
    import dataclasses

    dims0, b = dims_from_gguf(scored), gb.read_budgets(scored)
    dims = dataclasses.replace(dims0, n_swa=128, is_swa=(True, False) * 4)

    def need(s, n_ctx, flag):
        wins = [[0 if f else b.heads_window for f in row] for row in mask_from_scores(b.scores, s, b.per_layer)]
        return predict(dims, wins, b.sink, n_ctx, 64, 1, "f16", "f16", True, swa_full=flag).mixed_bytes

    small = choose(dims, b, 1 << 30, 4096, 64)
    big = choose(dims, b, 1 << 30, 4096, 64, swa_full=True)
    assert small.sparsity == big.sparsity == 0.0
    assert (small.kv_bytes, big.kv_bytes) == (need(0.0, 4096, False), need(0.0, 4096, True))
    assert big.kv_bytes > small.kv_bytes
    # a budget that the small SWA cache meets at s=0: with the full-size one, compression must make up the gap
    budget = small.kv_bytes
    if need(1.0, 4096, True) <= budget:
        c = choose(dims, b, budget, 4096, 64, swa_full=True)
        assert c.sparsity > 0.0 and c.kv_bytes <= budget
    else:
        with pytest.raises(KvtoolError, match="nothing fits"):
            choose(dims, b, budget, 4096, 64, swa_full=True)
    auto = choose(dims, b, budget, "auto", 64, swa_full=True)
    wins = b.head_window if auto.sparsity is None else \
        [[0 if f else b.heads_window for f in row] for row in mask_from_scores(b.scores, auto.sparsity, b.per_layer)]
    assert auto.kv_bytes <= budget
    assert auto.kv_bytes == predict(dims, wins, b.sink, auto.n_ctx, 64, 1, "f16", "f16", True, swa_full=True).mixed_bytes
