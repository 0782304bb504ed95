"""Memory operations on the mixed cache: several sequences, seq_cp / seq_keep / seq_rm, state save/load, context
shift. Every check compares against an independent run, so a wrong ring or a stale cell shows up as different logits."""
from __future__ import annotations

import numpy as np
import pytest
from helpers_runtime import LowLevel, write_windows

pytestmark = pytest.mark.usefixtures("patched_runtime")

TOL = 1e-4  # same build, F32 cache: only batch composition differs
WINDOWS = [[16, 0], [16, 16], [0, 32]]
SINK = 4


@pytest.fixture(scope="module")
def masked(tiny_gguf, tmp_path_factory):
    return write_windows(tiny_gguf, tmp_path_factory.mktemp("ops") / "masked.gguf", WINDOWS, SINK)


def _alone(path, toks, **kw):
    ll = LowLevel(path, **kw)
    try:
        return ll.run(toks, chunk=32)
    finally:
        ll.close()


@pytest.mark.parametrize("unified", [True, False])
def test_two_sequences_in_one_batch(masked, tokens, unified):
    a, b = tokens[:150], tokens[150:300]
    ll = LowLevel(masked, n_ctx=1024, n_ubatch=32, n_seq_max=2, unified=unified)
    outs = {0: [], 1: []}
    for i in range(0, 150, 25):  # interleave both sequences in every batch
        items = [(t, i + j, 0) for j, t in enumerate(a[i:i + 25])] + [(t, i + j, 1) for j, t in enumerate(b[i:i + 25])]
        logits = ll.decode(items)
        outs[0] += logits[:25]
        outs[1] += logits[25:]
    ll.close()
    assert np.abs(np.stack(outs[0]) - _alone(masked, a, n_ubatch=32)).max() <= TOL
    assert np.abs(np.stack(outs[1]) - _alone(masked, b, n_ubatch=32)).max() <= TOL


def test_seq_cp_and_keep(masked, tokens):
    import llama_cpp as lc

    prompt, c0, c1 = tokens[:120], tokens[120:180], tokens[180:240]
    ll = LowLevel(masked, n_ctx=1024, n_ubatch=32, n_seq_max=2, unified=True)
    ll.run(prompt, seq=0, chunk=32)
    lc.llama_memory_seq_cp(ll.mem, 0, 1, -1, -1)
    got0 = ll.run(c0, seq=0, pos0=120, chunk=16)
    got1 = ll.run(c1, seq=1, pos0=120, chunk=16)
    assert np.abs(got0 - _alone(masked, prompt + c0, n_ubatch=32)[120:]).max() <= TOL
    assert np.abs(got1 - _alone(masked, prompt + c1, n_ubatch=32)[120:]).max() <= TOL
    lc.llama_memory_seq_keep(ll.mem, 1)
    assert lc.llama_memory_seq_pos_max(ll.mem, 0) == -1
    more = ll.run(tokens[240:260], seq=1, pos0=180)
    assert np.abs(more - _alone(masked, prompt + c1 + tokens[240:260], n_ubatch=32)[180:]).max() <= TOL
    ll.close()


def test_seq_rm_tail_refused_when_ring_lost_it_and_honoured_otherwise(masked, tokens):
    import llama_cpp as lc

    ll = LowLevel(masked, n_ctx=2048, n_ubatch=16, n_seq_max=1)  # ring: pad256(32 + 4 + 16) = 256 cells
    ll.run(tokens[:300], chunk=16)
    # position 20 needs 4..19 for window-16 heads, long overwritten in a 256-cell ring: refuse, change nothing
    assert lc.llama_memory_seq_rm(ll.mem, 0, 20, -1) is False
    assert lc.llama_memory_seq_pos_max(ll.mem, 0) == 299
    # position 290 needs 258..289 (window 32) and the sinks: all still there
    assert lc.llama_memory_seq_rm(ll.mem, 0, 290, -1) is True
    assert lc.llama_memory_seq_pos_max(ll.mem, 0) == 289
    again = ll.run(tokens[290:300], pos0=290)
    assert np.abs(again - _alone(masked, tokens[:300], n_ubatch=16)[290:]).max() <= TOL
    ll.close()


def test_state_roundtrip_full_and_per_sequence(masked, tokens):
    ll = LowLevel(masked, n_ctx=1024, n_ubatch=32)
    ll.run(tokens[:150], chunk=32)
    blob = ll.state()
    want = ll.run(tokens[150:200], pos0=150, chunk=10)
    assert ll.set_state(blob) == len(blob)
    # Not bitwise: a restore packs the ring's cells (holes left by window eviction disappear), so the softmax sums
    # the same terms in another order. Stock caches have no holes and restore bit-identically.
    assert np.abs(ll.run(tokens[150:200], pos0=150, chunk=10) - want).max() <= 1e-5

    seq_blob_ll = LowLevel(masked, n_ctx=1024, n_ubatch=32, n_seq_max=2, unified=True)
    seq_blob_ll.run(tokens[:150], chunk=32)
    sb = seq_blob_ll.seq_state(0)
    assert seq_blob_ll.set_seq_state(sb, 1) > 0  # restore sequence 0's state as sequence 1
    got = seq_blob_ll.run(tokens[150:200], seq=1, pos0=150, chunk=10)
    assert np.abs(got - want).max() <= TOL
    seq_blob_ll.close()
    ll.close()


def test_state_from_other_budgets_is_refused(masked, tiny_gguf, tokens, tmp_path):
    other = write_windows(tiny_gguf, tmp_path / "other.gguf", [[8, 8]] * 3, SINK)
    a = LowLevel(masked, n_ctx=512, n_ubatch=32)
    a.run(tokens[:50])
    blob = a.state()
    b = LowLevel(other, n_ctx=512, n_ubatch=32)
    assert b.set_state(blob) == 0  # refused with a logged reason, no crash
    a.close()
    b.close()


def test_context_shift_is_correct_one_layer(tmp_path, tokens):
    """seq_rm + seq_add (llama.cpp's context shift) on a 1-layer model equals evaluating the kept tokens afresh."""
    pytest.importorskip("torch")
    import llama_cpp as lc
    from helpers_models import make_tiny_hf

    from converters.hf_to_gguf import hf_to_gguf

    hf = make_tiny_hf(tmp_path / "hf", n_layer=1, n_head=4, n_head_kv=2, head_dim=16, vocab=100, seed=9)
    path = write_windows(hf_to_gguf(hf, tmp_path / "f32.gguf", "f32"), tmp_path / "m.gguf", [[16, 0]], SINK)
    keep, discard = 8, 60
    ll = LowLevel(path, n_ctx=512, n_ubatch=32)
    ll.run(tokens[:200], chunk=32)
    assert lc.llama_memory_seq_rm(ll.mem, 0, keep, keep + discard)
    lc.llama_memory_seq_add(ll.mem, 0, keep + discard, -1, -discard)
    got = ll.run(tokens[200:210], pos0=200 - discard)
    kept = tokens[:keep] + tokens[keep + discard:210]
    want = _alone(path, kept, n_ubatch=32)[-10:]
    assert np.abs(got - want).max() <= 1e-3
    ll.close()
