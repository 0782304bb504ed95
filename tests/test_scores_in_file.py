"""``kvtool.heads.scores``: convert stores a heads.json's scores (with the rule's per_layer and window) so the runtime
can rebuild the mask at load time; files without scores keep working. ``gguf.GGUFReader`` is the oracle."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from test_convert import fields, make_gguf

from converters import gguf_budgets as gb
from toolchain.errors import KvtoolError
from toolchain.gguf_keys import K_HEADS_WINDOW, K_KV_SPARSITY, K_KV_WINDOW, K_PER_LAYER, K_SCORES
from toolchain.heads import HeadsMask, mask_from_scores, random_mask
from toolchain.runtime.budget_overrides import apply_overrides, check_overrides

gguf = pytest.importorskip("gguf")
T = gguf.GGUFValueType


@pytest.fixture
def src(tmp_path):
    return make_gguf(tmp_path / "m.gguf")


def test_scores_written_layer_major_next_to_head_window(src, tmp_path):
    m = random_mask(3, 2, 0.5, seed=3, window=32, per_layer=True)
    out = gb.apply_mask(src, tmp_path / "o.gguf", m)
    f = fields(out)
    assert f[K_SCORES][0] == [T.ARRAY, T.FLOAT32]
    want = np.asarray(m.scores, dtype=np.float32).ravel()
    assert np.array_equal(np.asarray(f[K_SCORES][1], dtype=np.float32), want)
    assert f[K_PER_LAYER] == ([T.BOOL], True) and f[K_HEADS_WINDOW] == ([T.UINT32], 32)
    b = gb.read_budgets(out)
    assert b.per_layer is True and b.heads_window == 32
    assert np.array_equal(np.asarray(b.scores, dtype=np.float32), want.reshape(3, 2))
    # the mask rebuilt from what the file holds is the mask that was converted
    assert mask_from_scores(b.scores, 0.5, True) == m.full


def test_scores_clipped_and_f64_when_f32_would_tie(src, tmp_path):
    # 0.3 and 0.3 + 1e-12 differ as f64 but not as f32: a new tie could move a head across the cut
    scores = [[0.3 + 1e-12, 0.3], [2.0, -1.0], [0.5, 0.7]]
    m = HeadsMask.from_scores(scores, 0.5, "manual")
    out = gb.apply_mask(src, tmp_path / "o.gguf", m)
    f = fields(out)
    assert f[K_SCORES][0] == [T.ARRAY, T.FLOAT64]
    stored = gb.read_budgets(out).scores
    assert stored == [[0.3 + 1e-12, 0.3], [1.0, 0.0], [0.5, 0.7]]
    for s in np.linspace(0, 1, 21):
        assert mask_from_scores(stored, float(s)) == mask_from_scores(scores, float(s))


def test_file_without_scores_keeps_working(src, tmp_path):
    m = random_mask(3, 2, 0.5, seed=0)
    m.scores = None
    out = gb.apply_mask(src, tmp_path / "o.gguf", m)
    f = fields(out)
    assert K_SCORES not in f and K_PER_LAYER not in f and K_HEADS_WINDOW not in f
    b = gb.read_budgets(out)
    assert b.scores is None and b.head_window == [[0 if x else 64 for x in r] for r in m.full]
    with pytest.raises(KvtoolError, match=f"{K_KV_SPARSITY}: the file has no {K_SCORES}"):
        apply_overrides(b, check_overrides(sparsity=0.25))
    with pytest.raises(KvtoolError, match=f"{K_KV_WINDOW}: the file has no {K_SCORES}"):
        apply_overrides(b, check_overrides(window=8))
    # the sink override never needed scores (it predates them)
    assert apply_overrides(b, check_overrides(sink=3)).sink == 3


def test_bad_score_keys_named(src, tmp_path):
    ok = gb.budget_keys(random_mask(3, 2, 0.5, seed=0))
    V = gb.Value
    cases = {
        "string": ({K_SCORES: V(gb.T_STR, "x")}, f"{K_SCORES} has the wrong type"),
        "short": ({K_SCORES: V(gb.T_ARR, [0.5] * 5, gb.T_F32)}, f"{K_SCORES} has 5 entries, expected 3x2"),
        "nan": ({K_SCORES: V(gb.T_ARR, [0.5] * 5 + [float("nan")], gb.T_F32)}, "layer 2 head 1 is not finite"),
        "window0": ({K_HEADS_WINDOW: V(gb.T_U32, 0)}, f"{K_HEADS_WINDOW} must be in"),
        "per_layer_int": ({K_PER_LAYER: V(gb.T_U32, 1)}, f"{K_PER_LAYER} has the wrong type"),
    }
    for name, (bad, msg) in cases.items():
        p = gb.rewrite_gguf(src, tmp_path / f"{name}.gguf", {**ok, **bad}, drop=lambda k: k.startswith("kvtool."))
        with pytest.raises(KvtoolError, match=msg):
            gb.read_budgets(p)


@pytest.mark.parametrize("kw,msg", [
    ({"sparsity": 1.5}, "kvtool.kv.sparsity: must be a number in \\[0, 1\\]"),
    ({"sparsity": float("nan")}, "kvtool.kv.sparsity: must be a number"),
    ({"sparsity": True}, "kvtool.kv.sparsity: must be a number"),
    ({"window": 0}, "kvtool.kv.window: must be an integer in \\[1, 2.14748e\\+09\\]"),
    ({"window": 2.0}, "kvtool.kv.window: must be an integer"),
    ({"sink": -1}, "kvtool.kv.sink: must be an integer"),
])
def test_override_values_checked(kw, msg):
    with pytest.raises(KvtoolError, match=msg):
        check_overrides(**kw)


def test_overrides_rebuild_like_convert(src, tmp_path):
    m = random_mask(3, 2, 0.5, seed=7, sink=4, window=16)
    b = gb.read_budgets(gb.apply_mask(src, tmp_path / "o.gguf", m))
    for s in (0.0, 0.25, 0.5, 0.75, 1.0):
        got = apply_overrides(b, check_overrides(sparsity=s, window=8))
        assert got.head_window == [[0 if x else 8 for x in r] for r in m.with_sparsity(s).full]
    # a window alone keeps the file's heads
    got = apply_overrides(b, check_overrides(window=5))
    assert got.head_window == [[0 if x else 5 for x in r] for r in m.full]
    assert dataclasses.replace(got, head_window=b.head_window, heads_window=16) == b
