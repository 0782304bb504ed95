"""The Python API (toolchain.runtime.model.Model): load rules, generate/chat, stats, and guarded prefix reuse.

Real-model cases run SmolLM2 with a mask written straight into the GGUF (windows 64 on KV heads 1 and 2 of every
layer, sink 16); max_tokens stays small. The prefix-reuse oracle uses the tiny random llama: whatever the cache
did before, a greedy reply must equal the one a freshly loaded model gives.
"""
from __future__ import annotations

import subprocess
import sys

import pytest
from helpers_runtime import write_windows

from toolchain.errors import KvtoolError

pytestmark = pytest.mark.usefixtures("patched_runtime")

SMOL_WINDOWS = [[0, 64, 64] for _ in range(30)]
# One thread everywhere except the defaults test: the suite must not depend on having the cores to itself (with
# other jobs on a 2-core box, two llama.cpp threads wait on each other and decode collapses several-fold).
T1 = {"n_threads": 1}
SMOL_SINK = 16
N_CTX = 1024


@pytest.fixture(scope="module")
def masked(smollm2, tmp_path_factory):
    return write_windows(smollm2, tmp_path_factory.mktemp("api") / "smol-w64.gguf", SMOL_WINDOWS, SMOL_SINK)


@pytest.fixture(scope="module")
def model(masked):
    from toolchain import Model

    m = Model.load(masked, n_ctx=N_CTX, **T1)
    yield m
    m.close()


# ---------------------------------------------------------------------------------------------- load rules
def test_import_toolchain_stays_light():
    code = "import sys, toolchain; assert 'llama_cpp' not in sys.modules; from toolchain import Model; print(Model.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "Model"


def test_load_errors_are_one_line(tmp_path, smollm2):
    from toolchain import Model

    with pytest.raises(KvtoolError, match="no such file"):
        Model.load(tmp_path / "missing.gguf")
    with pytest.raises(KvtoolError, match="directory"):
        Model.load(tmp_path)
    text = tmp_path / "notes.gguf"
    text.write_text("hello, not a gguf\n" * 10)
    with pytest.raises(KvtoolError) as e:
        Model.load(text)
    assert "\n" not in str(e.value)
    cut = tmp_path / "cut.gguf"
    with open(smollm2, "rb") as f:
        cut.write_bytes(f.read(3_000_000))
    with pytest.raises(KvtoolError, match="truncated"):
        Model.load(cut)
    with pytest.raises(KvtoolError, match="no kvtool budgets"):
        Model.load(smollm2, mixed=True)
    with pytest.raises(KvtoolError, match="cache type"):
        Model.load(smollm2, cache_type="q3_k")
    with pytest.raises(KvtoolError, match="n_ctx"):
        Model.load(smollm2, n_ctx=0)


def test_defaults_threads_and_flash_attention(masked, smollm2):
    from toolchain import Model
    from toolchain.runtime.threads import physical_cores

    with Model.load(smollm2, n_ctx=256) as plain:
        assert plain.n_threads == physical_cores()
        assert plain.flash_attn is False  # no budgets: llama-cpp-python's default
        kv = plain.kv_stats()
        assert not kv["mixed"] and kv["allocated_bytes"] == kv["stock_bytes"]
    with Model.load(masked, n_ctx=256, n_threads=1) as m:
        assert m.n_threads == 1
        assert m.flash_attn is True  # budgets: FA on, or V rows are padded and the V savings vanish
    with Model.load(masked, n_ctx=256, mixed=False) as full:
        kv = full.kv_stats()
        assert full.flash_attn is True  # same setting either way, so --no-mixed is a fair comparison
        assert not kv["mixed"] and kv["ring_bytes"] == 0 and kv["allocated_bytes"] == kv["stock_bytes"]


# ---------------------------------------------------------------------------------------------- generation
def test_generate_whole_and_streamed(model):
    text = model.generate("The capital of France is", max_tokens=8)
    assert isinstance(text, str) and text.strip()
    st = model.last_stats
    assert st.prompt_tokens == len(model.tokenize("The capital of France is"))
    assert 1 <= st.generated_tokens <= 8
    assert st.finish_reason in ("length", "stop")
    assert st.prefill_tok_s and st.prefill_tok_s > 0
    assert st.decode_tok_s and st.decode_tok_s > 0
    it = model.generate("Once upon a time", max_tokens=6, stream=True)
    assert not isinstance(it, str)
    pieces = list(it)
    assert pieces and all(isinstance(p, str) for p in pieces)
    assert model.last_stats.generated_tokens <= 6


def test_stream_equals_whole_on_a_fresh_cache(model):
    model.reset()
    whole = model.generate("List three colors:", max_tokens=8)
    model.reset()
    streamed = "".join(model.generate("List three colors:", max_tokens=8, stream=True))
    assert streamed == whole


def test_chat_uses_the_gguf_template(model):
    msgs = [{"role": "user", "content": "What is 2+2? Answer with one number."}]
    prompt = model.chat_prompt(msgs)
    assert "<|im_start|>user" in prompt and prompt.rstrip().endswith("<|im_start|>assistant")
    reply = model.chat(msgs, max_tokens=12)
    assert reply.strip()
    assert "<|im_end|>" not in reply and "<|im_start|>" not in reply
    first = model.last_stats.prompt_tokens
    # the next turn reuses the cached conversation and evaluates only what is new
    msgs += [{"role": "assistant", "content": reply}, {"role": "user", "content": "And 3+3?"}]
    pieces = list(model.chat(msgs, max_tokens=8, stream=True))
    st = model.last_stats
    assert "".join(pieces).strip()
    assert st.cached_tokens >= first - 1 and st.prompt_eval_tokens < st.prompt_tokens


def test_chat_accepts_openai_text_parts_and_rejects_garbage(model):
    msgs = [{"role": "user", "content": [{"type": "text", "text": "Say hi"}]}]
    assert "Say hi" in model.chat_prompt(msgs)
    with pytest.raises(KvtoolError, match="only text"):
        model.chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])
    with pytest.raises(KvtoolError, match="non-empty list"):
        model.chat([])
    with pytest.raises(KvtoolError, match="message 0"):
        model.chat([{"content": "no role"}])


def test_prompt_longer_than_context_names_the_numbers(masked):
    from toolchain import Model

    with Model.load(masked, n_ctx=256, **T1) as m:
        n = len(m.tokenize("word " * 400))
        with pytest.raises(KvtoolError) as e:
            m.generate("word " * 400, max_tokens=4)
        msg = str(e.value)
        assert f"{n} tokens" in msg and "256" in msg and "\n" not in msg
        with pytest.raises(KvtoolError, match="context holds 256"):
            m.chat([{"role": "user", "content": "word " * 400}])


def test_kv_stats_measured_vs_full_cache(model):
    from toolchain.runtime.memory import dims_from_gguf, predict

    model.reset()
    model.generate("Hello there", max_tokens=4)
    kv = model.kv_stats()
    assert kv["mixed"] is True
    assert kv["allocated_bytes"] == kv["full_bytes"] + kv["ring_bytes"]
    plan = predict(dims_from_gguf(model.path), SMOL_WINDOWS, SMOL_SINK, N_CTX, n_ubatch=512, flash_attn=True)
    assert kv["allocated_bytes"] == plan.mixed_bytes == kv["predicted_bytes"]
    assert kv["stock_bytes"] == plan.stock_bytes > kv["allocated_bytes"]
    assert kv["groups"] == [{"window": 0, "cells": N_CTX}, {"window": 64, "cells": plan.ring_cells[64]}]
    n = kv["context_tokens"]
    assert n == model.last_stats.prompt_tokens + model.last_stats.generated_tokens - 1  # last token not decoded
    assert kv["live_full_cells"] == n and kv["live_ring_cells"] == n  # short: the ring still holds everything
    assert kv["n_ctx"] == N_CTX and kv["flash_attn"] is True


def test_stop_ends_a_stream_early(model):
    model.reset()
    got = []
    for piece in model.generate("Count: 1, 2, 3,", max_tokens=16, stream=True):
        got.append(piece)
        if len(got) == 2:
            model.stop()
    assert len(got) <= 3
    assert model.last_stats.finish_reason == "cancelled"
    assert model.generate("Count: 1, 2, 3,", max_tokens=2)  # the flag does not leak into the next call


def test_abandoned_stream_cannot_resume_after_a_newer_call(model):
    it = model.generate("Once upon a time", max_tokens=8, stream=True)
    next(it)
    model.generate("Hello", max_tokens=2)
    with pytest.raises(KvtoolError, match="superseded"):
        list(it)


def test_unknown_chat_template(tiny_gguf):
    from toolchain import Model

    with Model.load(tiny_gguf, n_ctx=256, **T1) as m:
        assert not m.has_chat_template
        with pytest.raises(KvtoolError, match="unknown chat template"):
            m.chat([{"role": "user", "content": "hi"}])
        assert isinstance(m.generate("the", max_tokens=2), str)  # raw completion still works


# ---------------------------------------------------------------------------------------------- prefix reuse
WORDS = ("the a of to and in is it you that he was for on are with as his they be at one have this from or had by "
         "word but what some we can out other were all there when up use your how said an each she").split()


def _text(n: int, seed: int) -> str:
    import random

    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n))


@pytest.fixture(scope="module")
def tiny_windowed(tiny_gguf, tmp_path_factory):
    # window 16 + sink 4 with n_ubatch 32: every ring has 256 cells, so a 400-token prompt wraps them
    return write_windows(tiny_gguf, tmp_path_factory.mktemp("tinyw") / "tiny-w16.gguf", [[0, 16], [16, 0], [16, 16]], 4)


def test_prefix_reuse_is_exact_and_falls_back_when_the_ring_moved_on(tiny_windowed):
    from toolchain import Model

    def fresh(prompt: str) -> str:
        with Model.load(tiny_windowed, n_ctx=1024, n_ubatch=32, **T1) as f:
            return f.generate(prompt, max_tokens=8)

    long_a = _text(220, 1)
    extended = long_a + " " + _text(10, 2)
    head = " ".join(long_a.split()[:40])
    diverged = head + " " + _text(15, 3)
    with Model.load(tiny_windowed, n_ctx=1024, n_ubatch=32, **T1) as m:
        assert m.kv_stats()["groups"][1] == {"window": 16, "cells": 256}
        n_a = len(m.tokenize(long_a))
        assert n_a > 300
        m.generate(long_a, max_tokens=4)
        # appending: the whole cached prefix is reused
        out = m.generate(extended, max_tokens=8)
        st = m.last_stats
        assert st.cached_tokens >= n_a - 1 and not st.cache_fallback
        assert out == fresh(extended)
        # a cut far behind the rings' window: the runtime refuses it, and the wrapper re-evaluates from scratch
        n_head = len(m.tokenize(head))
        assert m.llama._ctx.kv_cache_seq_rm(-1, n_head, -1) is False
        out = m.generate(diverged, max_tokens=8)
        st = m.last_stats
        assert st.cache_fallback and st.cached_tokens == 0 and st.prompt_eval_tokens == st.prompt_tokens
        assert out == fresh(diverged)


# ---------------------------------------------------------------------------------------------- beacons
def test_files_with_beacon_keys_generate_through_the_beacon_loop(tiny_gguf, tmp_path):
    from converters.gguf_budgets import T_U32, Value
    from toolchain import Model
    from toolchain.gguf_keys import K_BEACON_INTERVAL, K_BEACON_TOKEN

    path = write_windows(tiny_gguf, tmp_path / "tiny-beacons.gguf", [[0, 16], [16, 0], [16, 16]], 4,
                         extra={K_BEACON_TOKEN: Value(T_U32, 50), K_BEACON_INTERVAL: Value(T_U32, 8)})
    with Model.load(path, n_ctx=256, **T1) as m:
        assert m.beacons is True
        text = m.generate("the word", max_tokens=40)
        assert isinstance(text, str)
        st, bs = m.last_stats, m.beacon_stats
        # a beacon follows every full chunk of 8 that more tokens come after; its chunk leaves the cache
        assert st.generated_tokens == 40 and bs.beacons == 4 and bs.evicted == 32
        assert "".join(m.generate("the word", max_tokens=40, stream=True)) == text
        m.beacons = False  # the stock path on the cache the beacon loop left behind (it has holes)
        after = m.generate("the word", max_tokens=8)
    with Model.load(path, n_ctx=256, beacons=False, **T1) as plain:
        assert plain.beacons is False
        assert plain.generate("the word", max_tokens=8) == after
        assert not hasattr(plain, "beacon_stats")
    with pytest.raises(KvtoolError, match="no kvtool.beacon keys"):
        Model.load(tiny_gguf, n_ctx=256, beacons=True)
