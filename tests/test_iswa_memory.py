"""inspect/plan tell the truth for every architecture (issue 19, item 6): the bytes `kvtool inspect` predicts equal
what the runtime allocates (kvtool_kv_bytes) for llama, qwen2, qwen3, gemma3 and gpt-oss tiny models, with and
without budgets, swa_full on and off, flash attention on and off."""
from __future__ import annotations

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from helpers_models import make_tiny_hf  # noqa: E402
from helpers_runtime import load, write_windows  # noqa: E402
from helpers_swa_models import gptoss_converter_path, make_tiny_gemma3, make_tiny_gptoss  # noqa: E402

from converters.hf_to_gguf import hf_to_gguf  # noqa: E402
from toolchain.commands.inspect import inspect_report  # noqa: E402
from toolchain.runtime.library import kv_bytes  # noqa: E402
from toolchain.runtime.memory import dims_from_gguf  # noqa: E402

pytestmark = pytest.mark.usefixtures("patched_runtime")

SINK = 4


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3", "gemma3", "gpt-oss"])
def model(request, tmp_path_factory):
    arch = request.param
    d = tmp_path_factory.mktemp(f"mem-{arch}")
    mp = pytest.MonkeyPatch()
    if arch == "gemma3":
        hf = make_tiny_gemma3(d / "hf", seed=2)
    elif arch == "gpt-oss":
        hf = make_tiny_gptoss(d / "hf", seed=2)
        mp.setenv("PYTHONPATH", gptoss_converter_path(d))
    else:
        hf = make_tiny_hf(d / "hf", arch=arch, n_layer=3, n_head=4, n_head_kv=2, head_dim=16, seed=2)
    try:
        src = hf_to_gguf(hf, d / "f16.gguf", "f16")
    finally:
        mp.undo()
    dims = dims_from_gguf(src)
    # every other head compressed, on every layer: on a sliding-window model the runtime ignores those on SWA layers
    windows = [[64 if h % 2 == 0 else 0 for h in range(n)] for n in dims.n_head_kv]
    return arch, dims, src, write_windows(src, d / "masked.gguf", windows, SINK)


CASES = [  # n_ctx, n_ubatch, flash_attn, swa_full
    (1024, 512, True, False),
    (2048, 32, True, True),
    (1000, 64, False, False),
    (4096, 7, False, True),
]


@pytest.mark.parametrize("n_ctx,n_ubatch,fa,swa_full", CASES)
def test_inspect_predicts_the_allocation(model, n_ctx, n_ubatch, fa, swa_full):
    arch, dims, src, masked = model
    assert bool(dims.n_swa) == (arch in ("gemma3", "gpt-oss"))
    for path, with_budgets in ((src, False), (masked, True)):
        llm = load(path, n_ctx=n_ctx, n_ubatch=n_ubatch, f32_kv=False, flash_attn=fa, swa_full=swa_full)
        try:
            active, full, ring = kv_bytes(llm._ctx.ctx)
        finally:
            llm.close()
        r = inspect_report(str(path), n_ctx, n_ubatch, 1, "f16", fa, swa_full=swa_full)
        assert bool(active) == r["mixed_active"] == with_budgets
        predicted = r["mixed_bytes"] if r["mixed_active"] else r["stock_bytes"]
        assert full + ring == predicted, (arch, path.name, full, ring, r)
        if with_budgets:
            assert (full, ring) == (r["full_bytes"], r["ring_bytes"])
            assert r["mixed_bytes"] < r["stock_bytes"]


def test_swa_full_costs_what_it_says(model):
    arch, dims, src, _ = model
    off = inspect_report(str(src), 4096, 64, 1, "f16", True, swa_full=False)
    on = inspect_report(str(src), 4096, 64, 1, "f16", True, swa_full=True)
    if dims.n_swa:
        assert off["stock_bytes"] < on["stock_bytes"]
        assert off["swa_cells"] == 256 and on["swa_cells"] == 4096  # pad256(16 + 64), or the whole context
        assert any("budgets apply to the global layers" in n for n in off["notes"])
    else:
        assert off["stock_bytes"] == on["stock_bytes"] and not off["notes"]


def test_model_load_defaults_to_the_small_swa_cache(model):
    """Model.load uses swa_full=False unless asked, and its kv_stats prediction is the allocation."""
    from toolchain.runtime.model import Model

    arch, dims, src, masked = model
    for swa_full in (False, True):
        with Model.load(masked, n_ctx=2048, n_ubatch=32, **({"swa_full": True} if swa_full else {})) as m:
            st = m.kv_stats()
            assert st["allocated_bytes"] == st["predicted_bytes"]
            r = inspect_report(str(masked), 2048, 32, 1, "f16", True, swa_full=swa_full)
            assert st["allocated_bytes"] == r["mixed_bytes"]
