"""``kvtool eval --ppl`` against llama.cpp's own ``llama-perplexity`` on SmolLM2 (s=0.5, S=16, W=64).

Same file, text, window (512), scored half, F32 cache and flash attention; stock is the same file with
``--override-kv kvtool.kv.enabled=bool:false``. The two tools cut windows one token apart when the vocabulary adds
BOS (llama-perplexity tokenizes the text with a leading BOS, kvtool replaces each window's first token by it), so
they are compared within 1%, not bit for bit.
"""
from __future__ import annotations

import re
import subprocess

import pytest
from helpers_tools import tool_paths

N_CTX, CHUNKS = 512, 8


def llama_perplexity(exe, model, text, *extra) -> float:
    cmd = [str(exe), "-m", str(model), "-f", str(text), "-c", str(N_CTX), "-b", str(N_CTX), "--chunks", str(CHUNKS),
           "-ctk", "f32", "-ctv", "f32", "-fa", "on", "-t", "1", "-ngl", "0", *extra]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-2000:]
    m = re.search(r"Final estimate: PPL = ([\d.]+)", res.stdout + res.stderr)
    assert m, (res.stdout + res.stderr)[-2000:]
    return float(m.group(1))


@pytest.mark.slow
def test_kvtool_ppl_agrees_with_llama_perplexity(smollm2_masked):
    pytest.importorskip("reasoning_gym")
    from toolchain.eval.ppl import default_ppl_text, run_ppl

    exe = tool_paths()["llama-perplexity"]
    text = default_ppl_text()
    ours = run_ppl(smollm2_masked, text, n_ctx=N_CTX, max_tokens=N_CTX * CHUNKS, cache_type="f32", threads=1,
                   progress=False)
    assert ours["windows"] == CHUNKS
    full = llama_perplexity(exe, smollm2_masked, text, "--override-kv", "kvtool.kv.enabled=bool:false")
    mixed = llama_perplexity(exe, smollm2_masked, text)
    print(f"ppl full: kvtool {ours['ppl_full']:.4f} llama-perplexity {full:.4f}; "
          f"mixed: kvtool {ours['ppl_mixed']:.4f} llama-perplexity {mixed:.4f}")  # shown with pytest -rA
    assert mixed != full  # the mixed cache really ran in llama-perplexity (W=64 < 512 changes the logits)
    assert abs(ours["ppl_full"] / full - 1) < 0.01, (ours["ppl_full"], full)
    assert abs(ours["ppl_mixed"] / mixed - 1) < 0.01, (ours["ppl_mixed"], mixed)
