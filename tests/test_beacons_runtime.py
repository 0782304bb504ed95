"""The run-time beacon loop (toolchain/runtime/beacons.py) against the PyTorch beacon reference (docs/architecture.md §5, §7).

A tiny random F32 llama GGUF, F32 KV cache, flash attention off. The beacon is an existing vocabulary id (the last
one, ``--reuse-token`` semantics): an untrained beacon model must still run, and parity does not care what the beacon
means. Teacher forcing makes the runtime decode exactly ``insert_beacons(prompt, gen, c, b)``, and every decoded
position's logits must match ``reference_logits(..., segments=...)`` within 1e-3, alone and with per-head windows.
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from helpers_models import make_tiny_hf  # noqa: E402
from helpers_runtime import load, write_windows  # noqa: E402

from converters.gguf_budgets import T_U32, Value, rewrite_gguf  # noqa: E402
from converters.hf_to_gguf import hf_to_gguf  # noqa: E402
from toolchain.errors import KvtoolError  # noqa: E402
from toolchain.gguf_keys import K_BEACON_INTERVAL, K_BEACON_TOKEN, K_VERSION  # noqa: E402
from toolchain.runtime.beacons import BeaconGenerator, generate_with_beacons, peak_bound  # noqa: E402
from toolchain.train.attention import insert_beacons, reference_logits  # noqa: E402

pytestmark = pytest.mark.usefixtures("patched_runtime")

TOL = 1e-3
C = 8
S = 2
WINDOWS = [[0, 6], [4, 0], [5, 5]]  # 3 layers x 2 KV heads: full, compressed, all-compressed layer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("beacon-rt")
    hf = make_tiny_hf(d / "hf", arch="llama", n_layer=3, n_head=4, n_head_kv=2, head_dim=16, vocab=100, seed=2)
    gguf = hf_to_gguf(hf, d / "f32.gguf", "f32")
    model = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    vocab = model.config.vocab_size
    beacon = vocab - 1
    keys = {K_VERSION: Value(T_U32, 1), K_BEACON_TOKEN: Value(T_U32, beacon), K_BEACON_INTERVAL: Value(T_U32, C)}
    bgguf = rewrite_gguf(gguf, d / "beacon.gguf", keys)
    rng = np.random.default_rng(3)
    prompt = [1] + rng.integers(3, vocab - 1, size=20).tolist()
    gen = rng.integers(3, vocab - 1, size=61).tolist()  # 7 full chunks and a partial one
    return {"dir": d, "hf": hf, "gguf": gguf, "bgguf": bgguf, "model": model, "beacon": beacon, "prompt": prompt,
            "gen": gen, "vocab": vocab}


def _forced(llm, beacon, c, prompt, gen):
    g = BeaconGenerator(llm, beacon, c)
    out = list(g.generate(prompt, None, forced=gen, record=True))
    assert out == gen  # the beacon never reaches the caller
    return g


def _check_parity(g, ids, seg, ref):
    toks = [t for _, t, _ in g.recorded]
    pos = [p for p, _, _ in g.recorded]
    n = len(toks)
    # everything but the last forced token (nothing is sampled after it) and a beacon insert_beacons put after it
    assert n == len(ids) - 1 - int(seg.is_beacon[-1])
    assert toks == ids[:n].tolist() and pos == list(range(n))
    got = np.stack([lg for *_, lg in g.recorded])
    err = float(np.abs(got - ref[:n]).max())
    assert err <= TOL, f"max |dlogit| = {err}"
    return err


@pytest.mark.parametrize("c", [4, C])
@pytest.mark.parametrize("ubatch", [1, 7, 512])
def test_parity_full_heads(tiny, c, ubatch):
    ids, seg = insert_beacons(tiny["prompt"], tiny["gen"], c, tiny["beacon"])
    ref = reference_logits(tiny["model"], ids, 0, 0, segments=seg).numpy()
    g = _forced(load(tiny["gguf"], n_ctx=256, n_ubatch=ubatch), tiny["beacon"], c, tiny["prompt"], tiny["gen"])
    _check_parity(g, ids, seg, ref)


@pytest.mark.parametrize("ubatch", [1, 7, 64])
def test_parity_with_head_windows(tiny, ubatch):
    """Mixed per-head cache + beacons: visibility is the AND of both rules, in training and at run time."""
    path = write_windows(tiny["gguf"], tiny["dir"] / "windows.gguf", WINDOWS, S)
    ids, seg = insert_beacons(tiny["prompt"], tiny["gen"], C, tiny["beacon"])
    ref = reference_logits(tiny["model"], ids, WINDOWS, S, segments=seg).numpy()
    g = _forced(load(path, n_ctx=256, n_ubatch=ubatch), tiny["beacon"], C, tiny["prompt"], tiny["gen"])
    _check_parity(g, ids, seg, ref)
    assert g.stats.peak_full_cells is not None and g.stats.peak_full_cells <= g.stats.peak_live_cells


def test_oracle_sees_the_beacon_mask(tiny):
    """Guards the oracle: with beacons the logits differ from plain causal attention well beyond the tolerance."""
    ids, seg = insert_beacons(tiny["prompt"], tiny["gen"], C, tiny["beacon"])
    with_b = reference_logits(tiny["model"], ids, 0, 0, segments=seg).numpy()
    plain = reference_logits(tiny["model"], ids, 0, 0).numpy()
    assert float(np.abs(with_b - plain).max()) > 100 * TOL


def test_runs_past_n_ctx_with_bounded_live_cells(tiny):
    """Positions run far past n_ctx (256) while live cells stay at prompt + n_gen/c + c; parity holds there too."""
    rng = np.random.default_rng(9)
    gen = rng.integers(3, tiny["vocab"] - 1, size=400).tolist()
    ids, seg = insert_beacons(tiny["prompt"], gen, C, tiny["beacon"])
    ref = reference_logits(tiny["model"], ids, 0, 0, segments=seg).numpy()
    llm = load(tiny["gguf"], n_ctx=256, n_ubatch=64)
    g = _forced(llm, tiny["beacon"], C, tiny["prompt"], gen)
    assert g.n_ctx == 256 and g.stats.next_pos > g.n_ctx + 200
    _check_parity(g, ids, seg, ref)
    P, n = len(tiny["prompt"]), len(gen)
    st = g.stats
    assert st.peak_live_cells <= peak_bound(P, n, C) < P + n
    assert st.peak_full_cells == st.peak_live_cells  # measured by the runtime, not only counted
    assert st.beacons == (n - 1) // C and st.evicted == C * st.beacons
    # the prompt is never evicted; the cache holds prompt + beacons + the partial chunk
    from toolchain.runtime.library import kv_used_cells

    lo, hi = g.live_positions()
    assert lo == 0 and hi == st.next_pos - 1
    assert kv_used_cells(llm._ctx.ctx)[0] == st.live_cells == P + st.beacons + (n - 1) % C


def test_stops_when_live_cells_would_not_fit(tiny):
    """Without eviction room (c larger than what fits), the loop ends with "length" instead of failing."""
    llm = load(tiny["gguf"], n_ctx=256, n_ubatch=64)
    g = BeaconGenerator(llm, tiny["beacon"], 1000)
    out = list(g.generate(tiny["prompt"], 10_000, forced=[5] * 10_000))
    assert g.stats.finish_reason == "length" and g.stats.peak_live_cells == 256
    assert len(out) == 256 - len(tiny["prompt"]) + 1


def test_greedy_matches_reference_and_never_emits_the_beacon(tiny):
    """Sampled (greedy) generation through the loop equals the reference argmax over its own beacon sequence; the
    beacon id is banned even when it is the model's favourite."""
    llm = load(tiny["gguf"], n_ctx=256, n_ubatch=64)
    ref0 = reference_logits(tiny["model"], torch.tensor(tiny["prompt"]), 0, 0).numpy()
    favourite = int(ref0[-1].argmax())
    for beacon in (tiny["beacon"], favourite):
        g = BeaconGenerator(llm, beacon, C)
        out = list(g.generate(tiny["prompt"], 40, temperature=0.0, stop_on_eog=False))
        assert len(out) == 40 and beacon not in out
        ids, seg = insert_beacons(tiny["prompt"], out, C, beacon)
        ref = reference_logits(tiny["model"], ids, 0, 0, segments=seg).numpy()
        ref[:, beacon] = -np.inf
        P = len(tiny["prompt"])
        pred_rows = [i - 1 for i in range(P, len(ids)) if not bool(seg.is_beacon[i])]  # rows that were sampled
        assert [int(ref[r].argmax()) for r in pred_rows] == [int(ids[r + 1]) for r in pred_rows]


def test_bad_beacon_settings(tiny):
    llm = load(tiny["gguf"], n_ctx=256)
    with pytest.raises(KvtoolError, match="outside the model's vocabulary"):
        BeaconGenerator(llm, tiny["vocab"], C)
    with pytest.raises(KvtoolError, match="interval must be >= 1"):
        BeaconGenerator(llm, 5, 0)


def test_model_text_api(tiny):
    """generate_with_beacons on a kvtool Model: keys read from the GGUF, streaming == one-shot, stop strings, stats,
    and a plain high-level call afterwards still works on the cache the loop left behind."""
    from toolchain.runtime.model import Model

    with Model.load(tiny["bgguf"], n_ctx=256, cache_type="f32", n_threads=2) as m:
        assert (m.budgets.beacon_token_id, m.budgets.beacon_interval) == (tiny["beacon"], C)
        text = generate_with_beacons(m, "the answer is", max_tokens=50)
        assert text and "\x00" not in text
        assert m.last_stats.generated_tokens == m.beacon_stats.generated_tokens > 0
        assert m.beacon_stats.beacons == (m.beacon_stats.generated_tokens - 1) // C
        assert m.last_stats.finish_reason in ("stop", "length")
        pieces = list(generate_with_beacons(m, "the answer is", max_tokens=50, stream=True))
        assert "".join(pieces) == text
        if len(text.strip()) > 3:
            cut = text.strip()[2:4]
            stopped = generate_with_beacons(m, "the answer is", max_tokens=50, stop=cut)
            assert stopped == text[:text.index(cut)] and m.last_stats.finish_reason == "stop"
        assert m.kv_stats()["live_full_cells"] == m.beacon_stats.live_cells
        plain = m.generate("the answer is", max_tokens=20)  # the stock path after a beacon run
    with Model.load(tiny["bgguf"], n_ctx=256, cache_type="f32", n_threads=2) as fresh:
        assert fresh.generate("the answer is", max_tokens=20) == plain


def test_stop_filter_holds_back_partial_stop_strings():
    from toolchain.runtime.text import stop_filter as _stop_filter

    hit = []
    out = list(_stop_filter(iter(["ab", "c<", "/s", "> tail"]), ["</s>"], lambda: hit.append(1)))
    assert "".join(out) == "abc" and hit == [1]
    assert "".join(_stop_filter(iter(["a<", "/x", "y"]), ["</s>"], lambda: None)) == "a</xy"
    assert list(_stop_filter(iter(["x", "y"]), [], lambda: None)) == ["x", "y"]
