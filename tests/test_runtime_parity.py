"""The patched llama.cpp against the PyTorch reference (toolchain/train/attention.py) on F32 GGUFs (docs/architecture.md §7).

F32 weights and an F32 KV cache, flash attention off: the only differences left are float summation order, so
max |Δlogit| must stay under 1e-3 for every ubatch size and prefill/decode split, with random and structured masks.
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from helpers_models import make_tiny_hf  # noqa: E402
from helpers_runtime import load, runtime_logits, write_windows  # noqa: E402

from converters.hf_to_gguf import hf_to_gguf  # noqa: E402
from toolchain.train.attention import reference_logits  # noqa: E402

pytestmark = pytest.mark.usefixtures("patched_runtime")

TOL = 1e-3
S, W = 4, 32
N_TOKENS = 300


def _masks(n_layer, n_head_kv, seed=0):
    rng = np.random.default_rng(seed)
    random = (rng.random((n_layer, n_head_kv)) < 0.5) * W
    structured = np.zeros((n_layer, n_head_kv), dtype=int)
    structured[1:] = W  # layer 0 all full, the other layers all compressed
    several = rng.choice([0, 16, W], size=(n_layer, n_head_kv))
    several[0, 0], several[0, 1] = 16, W  # make sure both windows occur
    return {"random": random.tolist(), "structured": structured.tolist(), "several": several.tolist()}


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3", "mistral"])
def tiny(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(f"tiny-{request.param}")
    hf = make_tiny_hf(d / "hf", arch=request.param, n_layer=3, n_head=4, n_head_kv=2, head_dim=16, vocab=100, seed=1)
    gguf = hf_to_gguf(hf, d / "f32.gguf", "f32")
    model = transformers.AutoModelForCausalLM.from_pretrained(hf, torch_dtype=torch.float32)
    model.eval()
    tokens = np.random.default_rng(7).integers(3, model.config.vocab_size, size=N_TOKENS).tolist()
    return {"dir": d, "gguf": gguf, "model": model, "tokens": tokens}


@pytest.mark.parametrize("mask_name", ["random", "structured", "several"])
def test_parity_all_ubatch_sizes(tiny, mask_name):
    model = tiny["model"]
    windows = _masks(model.config.num_hidden_layers, model.config.num_key_value_heads)[mask_name]
    path = write_windows(tiny["gguf"], tiny["dir"] / f"{mask_name}.gguf", windows, S)
    ref = reference_logits(model, torch.tensor(tiny["tokens"]), windows, S).numpy()
    for ubatch in (1, 7, 64, 512):
        got = runtime_logits(load(path, n_ubatch=ubatch), tiny["tokens"])
        err = float(np.abs(got - ref).max())
        assert err <= TOL, f"{mask_name} ubatch {ubatch}: max |dlogit| = {err}"


def test_parity_prefill_then_decode(tiny):
    model = tiny["model"]
    windows = _masks(model.config.num_hidden_layers, model.config.num_key_value_heads)["random"]
    path = write_windows(tiny["gguf"], tiny["dir"] / "split.gguf", windows, S)
    ref = reference_logits(model, torch.tensor(tiny["tokens"]), windows, S).numpy()
    llm = load(path, n_ubatch=64)
    for prefill in (5, 100, 250):
        got = runtime_logits(llm, tiny["tokens"], prefill=prefill)
        assert float(np.abs(got - ref).max()) <= TOL, f"prefill {prefill}"


def test_mask_changes_logits(tiny):
    """Guards the oracle itself: compressed heads must change the logits well beyond the tolerance."""
    model = tiny["model"]
    windows = _masks(model.config.num_hidden_layers, model.config.num_key_value_heads)["structured"]
    ids = torch.tensor(tiny["tokens"])
    full = reference_logits(model, ids, 0, S).numpy()
    mixed = reference_logits(model, ids, windows, S).numpy()
    assert float(np.abs(full - mixed).max()) > 100 * TOL


def test_window_trick_one_layer(tmp_path):
    """1 layer, all heads compressed: logits at p equal stock llama.cpp on positions {0..S-1} ∪ {p-W+1..p} only."""
    hf = make_tiny_hf(tmp_path / "hf", arch="llama", n_layer=1, n_head=4, n_head_kv=2, head_dim=16, vocab=100, seed=3)
    gguf = hf_to_gguf(hf, tmp_path / "f32.gguf", "f32")
    comp = write_windows(gguf, tmp_path / "all.gguf", [[W, W]], S)
    tokens = np.random.default_rng(1).integers(3, 100, size=120).tolist()
    got = runtime_logits(load(comp, n_ubatch=7), tokens)

    # In one layer K and V depend only on the token and its position, so stock llama.cpp decoding position p
    # after evicting everything but the sinks and the window attends exactly what a compressed head sees.
    stock = load(gguf, n_ubatch=512)
    for p in (S + W + 5, 77, 119):
        stock.reset()
        stock._ctx.kv_cache_clear()
        stock.eval(tokens[:p])
        assert stock._ctx.kv_cache_seq_rm(0, S, p - W + 1)
        stock.eval([tokens[p]])
        want = np.array(stock.scores[p], dtype=np.float32)
        assert float(np.abs(got[p] - want).max()) <= TOL, f"position {p}"
        # and the window really matters at p: the full-context logits are far from these
        stock.reset()
        stock._ctx.kv_cache_clear()
        stock.eval(tokens[: p + 1])
        assert float(np.abs(np.array(stock.scores[p]) - want).max()) > 100 * TOL


def test_flash_attention_on(tiny):
    """FA on CPU casts K/V to F16, so 1e-3 cannot hold even for stock. The oracle: the mixed path under FA strays
    from the reference no more than stock llama.cpp under FA strays from it (x3, plus the F32 tolerance)."""
    model = tiny["model"]
    windows = _masks(model.config.num_hidden_layers, model.config.num_key_value_heads)["random"]
    path = write_windows(tiny["gguf"], tiny["dir"] / "fa.gguf", windows, S)
    ids = torch.tensor(tiny["tokens"])
    ref_mixed = reference_logits(model, ids, windows, S).numpy()
    ref_full = reference_logits(model, ids, 0, S).numpy()
    for ubatch in (1, 64):
        stock_err = float(np.abs(runtime_logits(load(tiny["gguf"], n_ubatch=ubatch, flash_attn=True), tiny["tokens"]) - ref_full).max())
        mixed_err = float(np.abs(runtime_logits(load(path, n_ubatch=ubatch, flash_attn=True), tiny["tokens"]) - ref_mixed).max())
        assert mixed_err <= 3 * stock_err + TOL, (ubatch, mixed_err, stock_err)


def test_parity_smollm2_dequantized(smollm2_f32, tmp_path):
    """The real model: SmolLM2 at F32 with a random half of its 90 KV heads compressed (S=4, W=32)."""
    from toolchain.heads import random_mask

    hf, gguf = smollm2_f32
    model = transformers.AutoModelForCausalLM.from_pretrained(hf, torch_dtype=torch.float32).eval()
    mask = random_mask(30, 3, 0.5, seed=1)
    windows = [[0 if full else W for full in row] for row in mask.full]
    path = write_windows(gguf, tmp_path / "smol-f32-masked.gguf", windows, S)
    tokens = np.random.default_rng(0).integers(100, 40000, size=N_TOKENS).tolist()
    ref = reference_logits(model, torch.tensor(tokens), windows, S).numpy()
    assert float(np.abs(ref - reference_logits(model, torch.tensor(tokens), 0, S).numpy()).max()) > 1.0
    for ubatch, n in ((512, N_TOKENS), (64, N_TOKENS), (7, N_TOKENS), (1, 120)):
        got = runtime_logits(load(path, n_ubatch=ubatch), tokens[:n])
        err = float(np.abs(got - ref[:n]).max())
        assert err <= TOL, f"ubatch {ubatch}: max |dlogit| = {err}"
