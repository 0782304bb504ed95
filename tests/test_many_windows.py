"""Issue 16, case 1: files with several windows per layer load and decode (no graph pool abort).

The mixed attention adds a gather, two cache stores and one attention per head group and layer. The graph's
node budget used to be the stock one, so a valid file with a full head and two windows in each of SmolLM2's 30
layers aborted in ``ggml_new_object``. The runtime now sizes the budget from the file's groups
(``kvtool_graph_extra_nodes``). The model here has 16 layers and 9 KV heads, enough layers that the stock budget
(its 1024-node floor) is too small for 3 or more groups per layer.

Each window count runs in its own interpreter: an abort there is a failed test naming the case, not a dead
pytest. Matrix: {1, 2, 3, 8} windows per layer (plus the full head) x {f16, q8_0, q4_0} x flash attention
{on, off} x ubatch {1, 512}. Without flash attention llama.cpp refuses a quantized V cache (a clean error,
checked through ``Model.load``), so those cases quantize K only.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

N_LAYER, N_HEAD_KV, HEAD_DIM = 16, 9, 32

_RUN = r"""
import json, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
from helpers_runtime import load
from toolchain.runtime.library import kv_groups
from toolchain.gguf_keys import cache_type

path, k = sys.argv[2], int(sys.argv[3])
# a prompt past the smallest window; ubatch 1 then decodes it token by token (graph reuse across steps)
toks = np.random.default_rng(3).integers(3, 90, size=12).tolist()
for cache in ("f16", "q8_0", "q4_0"):
    for fa in (True, False):
        for ub in (1, 512):
            tk = cache_type(cache).ggml_id
            tv = tk if fa else cache_type("f16").ggml_id
            print("case", cache, "fa" if fa else "nofa", ub, flush=True)
            llm = load(path, n_ctx=256, n_ubatch=ub, f32_kv=False, flash_attn=fa, type_k=tk, type_v=tv,
                       n_threads=1)
            groups = [w for w, _ in kv_groups(llm._ctx.ctx)]
            if ub == 1:
                for t in toks:
                    llm.eval([t])
            else:
                llm.eval(toks)
            row = np.array(llm.scores[len(toks) - 1])
            assert np.isfinite(row).all(), "non-finite logits"
            print("ok", json.dumps({"cache": cache, "fa": fa, "ubatch": ub, "groups": groups}), flush=True)
            llm.close()
"""


@pytest.fixture(scope="module")
def wide_gguf(tmp_path_factory, patched_runtime):
    pytest.importorskip("torch")
    from helpers_models import make_tiny_hf

    from converters.hf_to_gguf import hf_to_gguf

    d = tmp_path_factory.mktemp("wide")
    hf = make_tiny_hf(d / "hf", arch="llama", n_layer=N_LAYER, n_head=N_HEAD_KV, n_head_kv=N_HEAD_KV,
                      head_dim=HEAD_DIM, vocab=100, seed=2)
    return hf_to_gguf(hf, d / "wide-f32.gguf", "f32")


def windows_file(src: Path, dst: Path, k: int) -> tuple[Path, list[int]]:
    """Every layer: heads cycle through the full head and k windows (4, 8, ...), so each layer has k+1 groups."""
    from helpers_runtime import write_windows

    ws = [0] + [4 * (i + 1) for i in range(k)]
    row = [ws[h % len(ws)] for h in range(N_HEAD_KV)]
    return write_windows(src, dst, [row] * N_LAYER, sink=4), sorted(set(ws))


@pytest.mark.parametrize("k", [1, 2, 3, 8])
def test_windows_per_layer_load_and_decode(wide_gguf, tmp_path, k):
    path, ws = windows_file(wide_gguf, tmp_path / f"w{k}.gguf", k)
    res = subprocess.run([sys.executable, "-c", _RUN, str(Path(__file__).parent), str(path), str(k)],
                         capture_output=True, text=True, timeout=600)
    cases = [ln for ln in res.stdout.splitlines() if ln.startswith("case ")]
    assert res.returncode == 0, (f"{k} windows per layer: died (rc {res.returncode}) at {cases[-1:]}\n"
                                 f"{res.stderr[-2000:]}")
    done = [json.loads(ln[3:]) for ln in res.stdout.splitlines() if ln.startswith("ok ")]
    assert len(done) == 12
    for d in done:
        assert sorted(d["groups"]) == ws, d  # the mixed cache is really active, with every group
