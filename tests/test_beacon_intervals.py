"""Beacon intervals chosen at load (``--beacon-interval C|auto``, ``kvtool.beacon.intervals``).

The tiny random F32 llama of test_beacons_runtime.py with an existing id as its beacon. What must hold: the key is
validated like the other beacon keys; ``Model.load(beacon_interval=C)`` runs the loop at C and refuses a C the file
does not list, naming it; ``auto`` starts at the smallest interval, switches up when the projected live KV would pass
the budget, never holds more live cells than the budget, and its logits (teacher-forced, with the switches) equal the
PyTorch beacon reference over the same variable-chunk sequence.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from helpers_models import make_tiny_hf  # noqa: E402

from converters.gguf_budgets import T_ARR, T_U32, Value, read_budgets, rewrite_gguf  # noqa: E402
from converters.hf_to_gguf import hf_to_gguf  # noqa: E402
from toolchain.errors import KvtoolError  # noqa: E402
from toolchain.gguf_keys import K_BEACON_INTERVAL, K_BEACON_INTERVALS, K_BEACON_TOKEN, K_VERSION  # noqa: E402
from toolchain.runtime import beacon_interval as bi  # noqa: E402
from toolchain.train.attention import BeaconSegments, reference_logits  # noqa: E402

pytestmark = pytest.mark.usefixtures("patched_runtime")
CS = (4, 8, 16)


def _keys(beacon, interval, intervals=None):
    keys = {K_VERSION: Value(T_U32, 1), K_BEACON_TOKEN: Value(T_U32, beacon), K_BEACON_INTERVAL: Value(T_U32, interval)}
    if intervals is not None:
        keys[K_BEACON_INTERVALS] = Value(T_ARR, list(intervals), T_U32)
    return keys


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("beacon-int")
    hf = make_tiny_hf(d / "hf", arch="llama", n_layer=2, n_head=4, n_head_kv=2, head_dim=16, vocab=100, seed=5)
    gguf = hf_to_gguf(hf, d / "f32.gguf", "f32")
    model = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    beacon = model.config.vocab_size - 1
    multi = rewrite_gguf(gguf, d / "multi.gguf", _keys(beacon, 4, CS))
    single = rewrite_gguf(gguf, d / "single.gguf", _keys(beacon, 8))
    return {"dir": d, "gguf": gguf, "multi": multi, "single": single, "model": model, "beacon": beacon}


def _load(path, **kw):
    from toolchain.runtime.model import Model

    return Model.load(path, n_ctx=512, cache_type="f32", n_threads=2, flash_attn=False, n_ubatch=64, **kw)


# --- the key ---------------------------------------------------------------------------------------------------------
def test_intervals_key_is_read_and_validated(tiny, tmp_path):
    b = read_budgets(tiny["multi"])
    assert (b.beacon_interval, b.beacon_intervals, b.supported_intervals()) == (4, CS, CS)
    assert read_budgets(tiny["single"]).supported_intervals() == (8,)
    bad = [(_keys(tiny["beacon"], 4, (8, 16)), "does not hold kvtool.beacon.interval = 4"),
           (_keys(tiny["beacon"], 4, (4, 16, 8)), "strictly ascending"),
           (_keys(tiny["beacon"], 4, (0, 4)), ">= 1"),
           ({K_VERSION: Value(T_U32, 1), K_BEACON_INTERVALS: Value(T_ARR, [4, 8], T_U32)}, "needs kvtool.beacon.token_id"),
           ({**_keys(tiny["beacon"], 4), K_BEACON_INTERVALS: Value(T_U32, 4)}, "wrong type")]
    for i, (keys, msg) in enumerate(bad):
        p = rewrite_gguf(tiny["gguf"], tmp_path / f"bad{i}.gguf", keys)
        with pytest.raises(KvtoolError, match=msg):
            read_budgets(p)


def test_convert_keeps_the_intervals_and_a_new_beacon_drops_them(tiny, tmp_path):
    from converters.gguf_budgets import apply_mask
    from toolchain.heads import random_mask

    kept = read_budgets(apply_mask(tiny["multi"], tmp_path / "m.gguf", random_mask(2, 2, 0.5, seed=0)))
    assert kept.beacon_intervals == CS and kept.head_window is not None
    new = read_budgets(apply_mask(tiny["multi"], tmp_path / "n.gguf", random_mask(2, 2, 0.5, seed=0),
                                  tiny["beacon"], 8))
    assert new.beacon_interval == 8 and new.beacon_intervals is None


# --- the choice at load ----------------------------------------------------------------------------------------------
def test_interval_chosen_at_load_runs_the_loop_at_it(tiny):
    from toolchain.runtime.beacons import generate_with_beacons

    n = 70
    for c in (None, 4, 8, 16):
        with _load(tiny["multi"], beacon_interval=c) as m:
            want = 4 if c is None else c
            assert m.beacon_schedule().interval == want and not m.beacon_schedule().adaptive
            generate_with_beacons(m, [1, 5, 6, 7], max_tokens=n)
            st = m.beacon_stats
            assert st.interval == want and st.generated_tokens == n and st.beacons == (n - 1) // want
            assert st.evicted == want * st.beacons and not st.switches
            assert m.kv_stats()["beacons"]["interval"] == want
    with _load(tiny["multi"], beacon_interval="16") as m:  # the CLI's string form
        assert m.beacon_schedule().interval == 16


def test_unsupported_interval_fails_naming_it(tiny):
    with pytest.raises(KvtoolError, match=r"beacon interval 12 is not supported by this file .*4, 8, 16"):
        _load(tiny["multi"], beacon_interval=12)
    with pytest.raises(KvtoolError, match=r"beacon interval 4 is not supported .*trained for 8;"):
        _load(tiny["single"], beacon_interval=4)
    with _load(tiny["single"], beacon_interval=8) as m:  # the one interval of a single-interval file
        assert m.beacon_schedule().interval == 8
    for bad in (0, -3, "x", "8.5", True):
        with pytest.raises(KvtoolError, match="must be an integer >= 1 or 'auto'"):
            _load(tiny["multi"], beacon_interval=bad)
    with pytest.raises(KvtoolError, match="no kvtool.beacon keys"):
        _load(tiny["gguf"], beacon_interval=8)
    with pytest.raises(KvtoolError, match="needs a KV budget"):
        _load(tiny["multi"], beacon_interval="auto")
    with pytest.raises(KvtoolError, match="too small"):
        _load(tiny["multi"], beacon_interval="auto", beacon_budget=100)


def test_cli_error_is_one_line(tiny):
    from helpers_cli import assert_one_line_error, kvtool

    r = kvtool("generate", str(tiny["multi"]), "-p", "ab", "-n", "4", "--beacon-interval", "12", "--n-ctx", "256")
    assert_one_line_error(r, contains="beacon interval 12 is not supported")
    r = kvtool("generate", str(tiny["multi"]), "-p", "ab", "-n", "4", "--beacon-interval", "auto", "--n-ctx", "256")
    assert_one_line_error(r, contains="needs a KV budget")
    r = kvtool("inspect", str(tiny["multi"]), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["beacon"] == {"token_id": tiny["beacon"], "interval": 4, "intervals": list(CS)}
    r = kvtool("generate", str(tiny["multi"]), "-p", "ab", "-n", "30", "--beacon-interval", "auto", "--kv-budget",
               "20KiB", "--n-ctx", "256", "--json")
    assert r.returncode == 0, r.stderr
    kv = json.loads(r.stdout)["kv"]["beacons"]
    assert kv["adaptive"] and kv["budget_cells"] == 20 * 1024 // 256 and kv["peak_live_cells"] <= kv["budget_cells"]


# --- adaptive ----------------------------------------------------------------------------------------------------------
def test_adaptive_rule():
    """Lazy: keep c for one more chunk while some interval >= c still fits the rest after it."""
    # base 10 cells, 200 tokens to go: c=4 can run a chunk, after which c=16 (11 + 12 + 16 = 39) still fits 40
    assert bi.next_interval(CS, 4, 10, 200, 40) == 4
    # base 20, 100 to go, budget 40: after a c=4 chunk nothing fits (49, 41, 43); after a c=8 one, c=8 does (40)
    assert bi.next_interval(CS, 4, 20, 100, 40) == 8
    assert bi.next_interval(CS, 4, 30, 200, 40) == 16  # nothing fits: the smallest projection (58)
    assert bi.next_interval(CS, 8, 10, 0, 100) == 8  # never back down
    assert bi.next_interval(CS, 4, 10, 3, 13) == 4  # the last partial chunk: no beacon after it
    assert bi.projected_peak(10, 200, 8) == 43
    ch = bi.choose(CS, "auto", 4, budget_bytes=10_000, bytes_per_cell=100, fixed_bytes=2_000)
    assert (ch.adaptive, ch.interval, ch.budget_cells) == (True, 4, 80)


def test_auto_budget_in_cells_comes_from_the_cache_layout(tiny):
    with _load(tiny["multi"], beacon_interval="auto", beacon_budget=60 * 512) as m:
        per_cell = 2 * 2 * 2 * 16 * 4  # layers x (K + V) x KV heads x head_dim x f32
        s = m.beacon_schedule()
        assert s.adaptive and s.intervals == CS and s.interval == 4 and s.budget_cells == 60 * 512 // per_cell


def _variable_segments(recorded, beacon, n_prompt):
    """Segments of the sequence the loop decoded (prompt, chunks of any length, beacons), from its own record."""
    toks = [t for _, t, _ in recorded]
    chunk, is_b, k = [], [], 1
    for i, t in enumerate(toks):
        b = i >= n_prompt and t == beacon
        chunk.append(0 if i < n_prompt else k)
        is_b.append(b)
        if b:
            k += 1
    return torch.tensor(toks), BeaconSegments(torch.tensor(chunk), torch.tensor(is_b))


def test_adaptive_switches_up_stays_under_budget_and_matches_the_reference(tiny):
    """Teacher-forced 300 tokens under a 60-cell budget: starts at c=4, switches to 8 then 16 as the beacons pile
    up, never holds more than 60 live cells (runtime count = logical count), and every decoded position's logits
    equal the PyTorch reference over that variable-chunk sequence."""
    from toolchain.runtime.beacons import BeaconGenerator

    prompt = [1, 7, 8, 9, 10, 11]
    rng = np.random.default_rng(4)
    gen = rng.integers(3, tiny["beacon"], size=300).tolist()
    with _load(tiny["multi"]) as m:
        g = BeaconGenerator(m, tiny["beacon"], 4, intervals=CS, budget_cells=60)
        out = list(g.generate(prompt, len(gen), forced=gen, record=True))
        st = g.stats
        assert out == gen and st.finish_reason == "length" and st.generated_tokens == len(gen)
        assert [c for _, c in st.switches] == [8, 16] and st.interval == 16
        assert st.switches[0][0] > 0 and st.switches[0][0] % 4 == 0  # at a chunk boundary, after some c=4 chunks
        assert st.peak_live_cells <= 60 and st.peak_full_cells == st.peak_live_cells
        ids, seg = _variable_segments(g.recorded, tiny["beacon"], len(prompt))
        lens = np.diff([len(prompt) - 1] + [i for i in range(len(ids)) if bool(seg.is_beacon[i])]) - 1
        assert set(lens.tolist()) == {4, 8, 16}  # chunks of every size, in order
        assert list(lens) == sorted(lens)
        ref = reference_logits(tiny["model"], ids, 0, 0, segments=seg).numpy()
        got = np.stack([lg for *_, lg in g.recorded])
        assert float(np.abs(got - ref[:len(got)]).max()) <= 1e-3
        # the same budget at a fixed c=4 cannot hold the generation: it runs out of cells
        f = BeaconGenerator(m, tiny["beacon"], 4, intervals=(4,), budget_cells=60)
        list(f.generate(prompt, len(gen), forced=gen))
        assert f.stats.generated_tokens < len(gen) and f.stats.peak_live_cells <= 60


def test_adaptive_stays_at_the_smallest_when_the_budget_is_ample(tiny):
    from toolchain.runtime.beacons import generate_with_beacons

    with _load(tiny["multi"], beacon_interval="auto", beacon_budget=10 ** 7) as m:
        generate_with_beacons(m, [1, 5, 6], max_tokens=100)
        assert m.beacon_stats.switches == [] and m.beacon_stats.interval == 4 and m.beacon_stats.beacons == 99 // 4
    with _load(tiny["multi"], beacon_interval="auto", beacon_budget=45 * 512) as m:  # 45 cells for 3 + 200 tokens
        generate_with_beacons(m, [1, 5, 6], max_tokens=200)
        st = m.beacon_stats
        assert st.switches and st.peak_live_cells <= 45 and st.generated_tokens == 200
        kv = m.kv_stats()["beacons"]
        assert kv["adaptive"] and kv["budget_cells"] == 45 and kv["switches"] == st.switches


def test_eval_reports_the_chosen_and_the_adaptive_interval(tiny, tmp_path):
    from toolchain import eval as ev
    from toolchain.tasks import Problem, register_task

    def problems(n, seed):  # prompts in the tiny vocabulary (its words), a verifier that never accepts
        return [Problem("bint", i, "the word " * (i + 1), "zz", {}, lambda a, e: 0.0, prompt="the word " * (i + 1),
                        extract=False) for i in range(n)]

    register_task("bint", problems)
    fixed = ev.run_eval([tiny["multi"]], "bint", n=2, max_tokens=40, n_ubatch=64, cache_type="f32", threads=2,
                        beacon_interval=8, progress=False, out=tmp_path / "e.json")
    row = fixed["rows"][0]
    assert row["beacon_interval"] == 8 and row["variant"] == "beacons"
    recs = [json.loads(x) for x in (tmp_path / "e.jsonl").read_text().splitlines()]
    assert all(r["beacons"]["interval"] == 8 for r in recs)
    auto = ev.run_eval([tiny["multi"]], "bint", n=2, max_tokens=200, n_ubatch=64, cache_type="f32", threads=2,
                       beacon_interval="auto", beacon_budget=40 * 512, progress=False, out=tmp_path / "e.json")
    row = auto["rows"][0]  # same --out: the fixed-c records are not reused for auto (the run key differs)
    assert row["beacon_interval"] == "auto" and row["budget_cells"] == 40 and row["peak_live_cells"] <= 40
    assert 0.0 <= row["switched_frac"] <= 1.0 and set(row["final_intervals"]) <= set(CS)
    recs = [json.loads(x) for x in (tmp_path / "e.jsonl").read_text().splitlines()]
    assert len(recs) == 4 and all(r["beacons"]["budget_cells"] == 40 for r in recs[2:])
