"""Tests for `kvtool eval` (toolchain/eval/, toolchain/commands/eval.py).

Statistics are checked against published/closed-form values and scipy; the runtime parts run on the session's tiny
random llama (3 layers, 2 KV heads, F32) with a local task, so they take seconds. A random model solves nothing on
purpose-built tasks, so the toy scorer here rewards a property of the text (deterministic under greedy decoding).
"""
from __future__ import annotations

import json
import math
import random

import pytest

from toolchain import eval as ev
from toolchain.errors import KvtoolError
from toolchain.eval import ppl, report
from toolchain.eval import run as run_mod
from toolchain.runtime.decode import greedy
from toolchain.tasks import Problem, register_task


# --- statistics ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k,n,lo,hi", [
    (0, 10, 0.0, 0.2775),      # upper = z^2 / (n + z^2)
    (10, 10, 0.7225, 1.0),
    (5, 10, 0.2366, 0.7634),   # Newcombe (1998), Table I style value
    (0, 20, 0.0, 0.1611),
    (1, 1, 0.2065, 1.0),
])
def test_wilson_known_values(k, n, lo, hi):
    got = ev.wilson(k, n)
    assert got[0] == pytest.approx(lo, abs=5e-5)
    assert got[1] == pytest.approx(hi, abs=5e-5)


def test_wilson_matches_scipy_and_closed_form():
    stats = pytest.importorskip("scipy.stats")
    for k, n in [(3, 7), (81, 263), (199, 200), (100, 200), (1, 1000)]:
        ci = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        got = ev.wilson(k, n)
        assert got[0] == pytest.approx(ci.low, abs=1e-9)
        assert got[1] == pytest.approx(ci.high, abs=1e-9)
    # symmetric around 1/2 and monotone
    lo, hi = ev.wilson(50, 100)
    assert lo + hi == pytest.approx(1.0)
    assert ev.wilson(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        ev.wilson(5, 3)


# --- repetition ----------------------------------------------------------------------------------------------------
def test_repetition_detector():
    rng = random.Random(0)
    noise = [rng.randrange(1000, 2000) for _ in range(200)]
    assert not ev.is_repetitive(noise)
    assert ev.is_repetitive([7] * 64)                                   # period 1
    assert not ev.is_repetitive([7] * 63)                               # too short to judge
    for p in (2, 5, 16):
        unit = list(range(100, 100 + p))
        assert ev.is_repetitive(noise[:50] + (unit * 70)[:64]), p       # only the last 64 count
    assert not ev.is_repetitive((list(range(17)) * 10)[:64])            # period 17 > 16
    broken = (list(range(4)) * 16)
    broken[-10] = 99
    assert not ev.is_repetitive(broken)                                 # one break inside the tail
    assert ev.is_repetitive([99] + list(range(4)) * 16)                 # a break before the tail is fine
    assert ev.is_repetitive(list(range(3)) * 10, tail=30, max_period=3)


def test_pareto_front():
    pts = [(1.0, 0.5), (2.0, 0.9), (2.0, 0.4), (3.0, 0.9), (0.5, 0.1)]
    assert report._pareto(pts) == [4, 0, 1]


# --- fixtures ------------------------------------------------------------------------------------------------------
def _toy(n: int, seed: int) -> list[Problem]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = " ".join(rng.choice(["the", "a", "of", "to", "and", "in", "is", "it"]) for _ in range(6))
        # reward: the completion has an even number of characters (a random model gets a mix of 0 and 1)
        out.append(Problem("evaltoy", i, words, "", {"i": i}, lambda a, e: float(len(a) % 2 == 0), prompt=words,
                           extract=False))
    return out


register_task("evaltoy", _toy)


def _toy_metrics(problem, completion):
    return {"chars": float(len(completion))}


ev.register_metrics("evaltoy", _toy_metrics)


@pytest.fixture(scope="module")
def masked_tiny(tiny_gguf, tmp_path_factory, patched_runtime):
    from converters.gguf_budgets import apply_mask
    from toolchain.heads import random_mask

    d = tmp_path_factory.mktemp("evalm")
    return apply_mask(tiny_gguf, d / "tiny-s50.gguf", random_mask(3, 2, 0.5, seed=1, sink=2, window=8))


@pytest.fixture(scope="module")
def identity_tiny(tiny_gguf, tmp_path_factory, patched_runtime):
    """Budgets written, every head full (sparsity 0): the mixed load must equal the full one."""
    from converters.gguf_budgets import apply_mask
    from toolchain.heads import random_mask

    d = tmp_path_factory.mktemp("evali")
    return apply_mask(tiny_gguf, d / "tiny-s0.gguf", random_mask(3, 2, 0.0, seed=1, sink=2, window=8))


@pytest.fixture(scope="module")
def words_text(tmp_path_factory):
    from helpers_models import _WORDS

    rng = random.Random(3)
    p = tmp_path_factory.mktemp("ppl") / "words.txt"
    p.write_text(" ".join(rng.choice(_WORDS) for _ in range(1500)))
    return p


# --- bad input -----------------------------------------------------------------------------------------------------
def test_variants_and_bad_input(tiny_gguf, masked_tiny, tmp_path):
    with pytest.raises(KvtoolError, match="no kvtool head budgets.*kvtool convert"):
        ev.resolve_variants([tiny_gguf], ["mixed"])
    with pytest.raises(KvtoolError, match="unknown variant"):
        ev.resolve_variants([tiny_gguf], ["beacons?"])
    with pytest.raises(KvtoolError, match="no such file"):
        ev.resolve_variants([tmp_path / "nope.gguf"])
    with pytest.raises(KvtoolError, match="directory"):
        ev.resolve_variants([tmp_path])
    vs = ev.resolve_variants([tiny_gguf, masked_tiny])
    assert [(v.path.name, v.name, v.mixed) for v in vs] == [("tiny-f32.gguf", "full", None),
                                                            ("tiny-s50.gguf", "mixed", None)]
    vs = ev.resolve_variants([masked_tiny], ["full", "mixed", "full"])
    assert [(v.name, v.mixed) for v in vs] == [("full", False), ("mixed", True)]
    with pytest.raises(KvtoolError, match="directory .* does not exist"):
        ev.run_eval([tiny_gguf], "evaltoy", n=1, out=tmp_path / "no" / "such" / "r.json", progress=False)
    with pytest.raises(KvtoolError):
        ev.run_eval([tiny_gguf], "no_such_task_anywhere", n=1, progress=False)


def test_cli_errors(tiny_gguf, tmp_path):
    from click.testing import CliRunner

    from toolchain.commands.eval import eval_cmd

    r = CliRunner().invoke(eval_cmd, [])
    assert isinstance(r.exception, KvtoolError) and "MODEL" in str(r.exception)
    r = CliRunner().invoke(eval_cmd, [str(tiny_gguf)])
    assert isinstance(r.exception, KvtoolError) and "--task" in str(r.exception)
    r = CliRunner().invoke(eval_cmd, [str(tiny_gguf), "--ppl", "x.txt", "--task", "evaltoy"])
    assert isinstance(r.exception, KvtoolError) and "separate" in str(r.exception)
    r = CliRunner().invoke(eval_cmd, [str(tiny_gguf), "--task", "evaltoy", "--variants", "mixed", "-q"])
    assert isinstance(r.exception, KvtoolError) and "no kvtool head budgets" in str(r.exception)


# --- end to end ----------------------------------------------------------------------------------------------------
def test_eval_end_to_end_and_resume(tiny_gguf, masked_tiny, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from toolchain.commands.eval import eval_cmd

    out, png = tmp_path / "res.json", tmp_path / "pareto.png"
    args = [str(tiny_gguf), str(masked_tiny), "--task", "evaltoy", "--n", "4", "--max-tokens", "24", "--threads", "1",
            "--ubatch", "16", "--n-ctx", "600", "--out", str(out), "--plot", str(png), "-q"]
    r = CliRunner().invoke(eval_cmd, args)
    assert r.exit_code == 0, r.output + repr(r.exception)
    assert "| tiny-f32.gguf | full |" in r.output and "| tiny-s50.gguf | mixed |" in r.output
    res = json.loads(out.read_text())
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    log = tmp_path / "res.jsonl"
    recs = [json.loads(x) for x in log.read_text().splitlines()]
    assert len(recs) == 8
    full, mixed = res["rows"]
    for row, variant in ((full, "full"), (mixed, "mixed")):
        mine = [x for x in recs if x["variant"] == variant]
        assert row["n"] == 4 and row["correct"] == sum(x["reward"] for x in mine)
        assert row["accuracy"] == pytest.approx(row["correct"] / 4)
        assert row["ci95"] == pytest.approx(list(ev.wilson(row["correct"], 4)))
        assert all(1 <= x["gen_tokens"] <= 24 for x in mine)
        assert row["capped_frac"] == pytest.approx(sum(x["finish"] == "length" for x in mine) / 4)
        assert row["metrics"]["chars"] == pytest.approx(sum(len(x["completion"]) for x in mine) / 4)
        assert row["decode_tok_s"] > 0 and row["prefill_tok_s"] > 0
        # live cells: the whole sequence minus the last sampled token (never evaluated)
        for x in mine:
            assert x["live_full_cells"] == x["prompt_tokens"] + x["gen_tokens"] - (x["finish"] == "length")
    assert full["allocated_kv_bytes"] == full["stock_kv_bytes"] and not full["mixed_active"]
    assert mixed["mixed_active"] and mixed["allocated_kv_bytes"] < mixed["stock_kv_bytes"]
    assert mixed["compressed_heads"] == 3 and mixed["kv_heads"] == 6
    # short sequences fit in the rings (256 cells) without wrapping: as many live cells as the full cache
    assert mixed["peak_live_kv_bytes"] == full["peak_live_kv_bytes"]

    # rerun with more problems: only the new ones are generated, the old records are reused as they are
    calls = []
    real = run_mod.greedy

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(run_mod, "greedy", counting)
    with open(log, "a") as f:
        f.write('{"key": "cut by an interrupt", "ind')  # a torn last line is ignored
    r = CliRunner().invoke(eval_cmd, [a if a != "4" else "6" for a in args])
    assert r.exit_code == 0, r.output + repr(r.exception)
    assert len(calls) == 4  # 2 new problems x 2 variants
    res6 = json.loads(out.read_text())
    assert [row["n"] for row in res6["rows"]] == [6, 6]
    again = [json.loads(x) for x in log.read_text().splitlines() if x.startswith('{"key": "') and x.endswith("}")]
    assert again[:8] == recs
    # same settings again: nothing to do, no model load
    calls.clear()
    res_b = ev.run_eval([tiny_gguf, masked_tiny], "evaltoy", n=6, max_tokens=24, threads=1, n_ubatch=16, n_ctx=600,
                        out=out, progress=False)
    assert calls == [] and [r_["correct"] for r_ in res_b["rows"]] == [r_["correct"] for r_ in res6["rows"]]
    # a different generation cap is a different run
    ev.run_eval([tiny_gguf], "evaltoy", n=2, max_tokens=8, threads=1, n_ubatch=16, n_ctx=600, out=out, progress=False)
    assert len(calls) == 2


def test_greedy_matches_runtime_generate(tiny_gguf, patched_runtime):
    """Our loop and Model.generate(temperature=0) produce the same text."""
    from toolchain.runtime.model import Model

    with Model.load(tiny_gguf, n_ctx=256, n_threads=1) as m:
        toks = m.tokenize("the a of to and")
        g = greedy(m, toks, 20)
        ref = m.generate("the a of to and", max_tokens=20, temperature=0.0)
        assert g["text"] == ref
        assert len(g["ids"]) == m.last_stats.generated_tokens


# --- perplexity ----------------------------------------------------------------------------------------------------
def test_ppl_kl(masked_tiny, identity_tiny, words_text, tmp_path):
    same = ev.run_ppl(identity_tiny, words_text, n_ctx=64, threads=1, progress=False)
    assert same["windows"] >= 10 and same["tokens_scored"] == same["windows"] * 31
    assert same["kl_full_mixed_mean"] == 0.0 and same["top1_agreement"] == 1.0
    assert same["ppl_mixed"] == same["ppl_full"]
    assert 1.0 < same["ppl_full"] < 1000
    diff = ev.run_ppl(masked_tiny, words_text, n_ctx=64, threads=1, progress=False)
    assert diff["kl_full_mixed_mean"] > 1e-4 and diff["kl_full_mixed_max"] >= diff["kl_full_mixed_mean"]
    assert diff["ppl_full"] == pytest.approx(same["ppl_full"], rel=1e-5)  # same weights, same full cache
    assert diff["ppl_mixed"] != diff["ppl_full"]
    # KL by hand from two independent passes, one window
    lf = ppl._log_softmax(__import__("numpy").array([[0.0, 1.0, 2.0]]))
    assert float((math.e ** lf).sum()) == pytest.approx(1.0)


def test_ppl_cli_and_text_guard(tiny_gguf, masked_tiny, words_text, tmp_path):
    from click.testing import CliRunner

    from toolchain.commands.eval import eval_cmd

    out = tmp_path / "ppl.json"
    r = CliRunner().invoke(eval_cmd, [str(masked_tiny), "--ppl", str(words_text), "--n-ctx", "64", "--threads", "1",
                                      "-q", "--out", str(out), "--ppl-tokens", "640"])
    assert r.exit_code == 0, r.output + repr(r.exception)
    assert "| tiny-s50.gguf | words.txt | 310 | 64 |" in r.output
    assert json.loads(out.read_text())["results"][0]["windows"] == 10
    # a file without budgets: perplexity only
    res = ev.run_ppl(tiny_gguf, words_text, n_ctx=64, threads=1, progress=False)
    assert "ppl_mixed" not in res and res["ppl_full"] > 1
    with pytest.raises(KvtoolError, match="no kvtool head budgets"):
        ev.run_ppl(tiny_gguf, words_text, n_ctx=64, mixed=True, progress=False)
    # characters the tiny SentencePiece vocabulary lacks (no byte fallback) would abort llama.cpp: refused first
    bad = tmp_path / "bad.txt"
    bad.write_text("The quick brown fox; ÄÖÜ.\n" * 50)
    with pytest.raises(KvtoolError, match="cannot encode"):
        ev.run_ppl(masked_tiny, bad, n_ctx=64, threads=1, progress=False)
    with pytest.raises(KvtoolError, match="fewer than one window"):
        ev.run_ppl(masked_tiny, words_text, n_ctx=64, max_tokens=10, threads=1, progress=False)


def test_default_ppl_text_is_long_prose():
    pytest.importorskip("reasoning_gym")
    p = ev.default_ppl_text()
    text = p.read_text()
    assert p.name == "in_the_year_2889.txt" and len(text) > 50_000 and "Verne" in text


def test_machine_info():
    info = ev.machine_info()
    assert info["nproc"] >= 1 and info["cpu"] and "date" in info


def test_smollm2_chain_sum_full_vs_mixed(smollm2_masked, tmp_path):
    """A real model and a reasoning-gym task: n=4, full vs mixed of one file, JSON + PNG + records (~6 s)."""
    pytest.importorskip("reasoning_gym")
    out, png = tmp_path / "smol.json", tmp_path / "smol.png"
    # n_ctx 2048: with a context near the sequence length the rings (pad256(W + S + ubatch) cells) are as large as
    # the full cache and nothing is saved
    res = ev.run_eval([smollm2_masked], "chain_sum", n=4, seed=0, variants=["full", "mixed"], max_tokens=96,
                      n_ctx=2048, threads=2, out=out, plot=png, progress=False)
    full, mixed = res["rows"]
    assert (full["variant"], mixed["variant"]) == ("full", "mixed") and full["n"] == mixed["n"] == 4
    assert mixed["allocated_kv_bytes"] < full["allocated_kv_bytes"] == full["stock_kv_bytes"]
    assert json.loads(out.read_text())["rows"][1]["compressed_heads"] == 45
    assert png.read_bytes()[:4] == b"\x89PNG" and len((tmp_path / "smol.jsonl").read_text().splitlines()) == 8


# --- beacon variants -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def beacon_tiny(tiny_gguf, tmp_path_factory, patched_runtime):
    """Per-head budgets (3 of 6 heads on a window of 8) and beacon keys (token 50 every 8 tokens) in one file."""
    from helpers_runtime import write_windows

    from converters.gguf_budgets import T_U32, Value
    from toolchain.gguf_keys import K_BEACON_INTERVAL, K_BEACON_TOKEN

    d = tmp_path_factory.mktemp("evalb")
    return write_windows(tiny_gguf, d / "tiny-beacons.gguf", [[0, 8], [8, 0], [8, 0]], 2,
                         extra={K_BEACON_TOKEN: Value(T_U32, 50), K_BEACON_INTERVAL: Value(T_U32, 8)})


def test_beacon_variants_resolve(tiny_gguf, beacon_tiny):
    with pytest.raises(KvtoolError, match="no kvtool.beacon keys.*kvtool train beacons"):
        ev.resolve_variants([tiny_gguf], ["beacons"])
    with pytest.raises(KvtoolError, match="no kvtool head budgets"):
        ev.resolve_variants([tiny_gguf], ["mixed+beacons"])
    [auto] = ev.resolve_variants([beacon_tiny])
    assert (auto.name, auto.mixed, auto.beacons) == ("mixed+beacons", None, True)
    vs = ev.resolve_variants([beacon_tiny], ["full", "mixed", "beacons", "mixed+beacons"])
    assert [(v.name, v.mixed, v.beacons) for v in vs] == [("full", False, False), ("mixed", True, False),
                                                          ("beacons", False, True), ("mixed+beacons", True, True)]


def test_eval_beacon_variants(beacon_tiny, tmp_path):
    """The beacon rows generate through the beacon loop: their peak live cells are bounded by prompt + n/c + c,
    while the full row holds the whole sequence; greedy text matches Model.generate with beacons on."""
    from toolchain.runtime.model import Model

    res = ev.run_eval([beacon_tiny], "evaltoy", n=3, max_tokens=40, threads=1, n_ubatch=16, n_ctx=600,
                      variants=["full", "mixed", "beacons", "mixed+beacons"], out=tmp_path / "b.json", progress=False)
    full, mixed, bea, both = res["rows"]
    recs = [json.loads(x) for x in (tmp_path / "b.jsonl").read_text().splitlines()]
    assert bea["method"] == "beacons" and bea["beacon_interval"] == 8 and both["method"].startswith("beacons+")
    for x in recs:
        if x["variant"] in ("full", "mixed"):
            assert "beacons" not in x
            continue
        b = x["beacons"]
        n = x["gen_tokens"]
        assert b["interval"] == 8 and b["beacons"] == (n - 1) // 8  # a beacon only when more tokens follow
        assert b["evicted"] == 8 * b["beacons"]
        assert b["peak_live_cells"] <= x["prompt_tokens"] + n // 8 + 8 + 1
        if n == 40:
            assert b["peak_live_cells"] < x["prompt_tokens"] + n
    assert bea["peak_live_kv_bytes"] < full["peak_live_kv_bytes"]
    assert bea["peak_retained_kv_bytes"] == bea["peak_live_kv_bytes"]
    # a mixed row retains less than its rings hold (sink + window, not the ring's used cells); with beacons the rings
    # lose the evicted chunks too
    assert mixed["peak_retained_kv_bytes"] < mixed["peak_live_kv_bytes"] == full["peak_live_kv_bytes"]
    assert both["peak_retained_kv_bytes"] <= both["peak_live_kv_bytes"] < mixed["peak_live_kv_bytes"]
    with Model.load(beacon_tiny, n_ctx=600, n_threads=1, n_ubatch=16, mixed=False) as m:
        from toolchain.tasks import make_dataset

        p = make_dataset("evaltoy", 3, 0)[0]
        want = m.generate(p.prompt, max_tokens=40, temperature=0.0)
    got = [x for x in recs if x["variant"] == "beacons" and x["index"] == 0][0]["completion"]
    assert got == want
