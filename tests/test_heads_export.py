"""`kvtool heads export rlkv|duo`: heads.json -> RLKV adapter_weights.tsv / DuoAttention full_attention_heads.tsv.

Oracles: import -> export -> import gives the same mask (on the published RLKV and DuoAttention
tables in tests/data, and on masks made here); the written table is what the formats' own readers (numpy.loadtxt) see; a 0/1
table gives the same mask under any threshold in (0, 1) and under a "compress the k lowest" rule whatever its tie
order; bad input is one line and leaves no file."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from toolchain.errors import KvtoolError
from toolchain.heads import HeadsMask, import_scores, random_mask
from toolchain.heads_export import export_heads, format_tsv

# the published RLKV and DuoAttention tables for Llama-3.1-8B-R1 (byte-identical copies of the session's anchors)
DATA = Path(__file__).parent / "data"
ANCHOR_FILES = [("rlkv", DATA / "rlkv_Llama-3.1-8B-R1.adapter_weights.tsv"),
                ("duo", DATA / "duo_Llama-3.1-8B-R1.full_attention_heads.tsv")]


def _kvtool(*args):
    return subprocess.run([sys.executable, "-m", "toolchain.cli", *map(str, args)], capture_output=True, text=True)


def _reimport(kind: str, path: Path, mask: HeadsMask, **kw) -> HeadsMask:
    n = mask.n_layer * mask.n_head_kv
    return import_scores(kind, path, mask.n_compressed() / n, sink=mask.sink, window=mask.window, **kw)


def _roundtrip(kind: str, mask: HeadsMask, tmp_path: Path) -> Path:
    src = tmp_path / f"{kind}.heads.json"
    mask.save(src)
    out = tmp_path / f"{kind}.tsv"
    export_heads(kind, src, out)
    back = _reimport(kind, out, mask)
    assert back.full == mask.full
    # what the formats' own loaders read: an L x H float table of 0/1
    t = np.loadtxt(out, dtype=np.float64)
    assert t.shape == (mask.n_layer, mask.n_head_kv)
    assert (t == np.asarray(mask.full, dtype=np.float64)).all()
    return out


@pytest.mark.parametrize("kind,path", ANCHOR_FILES)
@pytest.mark.parametrize("sparsity,per_layer", [(0.5, False), (0.25, False), (0.75, True)])
def test_anchor_import_export_import(kind, path, sparsity, per_layer, tmp_path):
    mask = import_scores(kind, path, sparsity, per_layer)
    assert (mask.n_layer, mask.n_head_kv) == (32, 8)
    out = _roundtrip(kind, mask, tmp_path)
    # scores exported: re-imported under the same rule they give the same mask, and the exact same numbers
    src = tmp_path / "with-scores.json"
    mask.save(src)
    out2 = tmp_path / "scores.tsv"
    export_heads(kind, src, out2, scores=True)
    back = import_scores(kind, out2, sparsity, per_layer)
    assert back.full == mask.full
    assert np.array_equal(np.asarray(back.scores), np.clip(np.loadtxt(path), 0, 1))
    assert out.read_text() != out2.read_text()


@pytest.mark.parametrize("per_layer", [False, True])
@pytest.mark.parametrize("s", [0.0, 0.3, 0.5, 1.0])
def test_random_masks_round_trip(tmp_path, s, per_layer):
    for kind in ("rlkv", "duo"):
        _roundtrip(kind, random_mask(5, 3, s, seed=7, per_layer=per_layer), tmp_path)


def test_mask_table_is_rule_independent(tmp_path):
    """A 0/1 table: every threshold in (0, 1), and every k-lowest rule with any tie order, give the same mask."""
    mask = random_mask(6, 4, 0.5, seed=3)
    src = tmp_path / "h.json"
    mask.save(src)
    out = tmp_path / "t.tsv"
    export_heads("duo", src, out)
    t = np.loadtxt(out)
    want = np.asarray(mask.full)
    for thr in (1e-9, 0.25, 0.5, 0.999):
        assert ((t > thr) == want).all()
    k = mask.n_compressed()
    rng = np.random.default_rng(0)
    for _ in range(20):  # RLKV-style tie noise: any order among equal values
        noisy = t.ravel() + rng.uniform(0, 1e-3, t.size)
        comp = np.zeros(t.size, bool)
        comp[np.argsort(noisy, kind="stable")[:k]] = True
        assert (~comp.reshape(t.shape) == want).all()


def test_format_is_savetxt_default(tmp_path):
    rows = [[1.0, 0.0], [0.25, 1.0]]
    ref = tmp_path / "ref.tsv"
    np.savetxt(ref, np.array(rows), delimiter="\t")
    assert format_tsv(rows) == ref.read_text()


def test_cli_export_and_bad_input(tmp_path):
    mask = random_mask(4, 2, 0.5, seed=1)
    src = tmp_path / "h.json"
    mask.save(src)
    out = tmp_path / "adapter_weights.tsv"
    r = _kvtool("heads", "export", "rlkv", src, "-o", out)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "" and "4 of 8 heads compressed" in r.stderr
    r = _kvtool("heads", "import", "rlkv", out, "-s", "0.5")
    assert r.returncode == 0 and HeadsMask.from_dict(__import__("json").loads(r.stdout)).full == mask.full

    no_scores = tmp_path / "ns.json"
    d = mask.to_dict()
    d.pop("scores")
    HeadsMask.from_dict(d).save(no_scores)
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    keep = tmp_path / "keep.tsv"
    keep.write_text("previous\n")
    cases = [
        (("heads", "export", "rlkv", tmp_path / "missing.json", "-o", tmp_path / "o1.tsv"), "no such file"),
        (("heads", "export", "duo", bad_json, "-o", tmp_path / "o2.tsv"), "not valid JSON"),
        (("heads", "export", "duo", no_scores, "--scores", "-o", keep), "no scores"),
        (("heads", "export", "rlkv", src, "-o", src), ""),
        (("heads", "export", "rlkv", src, "-o", tmp_path), ""),
        (("heads", "export", "gqa", src, "-o", tmp_path / "o3.tsv"), "gqa"),
        (("heads", "export", "rlkv", src), "-o"),
    ]
    for args, needle in cases:
        r = _kvtool(*args)
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert r.returncode != 0 and len(lines) == 1 and lines[0].startswith("kvtool: error:"), (args, r.stderr)
        assert needle in lines[0], (needle, lines[0])
    assert not any((tmp_path / f"o{i}.tsv").exists() for i in (1, 2, 3))
    assert keep.read_text() == "previous\n"  # a refused export leaves the old file as it was
    assert HeadsMask.load(src).full == mask.full
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp files left


def test_unknown_kind_api(tmp_path):
    mask = random_mask(2, 2, 0.5, seed=1)
    mask.save(tmp_path / "h.json")
    with pytest.raises(KvtoolError, match="rlkv|duo"):
        export_heads("sglang", tmp_path / "h.json", tmp_path / "o.tsv")
