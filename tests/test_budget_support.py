"""Budgets the runtime would ignore (issue 19, item 6): convert refuses them unless --force, inspect says so, and
the sliding-window layout is read as llama.cpp reads it. Header-only GGUFs: no torch, no runtime."""
from __future__ import annotations

import json

import pytest
from helpers_cli import assert_one_line_error, kvtool
from helpers_gguf import header, kv, model_kvs, write

from converters.gguf_budgets import Value, open_gguf, read_budgets
from converters.gguf_header import T_ARR, T_BOOL, T_U32
from converters.gguf_swa import budget_refusal, swa_info
from toolchain.heads import random_mask


def _gguf(tmp_path, arch, n_layer=6, extra=()):
    return write(tmp_path / f"{arch}.gguf", header(model_kvs(arch, n_layer=n_layer, extra=list(extra))))


def _mask(tmp_path, n_layer, full_rows=None, name="m.json"):
    m = random_mask(n_layer, 2, 0.5, seed=0)
    if full_rows is not None:  # compress exactly head 0 of these layers, nothing else
        m.full = [[not (il in full_rows and h == 0) for h in range(2)] for il in range(n_layer)]
    p = tmp_path / name
    m.save(p)
    return p


@pytest.mark.parametrize("arch", ["mamba", "deepseek2", "jamba", "qwen3next"])
def test_convert_refuses_ignored_budgets(tmp_path, arch):
    src = _gguf(tmp_path, arch)
    out = tmp_path / "out.gguf"
    res = kvtool("convert", str(src), "--mask", str(_mask(tmp_path, 6)), "-o", str(out))
    assert_one_line_error(res, contains=f"{arch} cannot take per-head budgets")
    assert "--force" in res.stderr and not out.exists()
    res = kvtool("convert", str(src), "--mask", str(_mask(tmp_path, 6)), "-o", str(out), "--force")
    assert res.returncode == 0, res.stderr
    assert "cannot take per-head budgets" in res.stderr and read_budgets(out).head_window is not None


def test_inspect_says_so(tmp_path):
    src = _gguf(tmp_path, "rwkv7", extra=[kv("rwkv7.attention.key_length", Value(T_U32, 16))])
    res = kvtool("inspect", str(src), "--json")
    assert res.returncode == 0, res.stderr
    notes = json.loads(res.stdout)["notes"]
    assert any("rwkv7 cannot take per-head budgets" in n for n in notes)
    assert budget_refusal("llama") is None and budget_refusal("gemma3") is None


def test_swa_layout_as_llama_cpp(tmp_path):
    g3 = _gguf(tmp_path, "gemma3", n_layer=12, extra=[kv("gemma3.attention.sliding_window", Value(T_U32, 512))])
    with open_gguf(g3) as h:
        info = swa_info(h, "gemma3", 12)
    assert info.n_swa == 512 and info.global_layers() == [5, 11]
    pat = [kv("gpt-oss.attention.sliding_window", Value(T_U32, 128)),
           kv("gpt-oss.attention.sliding_window_pattern", Value(T_ARR, [True, False, False, True], T_BOOL))]
    go = _gguf(tmp_path, "gpt-oss", n_layer=4, extra=pat)
    with open_gguf(go) as h:
        assert swa_info(h, "gpt-oss", 4).global_layers() == [1, 2]
    llama = _gguf(tmp_path, "llama")
    with open_gguf(llama) as h:
        assert not swa_info(h, "llama", 6).any


def test_convert_refuses_budgets_on_sliding_layers(tmp_path):
    src = _gguf(tmp_path, "gemma3", extra=[kv("gemma3.attention.sliding_window", Value(T_U32, 512))])
    out = tmp_path / "out.gguf"
    res = kvtool("convert", str(src), "--mask", str(_mask(tmp_path, 6, full_rows={0, 5})), "-o", str(out))
    assert_one_line_error(res, contains="sit on sliding-window layers")
    assert not out.exists()
    ok = kvtool("convert", str(src), "--mask", str(_mask(tmp_path, 6, full_rows={5}, name="g.json")), "-o", str(out))
    assert ok.returncode == 0, ok.stderr
    assert read_budgets(out).head_window[5][0] > 0


def test_heads_random_compresses_global_heads_only(tmp_path):
    src = _gguf(tmp_path, "gemma3", n_layer=12, extra=[kv("gemma3.attention.sliding_window", Value(T_U32, 512))])
    out = tmp_path / "r.json"
    res = kvtool("heads", "random", "--model", str(src), "-s", "0.5", "--seed", "3", "-o", str(out))
    assert res.returncode == 0, res.stderr
    assert "compressed 2 of the 4 heads of the global layers [5, 11]" in res.stderr
    m = json.loads(out.read_text())
    assert [il for il, row in enumerate(m["full"]) if not all(row)] and all(
        all(row) for il, row in enumerate(m["full"]) if il not in (5, 11))
    # and the result converts without --force
    conv = kvtool("convert", str(src), "--mask", str(out), "-o", str(tmp_path / "c.gguf"))
    assert conv.returncode == 0, conv.stderr
    # a plain model: unchanged behaviour, no note
    plain = kvtool("heads", "random", "--model", str(_gguf(tmp_path, "llama")), "-s", "0.5", "--seed", "3")
    assert plain.returncode == 0 and "sliding-window" not in plain.stderr


def test_import_with_model_restricts(tmp_path):
    from toolchain.heads import HeadsMask
    from toolchain.swa_mask import restrict_to_global

    m = random_mask(6, 2, 0.5, seed=1)
    r, note = restrict_to_global(m, [True] * 5 + [False])
    assert note and r.n_compressed() == 1 and all(all(row) for row in r.full[:5])
    assert restrict_to_global(m, None) == (m, None)
    tsv = tmp_path / "duo.tsv"
    tsv.write_text("\n".join("\t".join("0.1" for _ in range(2)) for _ in range(6)) + "\n")
    src = _gguf(tmp_path, "gemma3", extra=[kv("gemma3.attention.sliding_window", Value(T_U32, 512))])
    res = kvtool("heads", "import", "duo", str(tsv), "-s", "0.5", "--model", str(src))
    assert res.returncode == 0, res.stderr
    mm = HeadsMask.from_dict(json.loads(res.stdout))
    assert mm.n_compressed() == 1 and not all(mm.full[5])
