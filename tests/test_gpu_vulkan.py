"""The patched runtime on a GPU backend with every layer offloaded (issue 15): parity with the PyTorch reference,
identity with stock, where the KV buffers live, no op falling back to the CPU, and ggml's own op tests.

Marker ``vulkan``: outside the default selection; ``make test-gpu`` runs it in ``.venv-vulkan`` on Mesa's lavapipe
(a conformant Vulkan 1.3 device that runs the shaders on the CPU). ``bench/gpu_check.sh`` runs the same file with a
CUDA runtime. The module skips unless the loaded runtime was built for a GPU backend.
"""
from __future__ import annotations

import os
import re
import subprocess

# lavapipe is a CPU-type Vulkan device, which ggml-vulkan ignores unless named; must be set before libggml loads.
os.environ.setdefault("GGML_VK_VISIBLE_DEVICES", "0")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from helpers_runtime import load, runtime_logits, write_windows  # noqa: E402

from toolchain.runtime.graph_splits import load_with_splits  # noqa: E402
from toolchain.runtime.library import kv_buffers, kv_bytes, runtime_info  # noqa: E402

GPU_PREFIX = {"vulkan": "Vulkan", "cuda": "CUDA"}
BACKEND = runtime_info()["backend"]
pytestmark = [pytest.mark.vulkan, pytest.mark.usefixtures("patched_runtime"),
              pytest.mark.skipif(BACKEND not in GPU_PREFIX, reason=f"runtime backend is {BACKEND}, not a GPU one")]
PREFIX = GPU_PREFIX.get(BACKEND, "?")
ALL = -1  # llama.cpp's "every layer"
TOL = 1e-3
S, W = 4, 32
N_TOKENS = 300


def _gpu(path, **kw):
    return load(path, n_gpu_layers=kw.pop("n_gpu_layers", ALL), **kw)


def _on_gpu(buffers) -> bool:
    return bool(buffers) and all(b["device"].startswith(PREFIX) for b in buffers)


# ------------------------------------------------------------------------------------------------ parity

@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3", "mistral"])
def tiny(request, tmp_path_factory):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from helpers_models import make_tiny_hf

    from converters.hf_to_gguf import hf_to_gguf

    d = tmp_path_factory.mktemp(f"gpu-tiny-{request.param}")
    hf = make_tiny_hf(d / "hf", arch=request.param, n_layer=3, n_head=4, n_head_kv=2, head_dim=16, vocab=100, seed=1)
    gguf = hf_to_gguf(hf, d / "f32.gguf", "f32")
    model = transformers.AutoModelForCausalLM.from_pretrained(hf, torch_dtype=torch.float32).eval()
    tokens = np.random.default_rng(7).integers(3, model.config.vocab_size, size=N_TOKENS).tolist()
    rng = np.random.default_rng(0)
    windows = rng.choice([0, 16, W], size=(3, 2))
    windows[0, 0], windows[0, 1] = 16, W  # both windows and full heads occur
    return {"dir": d, "gguf": gguf, "model": model, "tokens": tokens, "torch": torch, "windows": windows.tolist()}


def bound(stock_err: float) -> float:
    """The CPU tests' rule: 1e-3 where the backend's own arithmetic meets it (stock is within 1e-3 of the reference);
    where it does not, the mixed path may stray no more than 3x stock's own error + 1e-3, as for FA on the CPU.
    On lavapipe the batched matmuls (ubatch > 1 with every layer offloaded) are not F32-exact even for stock:
    about 1e-2 from the reference (docs/gpu.md), so there the second clause applies."""
    return TOL if stock_err <= TOL else 3 * stock_err + TOL


def test_parity_all_layers_offloaded(tiny):
    """F32 weights and KV, FA off, ubatch 1, 7 and 64; the mixed path against the reference, held to ``bound``."""
    from toolchain.train.attention import reference_logits

    torch = tiny["torch"]
    path = write_windows(tiny["gguf"], tiny["dir"] / "mixed.gguf", tiny["windows"], S)
    ids = torch.tensor(tiny["tokens"])
    ref = reference_logits(tiny["model"], ids, tiny["windows"], S).numpy()
    ref_full = reference_logits(tiny["model"], ids, 0, S).numpy()
    for ubatch in (1, 7, 64):
        stock_err = float(np.abs(runtime_logits(_gpu(tiny["gguf"], n_ubatch=ubatch), tiny["tokens"]) - ref_full).max())
        err = float(np.abs(runtime_logits(_gpu(path, n_ubatch=ubatch), tiny["tokens"]) - ref).max())
        assert err <= bound(stock_err), f"ubatch {ubatch}: max |dlogit| = {err} (stock {stock_err})"
    assert stock_err < 0.1  # the backend itself is sane: a broken kernel is not excused by a broken stock run


def test_parity_flash_attention(tiny):
    """FA on: the backend's FA kernel has its own error (F16 K/V). The mixed path may stray from the reference no
    more than stock under FA on the same device strays from it (x3, plus the F32 tolerance), as on the CPU."""
    from toolchain.train.attention import reference_logits

    torch = tiny["torch"]
    path = write_windows(tiny["gguf"], tiny["dir"] / "mixed-fa.gguf", tiny["windows"], S)
    ids = torch.tensor(tiny["tokens"])
    ref_mixed = reference_logits(tiny["model"], ids, tiny["windows"], S).numpy()
    ref_full = reference_logits(tiny["model"], ids, 0, S).numpy()
    for ubatch in (1, 64):
        stock = runtime_logits(_gpu(tiny["gguf"], n_ubatch=ubatch, flash_attn=True), tiny["tokens"])
        mixed = runtime_logits(_gpu(path, n_ubatch=ubatch, flash_attn=True), tiny["tokens"])
        stock_err, mixed_err = float(np.abs(stock - ref_full).max()), float(np.abs(mixed - ref_mixed).max())
        assert mixed_err <= 3 * stock_err + TOL, (ubatch, mixed_err, stock_err)


@pytest.mark.slow
def test_parity_smollm2_f32(smollm2_f32, tmp_path):
    """The real model at F32, half of its 90 KV heads compressed (S=4, W=32), all 30 layers offloaded."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from toolchain.heads import random_mask
    from toolchain.train.attention import reference_logits

    hf, gguf = smollm2_f32
    model = transformers.AutoModelForCausalLM.from_pretrained(hf, torch_dtype=torch.float32).eval()
    mask = random_mask(30, 3, 0.5, seed=1)
    windows = [[0 if full else W for full in row] for row in mask.full]
    path = write_windows(gguf, tmp_path / "smol-f32-masked.gguf", windows, S)
    tokens = np.random.default_rng(0).integers(100, 40000, size=160).tolist()
    ids = torch.tensor(tokens)
    ref = reference_logits(model, ids, windows, S).numpy()
    ref_full = reference_logits(model, ids, 0, S).numpy()
    for ubatch, n in ((64, 160), (7, 160), (1, 60)):
        stock_err = float(np.abs(runtime_logits(_gpu(gguf, n_ubatch=ubatch), tokens[:n]) - ref_full[:n]).max())
        err = float(np.abs(runtime_logits(_gpu(path, n_ubatch=ubatch), tokens[:n]) - ref[:n]).max())
        print(f"[smollm2 f32] ubatch {ubatch}, {n} tokens: mixed {err:.3g}, stock {stock_err:.3g}, "
              f"bound {bound(stock_err):.3g}")  # the figures docs/gpu.md records (pytest -s)
        assert err <= bound(stock_err), f"ubatch {ubatch}: max |dlogit| = {err} (stock {stock_err})"


# ---------------------------------------------------------------------------------------------- identity

@pytest.mark.parametrize("flash_attn", [False, True])
@pytest.mark.parametrize("f32_kv", [False, True])
def test_no_budgets_is_bit_identical_on_gpu(tiny_gguf, tokens, tmp_path, flash_attn, f32_kv):
    """A file without budgets, with kvtool.kv.enabled=false, or whose budgets are switched off by the override,
    gives the same logits bit for bit as the file without keys, on the same GPU backend."""
    kw = dict(n_ubatch=64, f32_kv=f32_kv, flash_attn=flash_attn)
    base = runtime_logits(_gpu(tiny_gguf, **kw), tokens)
    disabled = write_windows(tiny_gguf, tmp_path / "off.gguf", [[32, 32]] * 3, 4, enabled=False)
    masked = write_windows(tiny_gguf, tmp_path / "masked.gguf", [[32, 0]] * 3, 4)
    for name, llm in (("disabled", _gpu(disabled, **kw)), ("override", _gpu(masked, mixed=False, **kw))):
        assert kv_bytes(llm._ctx.ctx)[0] is False, name
        assert np.array_equal(runtime_logits(llm, tokens), base), name
    llm = _gpu(masked, **kw)  # not vacuous: the masked file differs when mixed
    assert kv_bytes(llm._ctx.ctx)[0] is True
    assert not np.array_equal(runtime_logits(llm, tokens), base)


# ------------------------------------------------------------------------------------ placement and splits

def test_kv_buffers_of_both_groups_on_the_device(tiny_gguf, tmp_path):
    masked = write_windows(tiny_gguf, tmp_path / "masked.gguf", [[32, 0]] * 3, 4)
    llm = _gpu(masked, n_ubatch=64, f32_kv=False)
    bufs = kv_buffers(llm._ctx.ctx)
    assert {b["group"] for b in bufs} == {"full", "ring"}, bufs
    assert _on_gpu(bufs), bufs
    mixed, full, ring = kv_bytes(llm._ctx.ctx)
    assert mixed and sum(b["bytes"] for b in bufs if b["group"] == "full") == full
    assert sum(b["bytes"] for b in bufs if b["group"] == "ring") == ring
    # the oracle can fail: without offload the same cache is reported on the CPU
    on_cpu = _gpu(masked, n_ubatch=64, f32_kv=False, n_gpu_layers=0)  # held: the context dies with the object
    cpu = kv_buffers(on_cpu._ctx.ctx)
    assert {b["group"] for b in cpu} == {"full", "ring"} and all(b["device"] == "CPU" for b in cpu), cpu


@pytest.mark.parametrize("flash_attn", [False, True])
def test_split_count_with_mixed_kv_equals_stock(tiny_gguf, tmp_path, flash_attn):
    """No op of the mixed graph falls back to the CPU: the scheduler cuts the mixed graph into as many pieces as the
    stock one, for the prompt graph and the token graph."""
    masked = write_windows(tiny_gguf, tmp_path / "masked.gguf", [[32, 0], [0, 32], [32, 32]], 4)
    kw = dict(n_ubatch=64, f32_kv=False, flash_attn=flash_attn)
    stock, stock_splits = load_with_splits(lambda: _gpu(masked, mixed=False, **kw))
    mixed, mixed_splits = load_with_splits(lambda: _gpu(masked, **kw))
    assert kv_bytes(mixed._ctx.ctx)[0] and not kv_bytes(stock._ctx.ctx)[0]
    assert mixed_splits == stock_splits, (mixed_splits, stock_splits)
    # the count sees CPU work: one layer offloaded of three cuts the graph into more pieces
    _, partial = load_with_splits(lambda: _gpu(masked, n_gpu_layers=1, **kw))
    assert partial[0] > mixed_splits[0], (partial, mixed_splits)


# ------------------------------------------------------------------------------------ ggml's test-backend-ops

# The ops the mixed graph adds, each checked on the GPU backend against ggml's CPU backend.
BACKEND_OPS = ["GET_ROWS", "CONCAT", "SET_ROWS", "SOFT_MAX"]

# FLASH_ATTN_EXT has thousands of cases; the runtime's subset (24) is what it runs for SmolLM2: head size 64, a mask,
# no sinks or softcap, F32 precision, F16 K/V, GQA ratios 1 and 4, KV lengths 113/512/1024, batches 1/3/32/75 (and
# the permuted layout ggml tests at KV 512). Each case runs in its own process: on lavapipe a single process that
# runs the KV-512 cases and then the KV-1024 ones aborts with glibc heap corruption ("corrupted double-linked list")
# although every case passes on its own (docs/gpu.md); that sequence is kept below as a known failure.
_FA_TAIL = "mask=1,sinks=0,max_bias=0.000000,logit_softcap=0.000000,prec=f32,type_K=f16,type_V=f16"
FA_CASES = [rf"hsk=64,hsv=64,nh=4,nr23=\[{nr}\],kv={kv},nb={nb},{_FA_TAIL},permute=\[{perm}\],"
            for nr in ("1,1", "4,1") for kv in (113, 512, 1024) if nr == "1,1" or kv == 512
            for nb in (1, 3, 32, 75) for perm in (("0,1,2,3", "0,2,1,3") if kv == 512 else ("0,1,2,3",))]
FA_SEQUENCE = rf"hsk=64,hsv=64,nh=4,nr23=\[1,1\],kv=(512|1024),.*{_FA_TAIL},permute=\[0,1,2,3\],"


@pytest.fixture(scope="module")
def test_backend_ops(tmp_path_factory):
    from helpers_gpu import build_test_backend_ops

    return build_test_backend_ops(echo=lambda m: None)


def _backend_ops(exe, op, params=None):
    """(passed, total, returncode, output) of one test-backend-ops run on the GPU backend against the CPU."""
    cmd = [str(exe), "test", "-b", f"{PREFIX}0", "-o", op] + (["-p", params] if params else [])
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    out = res.stdout + res.stderr
    m = re.search(r"(\d+)/(\d+) tests passed", out)
    return (int(m.group(1)), int(m.group(2))) if m else (None, None), res.returncode, out


@pytest.mark.slow  # tens of minutes on lavapipe: `make test-gpu-all`
@pytest.mark.parametrize("op", BACKEND_OPS)
def test_backend_ops_against_cpu(test_backend_ops, op):
    (passed, total), rc, out = _backend_ops(test_backend_ops, op)
    assert total and passed == total and rc == 0, out[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("case", FA_CASES, ids=[re.sub(r"hsk=64,hsv=64,nh=4,|" + re.escape(_FA_TAIL) + r",|\\", "", c)
                                                 .strip(",") for c in FA_CASES])
def test_backend_ops_flash_attn_case(test_backend_ops, case):
    (passed, total), rc, out = _backend_ops(test_backend_ops, "FLASH_ATTN_EXT", case)
    assert total == 1 and passed == 1 and rc == 0, out[-2000:]  # exactly one case: the pattern cannot go stale


def test_flash_attn_cases_cover_the_subset():
    assert len(FA_CASES) == 24 and len(set(FA_CASES)) == 24


@pytest.mark.slow
@pytest.mark.xfail(reason="lavapipe: KV-512 then KV-1024 FA cases in one process corrupt the heap "
                          "(ggml-vulkan or Mesa 22.3 lavapipe, undiagnosed further); docs/gpu.md", strict=False)
def test_backend_ops_flash_attn_sequence_in_one_process(test_backend_ops):
    (passed, total), rc, out = _backend_ops(test_backend_ops, "FLASH_ATTN_EXT", FA_SEQUENCE)
    assert total == 8 and passed == total and rc == 0, out[-2000:]
