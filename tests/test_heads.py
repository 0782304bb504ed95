"""heads.json, the mask rule, the importers and ``kvtool heads``.

The rule is recomputed here independently (a structured-array sort and decimal arithmetic) rather than by calling
the code under test, so a change to the rule cannot pass silently.
"""
from __future__ import annotations

import json
import sys
from decimal import ROUND_FLOOR, Decimal
from pathlib import Path

import numpy as np
import pytest

from toolchain.errors import KvtoolError
from toolchain.heads import (
    FORMAT,
    HeadsMask,
    format_map,
    import_scores,
    mask_from_scores,
    n_compressed,
    random_mask,
    read_score_tsv,
)

DATA = Path(__file__).parent / "data"
RLKV = DATA / "rlkv_Llama-3.1-8B-R1.adapter_weights.tsv"
DUO = DATA / "duo_Llama-3.1-8B-R1.full_attention_heads.tsv"


# --- the independent oracle -------------------------------------------------------------------------------------
def k_of(s: float, n: int) -> int:
    return int((Decimal(str(s)) * n + Decimal("0.5")).to_integral_value(rounding=ROUND_FLOOR))


def oracle_mask(scores: np.ndarray, s: float, per_layer: bool = False) -> np.ndarray:
    """full[l,h] by sorting (clipped score, layer, head) records."""
    a = np.clip(np.asarray(scores, float), 0, 1)
    L, H = a.shape
    full = np.ones((L, H), bool)
    groups = [[(li, h) for h in range(H)] for li in range(L)] if per_layer else \
        [[(li, h) for li in range(L) for h in range(H)]]
    for g in groups:
        rec = np.array([(a[li, h], li, h) for li, h in g], dtype=[("score", "f8"), ("layer", "i4"), ("head", "i4")])
        rec.sort(order=["score", "layer", "head"])
        for r in rec[:k_of(s, len(g))]:
            full[r["layer"], r["head"]] = False
    return full


def load_tsv(p: Path) -> np.ndarray:
    return np.loadtxt(p, delimiter="\t", ndmin=2)


# --- the rule ---------------------------------------------------------------------------------------------------
def test_rule_small_example_with_ties_and_clipping():
    scores = [[0.5, -0.1, 0.9], [0.0, 1.2, 0.5]]  # -0.1 and 0.0 tie at 0 after clipping; 0.5 ties too
    assert mask_from_scores(scores, 0.0) == [[True] * 3, [True] * 3]
    # k = floor(6/3 + .5) = 2: the two zeros, (0,1) then (1,0)
    assert mask_from_scores(scores, 1 / 3) == [[True, False, True], [False, True, True]]
    # k = 3: next is the 0.5 tie, broken by layer: (0,0) before (1,2)
    assert mask_from_scores(scores, 0.5) == [[False, False, True], [False, True, True]]
    assert mask_from_scores(scores, 1.0) == [[False] * 3, [False] * 3]


def test_rule_per_layer():
    scores = [[0.3, 0.1, 0.2, 0.9], [0.8, 0.7, 0.6, 0.5]]
    # k_l = floor(4*0.5+.5) = 2 per layer
    assert mask_from_scores(scores, 0.5, per_layer=True) == [[True, False, False, True], [True, True, False, False]]
    # globally the 4 lowest are 0.1, 0.2, 0.3 in layer 0 and 0.5 in layer 1
    assert mask_from_scores(scores, 0.5) == [[False, False, False, True], [True, True, True, False]]


@pytest.mark.parametrize("s,n,k", [(0.35, 10, 4), (0.25, 10, 3), (0.4, 256, 102), (0.5, 90, 45), (0.0, 7, 0),
                                   (1.0, 7, 7), (0.05, 10, 1), (0.15, 10, 2)])
def test_k_is_decimal_rounding(s, n, k):
    # 0.35*10 is 3.4999999999999996 in binary floating point; the rule reads the decimal the user wrote
    assert n_compressed(s, n) == k == k_of(s, n)


@pytest.mark.parametrize("s", [0.0, 0.1, 0.25, 0.4, 0.5, 0.75, 0.9, 1.0])
@pytest.mark.parametrize("per_layer", [False, True])
@pytest.mark.parametrize("kind,path", [("rlkv", RLKV), ("duo", DUO)])
def test_importers_on_anchor_files_match_oracle(kind, path, s, per_layer):
    m = import_scores(kind, path, s, per_layer)
    expected = oracle_mask(load_tsv(path), s, per_layer)
    assert (m.n_layer, m.n_head_kv) == (32, 8)
    assert np.array_equal(np.array(m.full), expected)
    assert m.method == kind and m.sparsity == s and m.per_layer == per_layer
    if not per_layer:
        assert m.n_compressed() == k_of(s, 256)


def test_rlkv_anchor_has_out_of_range_values_and_they_are_kept_raw():
    raw = load_tsv(RLKV)
    assert raw.min() < 0  # the reason the rule clips
    m = import_scores("rlkv", RLKV, 0.4)
    assert np.array_equal(np.array(m.scores), raw)


def test_random_mask_is_seeded_and_exact():
    a, b, c = random_mask(30, 3, 0.5, 7), random_mask(30, 3, 0.5, 7), random_mask(30, 3, 0.5, 8)
    assert a.full == b.full and a.full != c.full
    assert a.n_compressed() == 45 and a.method == "random"
    p = random_mask(30, 3, 1 / 3, 1, per_layer=True)
    assert all(nc == 1 for _, nc in p.layer_counts())


# --- file format ------------------------------------------------------------------------------------------------
def test_save_load_round_trip_is_atomic(tmp_path):
    m = import_scores("duo", DUO, 0.5, sink=4, window=128)
    out = m.save(tmp_path / "h.json")
    assert sorted(x.name for x in tmp_path.iterdir()) == ["h.json"]  # no temp files left
    d = json.loads(out.read_text())
    assert d["format"] == FORMAT and d["sink"] == 4 and d["window"] == 128 and len(d["full"]) == 32
    assert HeadsMask.load(out) == m
    assert m.head_window()[:8] == [0 if f else 128 for f in m.full[0]]


def test_with_sparsity_rederives_from_scores():
    m = import_scores("rlkv", RLKV, 0.4)
    m2 = m.with_sparsity(0.75, per_layer=True)
    assert np.array_equal(np.array(m2.full), oracle_mask(load_tsv(RLKV), 0.75, True))
    manual = HeadsMask("manual", 1, 2, [[True, False]])
    with pytest.raises(KvtoolError, match="no scores"):
        manual.with_sparsity(0.5)


def test_format_map():
    m = HeadsMask("manual", 2, 3, [[True, False, True], [False, False, False]], sparsity=0.67)
    text = format_map(m)
    assert "layer 0  full 2  compressed 1  FcF" in text
    assert "layer 1  full 0  compressed 3  ccc" in text
    assert "compressed 4 of 6 heads" in text


def _good() -> dict:
    return {"format": FORMAT, "method": "manual", "n_layer": 2, "n_head_kv": 2, "full": [[True, False], [True, True]],
            "scores": [[0.9, 0.1], [0.5, 0.6]], "sink": 16, "window": 64, "sparsity": 0.25}


@pytest.mark.parametrize("patch,msg", [
    ({"format": "kvtool.heads/2"}, "format must be"),
    ({"method": "magic"}, "method must be"),
    ({"full": [[True, False], [True]]}, "full must be 2x2"),
    ({"full": [[True, False]]}, "full must be 2x2"),
    ({"full": [[True, 0], [True, True]]}, "true/false"),
    ({"scores": [[0.9, 0.1, 0.3], [0.5, 0.6, 0.1]]}, "shape of full"),
    ({"scores": [[0.9, "x"], [0.5, 0.6]]}, "only numbers"),
    ({"sparsity": 1.5}, "sparsity must be"),
    ({"sparsity": -0.1}, "sparsity must be"),
    ({"sink": -1}, "sink must be"),
    ({"window": 0}, "window must be"),
    ({"window": 1.5}, "window must be"),
    ({"n_layer": 0}, "n_layer must be"),
    ({"model": {"arch": 3}}, "model must be"),
    ({"spasity": 0.3}, "unknown key"),
])
def test_heads_json_validation(tmp_path, patch, msg):
    d = _good()
    d.update(patch)
    p = tmp_path / "h.json"
    p.write_text(json.dumps(d))
    with pytest.raises(KvtoolError, match=msg) as e:
        HeadsMask.load(p)
    assert "\n" not in str(e.value) and e.value.code == 2


@pytest.mark.parametrize("text,msg", [("", "empty"), ("{", "not valid JSON"), ("[1]", "JSON object"),
                                      ('{"format": NaN}', "NaN is not allowed")])
def test_heads_json_malformed(tmp_path, text, msg):
    p = tmp_path / "h.json"
    p.write_text(text)
    with pytest.raises(KvtoolError, match=msg):
        HeadsMask.load(p)


def test_heads_json_nan_score(tmp_path):
    d = _good()
    p = tmp_path / "h.json"
    p.write_text(json.dumps(d).replace("0.6", "NaN"))
    with pytest.raises(KvtoolError, match="NaN"):
        HeadsMask.load(p)


@pytest.mark.parametrize("text,msg", [
    ("", "empty"), ("\n\n", "empty"),
    ("0.1\t0.2\n0.3\n", "ragged rows: line 2 has 1 columns"),
    ("0.1\t0.2\n0.3\tabc\n", "line 2, column 2: 'abc' is not a number"),
    ("0.1\tnan\n", "not a finite number"),
    ("0.1\tinf\n", "not a finite number"),
    ("0.1\t0.2\n\n0.3\t0.4\n", "line 2 is empty"),
])
def test_tsv_bad_input(tmp_path, text, msg):
    p = tmp_path / "w.tsv"
    p.write_text(text)
    with pytest.raises(KvtoolError, match=msg) as e:
        read_score_tsv(p)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("kw,msg", [({"sparsity": 1.01}, "sparsity"), ({"sparsity": float("nan")}, "sparsity"),
                                    ({"sink": -3}, "sink"), ({"window": 0}, "window")])
def test_import_bad_parameters(kw, msg):
    args = {"sparsity": 0.5, **kw}
    with pytest.raises(KvtoolError, match=msg):
        import_scores("rlkv", RLKV, args.pop("sparsity"), **args)


def test_tsv_trailing_newline_and_spaces_ok(tmp_path):
    p = tmp_path / "w.tsv"
    p.write_text("0.1 0.2\n0.3 0.4\n\n")
    assert read_score_tsv(p) == [[0.1, 0.2], [0.3, 0.4]]


# --- CLI --------------------------------------------------------------------------------------------------------
def run_heads(args):
    from toolchain.commands.heads import heads

    return heads.main(args, prog_name="kvtool heads", standalone_mode=False)


def test_cli_import_and_show(tmp_path, capsys):
    out = tmp_path / "h.json"
    run_heads(["import", "rlkv", str(RLKV), "--sparsity", "0.4", "--sink", "8", "-o", str(out)])
    m = HeadsMask.load(out)
    assert m.sink == 8 and m.window == 64 and m.n_compressed() == 102
    capsys.readouterr()
    run_heads(["show", str(out)])
    text = capsys.readouterr().out
    assert text.count("\nlayer ") == 32 and "compressed 102 of 256 heads" in text


def test_cli_import_to_stdout(capsys):
    run_heads(["import", "duo", str(DUO), "--sparsity", "0.5", "--per-layer"])
    d = json.loads(capsys.readouterr().out)
    assert d["method"] == "duo" and d["per_layer"] is True and all(sum(r) == 4 for r in d["full"])


@pytest.mark.parametrize("args,msg", [
    (["import", "rlkv", "BAD", "--sparsity", "0.4"], "not a number"),
    (["import", "rlkv", "RLKV", "--sparsity", "1.4"], "sparsity"),
    (["import", "rlkv", "RLKV", "--sparsity", "0.4", "--window", "0"], "window"),
    (["import", "rlkv", "RLKV", "--sparsity", "0.4", "--sink", "-1"], "sink"),
])
def test_cli_errors_leave_no_output(tmp_path, args, msg):
    bad = tmp_path / "bad.tsv"
    bad.write_text("0.1\tx\n")
    out = tmp_path / "h.json"
    args = [str(bad) if a == "BAD" else str(RLKV) if a == "RLKV" else a for a in args] + ["-o", str(out)]
    with pytest.raises(KvtoolError, match=msg) as e:
        run_heads(args)
    assert e.value.code == 2
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["bad.tsv"]


def test_cli_show_plot(tmp_path):
    pytest.importorskip("matplotlib")
    h = import_scores("rlkv", RLKV, 0.4).save(tmp_path / "h.json")
    run_heads(["show", str(h), "--plot", str(tmp_path / "m.png")])
    assert (tmp_path / "m.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_show_plot_without_matplotlib(tmp_path, monkeypatch):
    h = import_scores("rlkv", RLKV, 0.4).save(tmp_path / "h.json")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(KvtoolError, match="needs matplotlib"):
        run_heads(["show", str(h), "--plot", str(tmp_path / "m.png")])
    assert not (tmp_path / "m.png").exists()
