"""The real sliding-window file (issue 19, item 4): Gemma-3-270M fetched and verified like SmolLM2, converted with
2 of its 3 global heads compressed, run mixed; its measured KV bytes equal the prediction."""
from __future__ import annotations

import numpy as np
import pytest
from helpers_cli import kvtool

from converters.convert import convert_model
from toolchain.heads import random_mask
from toolchain.models_gemma3 import GEMMA3_SHA256, fetch_gemma3
from toolchain.pypi_fetch import sha256_file
from toolchain.runtime.memory import dims_from_gguf, predict
from toolchain.runtime.model import Model
from toolchain.swa_mask import restrict_to_global

pytestmark = pytest.mark.usefixtures("patched_runtime")


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    src = fetch_gemma3()  # downloads once into ~/.cache/kvtool when absent
    dims = dims_from_gguf(src)
    mask, _ = restrict_to_global(random_mask(dims.n_layer, 1, 0.67, seed=0, sink=16, window=64),
                                 [dims.swa_layer(i) for i in range(dims.n_layer)])
    return src, dims, convert_model(src, mask, tmp_path_factory.mktemp("g3") / "mixed.gguf")


def test_fetch_is_verified_and_cli_prints_the_path(gemma3):
    src, dims, _ = gemma3
    assert sha256_file(src) == GEMMA3_SHA256
    res = kvtool("fetch", "gemma3-270m")
    assert res.returncode == 0 and res.stdout.strip() == str(src)
    assert (dims.arch, dims.n_layer, dims.n_swa) == ("gemma3", 18, 512)
    assert [il for il in range(18) if not dims.swa_layer(il)] == [5, 11, 17]


@pytest.mark.parametrize("swa_full", [False, True])
def test_runs_mixed_and_measured_equals_prediction(gemma3, swa_full):
    src, dims, mixed = gemma3
    with Model.load(mixed, n_ctx=4096, n_ubatch=64, swa_full=swa_full) as m:
        st = m.kv_stats()
        text = m.generate("The capital of France is", max_tokens=8)
    assert st["mixed"] and st["allocated_bytes"] == st["predicted_bytes"]
    plan = predict(dims, [[0] * 1 for _ in range(18)], 16, 4096, 64, swa_full=swa_full)
    assert st["stock_bytes"] == plan.stock_bytes and st["allocated_bytes"] < plan.stock_bytes
    assert isinstance(text, str) and text.strip()


def test_short_prompt_matches_stock(gemma3):
    """Below sink + window every compressed head still sees everything: mixed and stock agree (float rounding only)."""
    src, _, mixed = gemma3
    out = []
    for path in (src, mixed):
        with Model.load(path, n_ctx=1024, n_ubatch=32, flash_attn=False) as m:
            llm = m.llama
            toks = m.tokenize("Sliding windows keep memory small. " * 4)[:60]
            llm.reset()
            llm.eval(toks)
            out.append(np.array(llm.scores[len(toks) - 1], dtype=np.float32))
    assert float(np.abs(out[0] - out[1]).max()) < 2e-2
