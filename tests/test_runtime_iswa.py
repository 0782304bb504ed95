"""Budgets on sliding-window hybrids (issue 19): tiny random Gemma-3 and gpt-oss against the PyTorch reference.

The SWA layers keep the model's own window (llama.cpp's SWA cache, here the mixed cache's native group); the global
layers take the per-head budgets. F32 weights and cache, flash attention off, so max |Δlogit| <= 1e-3 must hold
for every ubatch size. gpt-oss adds learned sinks, which must move with their heads when a layer is split.
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from helpers_runtime import load, runtime_logits, write_windows  # noqa: E402
from helpers_swa_models import gptoss_converter_path, make_tiny_gemma3, make_tiny_gptoss, use_ggml_cpu_gelu  # noqa: E402

from converters.hf_to_gguf import hf_to_gguf  # noqa: E402
from toolchain.runtime.library import kv_bytes  # noqa: E402
from toolchain.train.attention import reference_logits  # noqa: E402

pytestmark = pytest.mark.usefixtures("patched_runtime")

TOL = 1e-3
S, W = 4, 32
N_TOKENS = 300


def _global_layers(model) -> list[int]:
    return [i for i, t in enumerate(model.config.layer_types) if t == "full_attention"]


def global_masks(model, seed=0):
    L, H = model.config.num_hidden_layers, model.config.num_key_value_heads
    glob = _global_layers(model)
    one = np.zeros((L, H), dtype=int)
    one[glob, 0] = W                       # a split global layer: one head compressed, one full
    every = np.zeros((L, H), dtype=int)
    every[glob] = W                        # every global head compressed: no full group at all
    rng = np.random.default_rng(seed)
    noisy = rng.choice([0, 8, W], size=(L, H))  # budgets on SWA layers too: ignored by both sides
    noisy[glob[0], 0], noisy[glob[0], 1] = W, 0
    return {"one": one.tolist(), "every": every.tolist(), "noisy": noisy.tolist()}


@pytest.fixture(scope="module", params=["gemma3", "gpt-oss"])
def tiny(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(f"tiny-{request.param}")
    mp = pytest.MonkeyPatch()
    if request.param == "gemma3":
        hf = make_tiny_gemma3(d / "hf", seed=1)
    else:
        hf = make_tiny_gptoss(d / "hf", seed=1)
        mp.setenv("PYTHONPATH", gptoss_converter_path(d))
    try:
        gguf = hf_to_gguf(hf, d / "f32.gguf", "f32")
    finally:
        mp.undo()
    model = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    if request.param == "gemma3":
        use_ggml_cpu_gelu(model)
    tokens = np.random.default_rng(7).integers(3, model.config.vocab_size, size=N_TOKENS).tolist()
    return {"dir": d, "gguf": gguf, "model": model, "tokens": tokens, "arch": request.param}


@pytest.mark.parametrize("mask_name", ["one", "every", "noisy"])
def test_parity_all_ubatch_sizes(tiny, mask_name):
    model = tiny["model"]
    windows = global_masks(model)[mask_name]
    path = write_windows(tiny["gguf"], tiny["dir"] / f"{mask_name}.gguf", windows, S)
    ref = reference_logits(model, torch.tensor(tiny["tokens"]), windows, S).numpy()
    worst = 0.0
    for ubatch in (1, 7, 64):
        llm = load(path, n_ubatch=ubatch, swa_full=False)
        active, _, _ = kv_bytes(llm._ctx.ctx)
        assert active, "the mixed cache must be in use on a global-layer budget"
        err = float(np.abs(runtime_logits(llm, tiny["tokens"]) - ref).max())
        worst = max(worst, err)
        assert err <= TOL, f"{tiny['arch']} {mask_name} ubatch {ubatch}: max |dlogit| = {err}"
    print(f"\n{tiny['arch']} mask {mask_name}: max |dlogit| over ubatch 1/7/64 = {worst:.3g}")


def test_parity_swa_full_and_prefill_decode(tiny):
    model = tiny["model"]
    windows = global_masks(model)["one"]
    path = write_windows(tiny["gguf"], tiny["dir"] / "split.gguf", windows, S)
    ref = reference_logits(model, torch.tensor(tiny["tokens"]), windows, S).numpy()
    got = runtime_logits(load(path, n_ubatch=64, swa_full=True), tiny["tokens"])
    assert float(np.abs(got - ref).max()) <= TOL
    llm = load(path, n_ubatch=7, swa_full=False)
    got = runtime_logits(llm, tiny["tokens"], prefill=100)
    assert float(np.abs(got - ref).max()) <= TOL


def test_mask_changes_logits(tiny):
    """Guards the oracle: a compressed global head changes the logits well beyond the tolerance, a budget on an
    SWA layer changes nothing (the layer keeps its own window)."""
    model = tiny["model"]
    ids = torch.tensor(tiny["tokens"])
    full = reference_logits(model, ids, 0, S).numpy()
    assert float(np.abs(full - reference_logits(model, ids, global_masks(model)["one"], S).numpy()).max()) > 100 * TOL
    swa_only = np.zeros((model.config.num_hidden_layers, model.config.num_key_value_heads), dtype=int)
    swa_only[0] = 8
    assert float(np.abs(full - reference_logits(model, ids, swa_only.tolist(), S).numpy()).max()) == 0.0


@pytest.mark.parametrize("swa_full", [False, True])
def test_identity_without_global_budgets(tiny, swa_full):
    """No budget on a global layer, or budgets switched off: the stock iSWA cache, bit for bit."""
    model = tiny["model"]
    L, H = model.config.num_hidden_layers, model.config.num_key_value_heads
    swa_only = np.zeros((L, H), dtype=int)
    swa_only[[i for i in range(L) if i not in _global_layers(model)]] = 8
    p_swa = write_windows(tiny["gguf"], tiny["dir"] / "swa-only.gguf", swa_only.tolist(), S)
    p_one = write_windows(tiny["gguf"], tiny["dir"] / "one-id.gguf", global_masks(model)["one"], S)
    stock = runtime_logits(load(tiny["gguf"], n_ubatch=7, swa_full=swa_full), tiny["tokens"])
    for path, kw in ((p_swa, {}), (p_one, {"mixed": False})):
        llm = load(path, n_ubatch=7, swa_full=swa_full, **kw)
        assert kv_bytes(llm._ctx.ctx)[0] == 0  # the stock cache
        assert np.array_equal(runtime_logits(llm, tiny["tokens"]), stock)


@pytest.mark.parametrize("budgets", [False, True])
def test_prompt_reuse_is_safe_without_swa_full(tiny, budgets):
    """swa_full=False (the default): a new prompt whose shared prefix ends where the SWA ring no longer holds the
    window re-evaluates (cache_fallback) instead of reusing it; with swa_full=True the stock prefix is reused. All
    give exactly the tokens of a fresh model."""
    from toolchain.runtime.decode import generate_step
    from toolchain.runtime.model import Model
    from toolchain.runtime.stats import GenStats

    path = tiny["gguf"]
    if budgets:
        path = write_windows(tiny["gguf"], tiny["dir"] / "reuse.gguf", global_masks(tiny["model"])["one"], S)
    toks = np.random.default_rng(3).integers(3, tiny["model"].config.vocab_size, size=700).tolist()
    first, second = toks[:600], toks[:100] + toks[650:660]

    def run(m, prompt):
        st = GenStats()
        out = list(generate_step(m.llama, prompt, 6, stats=st, stop_on_eog=False))
        return out, st.cache_fallback

    for swa_full in (False, True):
        kw = dict(n_ctx=1024, n_ubatch=7, swa_full=swa_full, flash_attn=False, cache_type="f32")
        with Model.load(path, **kw) as m:
            run(m, first)
            got, fallback = run(m, second)
        with Model.load(path, **kw) as m:
            fresh, _ = run(m, second)
        assert got == fresh, (swa_full, got, fresh)
        # with budgets the compressed head's own ring cannot rewind to position 100 either, swa_full or not
        assert fallback == (budgets or not swa_full)
