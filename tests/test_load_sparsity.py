"""One file, any sparsity: the runtime rebuilds the mask from ``kvtool.heads.scores`` at load time
(cpp/kvtool-rederive.cpp) exactly as ``toolchain.heads`` does, so the override gives logits bit-identical to a file
converted at that sparsity. Checked through kv_overrides (Python), the C API's override structs with the tags
``--override-kv`` makes, and ``Model.load(sparsity=...)``."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from helpers_runtime import load, runtime_logits

from converters.gguf_budgets import apply_mask
from toolchain.errors import KvtoolError
from toolchain.gguf_keys import K_KV_SPARSITY, K_KV_WINDOW, K_SCORES, K_SINK
from toolchain.heads import HeadsMask
from toolchain.runtime.library import model_budgets

pytestmark = pytest.mark.usefixtures("patched_runtime")


@pytest.fixture(scope="module")
def wide_gguf(tmp_path_factory):
    """A random 5-layer llama with 4 KV heads per layer: 20 heads, so s = 0.025, 0.075, ... land on k + 1/2."""
    pytest.importorskip("torch")
    from helpers_models import make_tiny_hf

    from converters.hf_to_gguf import hf_to_gguf

    d = tmp_path_factory.mktemp("wide")
    hf = make_tiny_hf(d / "hf", arch="llama", n_layer=5, n_head=4, n_head_kv=4, head_dim=16, vocab=100, seed=9)
    return hf_to_gguf(hf, d / "wide-f32.gguf", "f32")


def tied_scores(L: int, H: int, seed: int = 0) -> list[list[float]]:
    """Scores with many ties, including ties made by clipping (values outside [0, 1])."""
    rng = np.random.default_rng(seed)
    return rng.choice([-0.5, 0.0, 0.25, 0.25, 0.5, 0.5, 0.5, 1.0, 1.5, 0.3], size=(L, H)).tolist()


def budgets_of(llm) -> tuple[list[int], int]:
    return model_budgets(llm._model.model)


def test_mask_matches_python_rule_ties_and_rounding(wide_gguf, tmp_path):
    for per_layer in (False, True):
        mask = HeadsMask.from_scores(tied_scores(5, 4), 0.5, "manual", per_layer=per_layer, sink=2, window=8)
        path = apply_mask(wide_gguf, tmp_path / f"w{per_layer}.gguf", mask)
        grid = [0.0, 0.025, 0.075, 0.125, 0.175, 0.35, 0.45, 0.5, 0.55, 0.625, 0.875, 0.975, 1.0, 1 / 3, 0.1 + 0.2]
        for s in grid:
            llm = load(path, n_ctx=256, kv_overrides={K_KV_SPARSITY: float(s)})
            want = mask.with_sparsity(s).head_window()
            assert budgets_of(llm) == (want, 2), (per_layer, s)
            llm.close()
    # window and sink overrides, and an int-tagged sparsity (what --override-kv ...=int:1 makes)
    llm = load(path, n_ctx=256, kv_overrides={K_KV_SPARSITY: 1, K_KV_WINDOW: 5, K_SINK: 3})
    assert budgets_of(llm) == ([5] * 20, 3)


def test_override_logits_bit_identical_to_converted_files(wide_gguf, tokens, tmp_path):
    mask = HeadsMask.from_scores(tied_scores(5, 4, seed=1), 0.5, "manual", sink=4, window=16)
    one = apply_mask(wide_gguf, tmp_path / "one.gguf", mask)
    seen = []
    for s in (0.25, 0.5, 0.75):
        conv = apply_mask(wide_gguf, tmp_path / f"s{s}.gguf", mask.with_sparsity(s))
        ref_llm = load(conv, n_ubatch=64)
        ov_llm = load(one, n_ubatch=64, kv_overrides={K_KV_SPARSITY: s})
        assert budgets_of(ov_llm) == budgets_of(ref_llm)
        ref = runtime_logits(ref_llm, tokens)
        assert np.array_equal(runtime_logits(ov_llm, tokens), ref), s
        seen.append(ref)
    # the three sparsities really run different masks
    assert not np.array_equal(seen[0], seen[1]) and not np.array_equal(seen[1], seen[2])


def test_model_load_sparsity(wide_gguf, tmp_path):
    from toolchain.runtime.model import Model

    mask = HeadsMask.from_scores(tied_scores(5, 4, seed=2), 0.25, "manual", sink=4, window=16)
    one = apply_mask(wide_gguf, tmp_path / "one.gguf", mask)
    conv = apply_mask(wide_gguf, tmp_path / "s75.gguf", mask.with_sparsity(0.75, None))
    prompt = "the word of time and the water"
    with Model.load(conv, n_ctx=256, n_threads=2) as m:
        want = m.generate(prompt, max_tokens=24)
        want_kv = m.kv_stats()
    with Model.load(one, n_ctx=256, n_threads=2, sparsity=0.75) as m:
        assert [w for row in m.budgets.head_window for w in row] == budgets_of(m.llama)[0]
        assert m.generate(prompt, max_tokens=24) == want
        kv = m.kv_stats()
        assert kv["allocated_bytes"] == kv["predicted_bytes"] == want_kv["allocated_bytes"]
    with Model.load(one, n_ctx=256, n_threads=2, window=4, sink=1) as m:
        assert budgets_of(m.llama) == ([0 if f else 4 for r in mask.full for f in r], 1)


def test_model_load_override_errors_name_the_key(wide_gguf, tmp_path):
    from toolchain.runtime.model import Model

    mask = HeadsMask.from_scores(tied_scores(5, 4), 0.5, "manual")
    mask.scores = None
    no_scores = apply_mask(wide_gguf, tmp_path / "noscores.gguf", mask)
    with pytest.raises(KvtoolError, match=f"{K_KV_SPARSITY}: the file has no {K_SCORES}"):
        Model.load(no_scores, n_ctx=256, sparsity=0.5)
    with pytest.raises(KvtoolError, match=f"{K_KV_SPARSITY}: the file has no kvtool budgets"):
        Model.load(wide_gguf, n_ctx=256, sparsity=0.5)
    with pytest.raises(KvtoolError, match=K_KV_WINDOW):
        Model.load(no_scores, n_ctx=256, window=0)


LOAD = """
import json, sys
from llama_cpp import Llama
try:
    Llama(sys.argv[1], n_ctx=256, verbose=True, kv_overrides=json.loads(sys.argv[2]))
except ValueError as e:
    print("LOAD-FAILED", e)
    sys.exit(3)
print("LOADED")
"""


@pytest.mark.parametrize("which,ov,needles", [
    ("noscores", {K_KV_SPARSITY: 0.5}, [K_KV_SPARSITY, K_SCORES]),
    ("noscores", {K_KV_WINDOW: 8}, [K_KV_WINDOW, K_SCORES]),
    ("plain", {K_KV_SPARSITY: 0.5}, [K_KV_SPARSITY, "kvtool.kv.head_window"]),
    ("scores", {K_KV_SPARSITY: 1.5}, [K_KV_SPARSITY, "[0, 1]"]),
    ("scores", {K_KV_SPARSITY: "half"}, [K_KV_SPARSITY, "float"]),
    ("scores", {K_KV_WINDOW: 0}, [K_KV_WINDOW, "[1, 2147483647]"]),
    ("scores", {K_KV_WINDOW: 2.5}, [K_KV_WINDOW, "int"]),
])
def test_runtime_refuses_bad_overrides_naming_the_key(wide_gguf, tmp_path, which, ov, needles):
    """The C++ side alone (a C app or llama-server has no Python checks in front of it)."""
    mask = HeadsMask.from_scores(tied_scores(5, 4), 0.5, "manual")
    if which == "noscores":
        mask.scores = None
    path = wide_gguf if which == "plain" else apply_mask(wide_gguf, tmp_path / f"{which}.gguf", mask)
    res = subprocess.run([sys.executable, "-c", LOAD, str(path), json.dumps(ov)], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 3, (res.returncode, res.stderr[-2000:])
    err = [ln for ln in res.stderr.splitlines() if "error loading model" in ln]
    assert err, res.stderr[-2000:]
    for n in needles:
        assert n in err[0], (n, err[0])


@pytest.mark.slow  # six SmolLM2 loads: 130 s on the shared 2-core machine
def test_smollm2_one_file_serves_every_sparsity(smollm2, tmp_path):
    """The issue's target on the demo model: one file at s = 0.25, 0.5, 0.75 through the override is bit-identical
    to the file converted at each (Q4_1 weights, f16 cache, flash attention as kvtool runs it)."""
    from toolchain.heads import random_mask

    mask = random_mask(30, 3, 0.5, seed=0)
    one = apply_mask(smollm2, tmp_path / "one.gguf", mask)
    toks = np.random.default_rng(3).integers(100, 20000, size=96).tolist()
    for s in (0.25, 0.5, 0.75):
        conv = apply_mask(smollm2, tmp_path / f"s{s}.gguf", mask.with_sparsity(s))
        kw = dict(n_ctx=256, n_ubatch=32, f32_kv=False, flash_attn=True)
        ref_llm = load(conv, **kw)
        ov_llm = load(one, kv_overrides={K_KV_SPARSITY: s}, **kw)
        assert budgets_of(ov_llm) == budgets_of(ref_llm)
        assert np.array_equal(runtime_logits(ov_llm, toks), runtime_logits(ref_llm, toks)), s
        ref_llm.close()
        ov_llm.close()


def test_model_load_kv_budget_allocates_what_it_predicts(wide_gguf, tmp_path, capfd):
    from helpers_cli import kvtool

    from toolchain.runtime.model import Model

    mask = HeadsMask.from_scores(tied_scores(5, 4, seed=3), 0.5, "manual", sink=4, window=16)
    one = apply_mask(wide_gguf, tmp_path / "one.gguf", mask)
    # 5 x 4 heads x 64 B per token (f16, head dim 16): a full cache at 1024 tokens is 1.25 MiB
    with Model.load(one, n_ctx=1024, n_threads=2, kv_budget="1MiB") as m:
        line = capfd.readouterr().err.strip().splitlines()[-1]
        kv = m.kv_stats()
        assert kv["allocated_bytes"] <= 1 << 20 and kv["allocated_bytes"] == kv["predicted_bytes"]
        assert line.startswith("kvtool: --kv-budget 1.0 MiB: sparsity ") and f"({kv['allocated_bytes']} bytes)" in line
        s = float(line.split("sparsity ")[1].split()[0])
        assert [w for row in m.budgets.head_window for w in row] == budgets_of(m.llama)[0] \
            == mask.with_sparsity(s).head_window()
    with Model.load(one, n_ctx=1024, n_threads=2, kv_budget=2 << 20) as m:  # room for a full cache
        assert m.kv_stats()["mixed"] is False
    res = kvtool("generate", str(one), "-p", "the word", "-n", "4", "--threads", "2", "--kv-budget", "1MiB",
                 "--n-ctx", "1024")
    assert res.returncode == 0, res.stderr
    assert line in res.stderr.splitlines()
