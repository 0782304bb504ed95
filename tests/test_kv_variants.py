"""KV-quantization variants (stock+q8_0, stock+q4_0, mixed+q8_0, mixed+q4_0) in bench and eval: each load gets its
own cache type, the KV bytes it allocates equal the documented formula for that type, and a quantized V cache
without flash attention is refused in one line. Tiny random model with head dim 32, so one head's q8_0/q4_0 row is
whole blocks."""
from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest
from click.testing import CliRunner

from toolchain import eval as ev
from toolchain.cli import cli
from toolchain.errors import KvtoolError
from toolchain.kv_variants import NAMES, check_flash_attn, kv_variant
from toolchain.runtime.memory import dims_from_gguf, predict
from toolchain.tasks import Problem, register_task

pytestmark = pytest.mark.usefixtures("patched_runtime")

WINDOWS = [[16, 0], [0, 0], [16, 16]]
SINK = 4


@pytest.fixture(scope="module")
def model32(tmp_path_factory):
    pytest.importorskip("torch")
    from helpers_models import make_tiny_hf
    from helpers_runtime import write_windows

    from converters.hf_to_gguf import hf_to_gguf

    d = tmp_path_factory.mktemp("kvq")
    hf = make_tiny_hf(d / "hf", n_layer=3, n_head=4, n_head_kv=2, head_dim=32, vocab=100, seed=4)
    src = hf_to_gguf(hf, d / "f32.gguf", "f32")
    return write_windows(src, d / "masked.gguf", WINDOWS, SINK)


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    from helpers_models import _WORDS

    rng = random.Random(5)
    p = tmp_path_factory.mktemp("kvq-text") / "words.txt"
    p.write_text(" ".join(rng.choice(_WORDS) for _ in range(900)))
    return p


def _expected(model, name: str, n_ctx: int, n_ubatch: int, default_cache: str = "f16") -> int:
    kv = kv_variant(name)
    cache = kv.cache or default_cache
    return predict(dims_from_gguf(model), WINDOWS if kv.mixed else None, SINK, n_ctx, n_ubatch, 1, cache, cache,
                   True, mixed=kv.mixed).mixed_bytes


def test_names():
    assert [kv_variant(n).cache for n in NAMES] == [None, "q8_0", "q4_0", None, "q8_0", "q4_0"]
    assert [kv_variant(n).mixed for n in NAMES] == [False] * 3 + [True] * 3
    assert kv_variant("full+q8_0").mixed is False
    assert kv_variant("mixed+q3_k") is None and kv_variant("beacons") is None


def test_bench_all_variants_bytes_equal_formula(model32):
    res = CliRunner().invoke(cli, ["bench", str(model32), "--ctx", "512", "--prompt", "32", "--decode", "2",
                                   "--repeats", "1", "--ubatch", "32", "--threads", "1", "--json",
                                   "--variants", ",".join(NAMES)])
    assert res.exit_code == 0, res.output
    rows = {r["variant"]: r for r in json.loads(res.stdout)}
    assert list(rows) == list(NAMES)
    for name, r in rows.items():
        assert r["kv_bytes"] == _expected(model32, name, 512, 32), name
        assert r["decode_tps"] > 0
    # the orderings the equal-memory comparison rests on: q4_0 < q8_0 < f16 within stock and within mixed
    for base in ("stock", "mixed"):
        assert rows[f"{base}+q4_0"]["kv_bytes"] < rows[f"{base}+q8_0"]["kv_bytes"] < rows[base]["kv_bytes"]
    assert rows["mixed"]["ring_bytes"] > 0 and rows["stock+q8_0"]["ring_bytes"] == 0


def _toy(n: int, seed: int) -> list[Problem]:
    rng = random.Random(seed)
    words = ["the", "a", "of", "to", "and", "in", "is", "it"]
    return [Problem("kvqtoy", i, " ".join(rng.choice(words) for _ in range(40)), "", {"i": i},
                    lambda a, e: float(len(a) % 2 == 0), prompt=" ".join(rng.choice(words) for _ in range(40)),
                    extract=False) for i in range(n)]


register_task("kvqtoy", _toy)


def test_eval_quant_variants(model32, tmp_path):
    names = ["full", "stock+q8_0", "stock+q4_0", "mixed", "mixed+q8_0", "mixed+q4_0"]
    out = tmp_path / "r.json"
    res = ev.run_eval([model32], "kvqtoy", n=2, variants=names, max_tokens=12, n_ctx=512, n_ubatch=32, threads=1,
                      out=out, progress=False)
    rows = {r["variant"]: r for r in res["rows"]}
    assert list(rows) == names
    for name, r in rows.items():
        want = _expected(model32, "stock" if name == "full" else name, 512, 32)
        assert r["allocated_kv_bytes"] == want, name
        assert r["cache_type"] == (kv_variant(name).cache or "f16")
        assert r["mixed_active"] == kv_variant(name).mixed
    recs = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert {(x["variant"], x["cache_type"]) for x in recs} == {(n, kv_variant(n).cache or "f16") for n in names}
    # a rerun resumes every variant from its own records (the key includes the variant's cache type)
    again = ev.run_eval([model32], "kvqtoy", n=2, variants=names, max_tokens=12, n_ctx=512, n_ubatch=32,
                        threads=1, out=out, progress=False)
    assert [r["correct"] for r in again["rows"]] == [r["correct"] for r in res["rows"]]
    assert len((tmp_path / "r.jsonl").read_text().splitlines()) == len(recs)


def test_ppl_quant_variants(model32, text, tmp_path):
    r = CliRunner().invoke(cli, ["eval", str(model32), "--ppl", str(text), "--n-ctx", "128", "--ubatch", "32",
                                 "--threads", "1", "-q", "--json", "--cache-type", "f16",
                                 "--variants", "mixed,stock+q8_0,stock+q4_0,mixed+q8_0"])
    assert r.exit_code == 0, r.output + repr(r.exception)
    [res] = json.loads(r.stdout)
    rows = {v["variant"]: v for v in res["variants"]}
    assert list(rows) == ["full", "mixed", "stock+q8_0", "stock+q4_0", "mixed+q8_0"]
    assert rows["full"]["kl_mean"] == 0.0 and rows["full"]["ppl"] == res["ppl_full"]
    assert rows["mixed"]["ppl"] == res["ppl_mixed"] and rows["mixed"]["kl_mean"] == res["kl_full_mixed_mean"]
    for name, v in rows.items():
        assert v["allocated_kv_bytes"] == _expected(model32, "stock" if name == "full" else name, 128, 32), name
        if name != "full":
            assert v["kl_mean"] > 0 and v["kl_max"] >= v["kl_mean"] and 0 < v["top1_agreement"] <= 1
    # a coarser cache moves the distribution further from the reference
    assert rows["stock+q4_0"]["kl_mean"] > rows["stock+q8_0"]["kl_mean"]
    md = CliRunner().invoke(cli, ["eval", str(model32), "--ppl", str(text), "--n-ctx", "128", "--ubatch", "32",
                                  "--threads", "1", "-q", "--variants", "stock+q8_0"])
    assert md.exit_code == 0 and "| masked.gguf | stock+q8_0 | q8_0 |" in md.output


def test_quantized_v_needs_flash_attn(model32):
    from toolchain.runtime.model import Model

    check_flash_attn("f16", False)
    with pytest.raises(KvtoolError, match="needs flash attention"):
        check_flash_attn("q4_0", False)
    with pytest.raises(KvtoolError, match="needs flash attention"):
        Model.load(model32, n_ctx=256, cache_type="q8_0", flash_attn=False)
    res = subprocess.run([sys.executable, "-m", "toolchain.cli", "inspect", str(model32), "--cache-type", "q4_0",
                          "--no-flash-attn"], capture_output=True, text=True)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode != 0 and len(lines) == 1 and "needs flash attention" in lines[0], res.stderr
    assert res.stdout == ""


@pytest.mark.parametrize("args,needle", [
    (["bench", "MODEL", "--ctx", "512", "--variants", "stock+q5_k"], "unknown variant 'stock+q5_k'"),
    (["eval", "MODEL", "--ppl", "TEXT", "--variants", "mixed+q2"], "unknown variant 'mixed+q2'"),
    (["eval", "MODEL", "--task", "kvqtoy", "--variants", "full+q4"], "unknown variant 'full+q4'"),
])
def test_bad_variant_one_line(model32, text, args, needle):
    args = [str(model32) if a == "MODEL" else str(text) if a == "TEXT" else a for a in args]
    res = subprocess.run([sys.executable, "-m", "toolchain.cli", *args], capture_output=True, text=True)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode != 0 and len(lines) == 1 and needle in lines[0], res.stderr
