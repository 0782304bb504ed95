"""One decode core (issue 17.3): every generation path reaches ``llama_decode`` only through ``runtime/decode.py``.

Two oracles. At run time a spy wraps ``llama_cpp.llama_decode`` and records the Python stack of every call while
``Model.generate``, ``Model.chat`` (streamed), the beacon path, ``BeaconGenerator``, eval's greedy runs and the
``generate``/``chat`` verbs run: each call must come from ``decode_batch`` inside ``generate_step`` (llama-cpp-python's
own ``Llama.eval``/``generate`` would show up as other callers). In the source, ``ast`` finds every call of
``llama_decode`` and every use of llama-cpp-python's private ``_ctx``/``_batch``/``_model``: the first only in
``decode_batch``, the others only inside ``toolchain/runtime/``, and no module outside the runtime imports a private
runtime name. Seeded sampling is checked for reproducibility, and a closed model stops a live stream.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers_runtime import write_windows

from toolchain.errors import KvtoolError

ROOT = Path(__file__).resolve().parent.parent
T1 = {"n_threads": 1}


# ---------------------------------------------------------------------------------------------- static
def _py_files():
    for pkg in ("toolchain", "converters", "bench"):
        yield from sorted((ROOT / pkg).rglob("*.py"))


def test_only_decode_batch_calls_llama_decode_and_only_the_runtime_touches_privates():
    decode_callers, private_uses, private_imports = [], [], []
    for path in _py_files():
        rel = path.relative_to(ROOT).as_posix()
        tree = ast.parse(path.read_text(encoding="utf-8"))
        in_runtime = rel.startswith("toolchain/runtime/")
        funcs = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        owner = {}
        for f in funcs:
            for n in ast.walk(f):
                owner.setdefault(id(n), f.name)  # the outermost function wins (walk order is outer first)
        for n in ast.walk(tree):
            if isinstance(n, ast.Attribute) and n.attr == "llama_decode":
                decode_callers.append((rel, owner.get(id(n))))
            if isinstance(n, ast.Attribute) and n.attr in ("_ctx", "_batch", "_model") and not in_runtime:
                private_uses.append((rel, n.lineno, n.attr))
            if isinstance(n, ast.ImportFrom) and not in_runtime and "runtime" in (n.module or ""):
                private_imports += [(rel, a.name) for a in n.names if a.name.startswith("_")]
    assert decode_callers == [("toolchain/runtime/decode.py", "decode_batch")]
    assert private_uses == [], "llama-cpp-python privates outside toolchain/runtime/"
    assert private_imports == [], "private runtime helpers imported outside toolchain/runtime/"


# ---------------------------------------------------------------------------------------------- the spy
@pytest.fixture
def spy(monkeypatch):
    """Every llama_decode call as the tuple of function names on the Python stack (innermost first)."""
    import llama_cpp

    real = llama_cpp.llama_decode
    calls: list[tuple[str, ...]] = []

    def counting(ctx, batch):
        f, names = sys._getframe(1), []
        while f is not None:
            names.append(f.f_code.co_name)
            f = f.f_back
        calls.append(tuple(names))
        return real(ctx, batch)

    monkeypatch.setattr(llama_cpp, "llama_decode", counting)
    return calls


def _all_through_the_core(calls, min_calls: int = 2):
    assert len(calls) >= min_calls
    for names in calls:
        assert names[0] == "decode_batch", names[:4]
        assert "generate_step" in names, names[:6]


@pytest.fixture(scope="module")
def masked(smollm2, tmp_path_factory):
    return write_windows(smollm2, tmp_path_factory.mktemp("core") / "smol-w64.gguf", [[0, 64, 64]] * 30, 16)


@pytest.fixture(scope="module")
def beacon_file(tiny_gguf, tmp_path_factory):
    from converters.gguf_budgets import T_U32, Value
    from toolchain.gguf_keys import K_BEACON_INTERVAL, K_BEACON_TOKEN

    return write_windows(tiny_gguf, tmp_path_factory.mktemp("core-b") / "tiny-b.gguf", [[0, 16], [16, 0], [16, 16]],
                         4, extra={K_BEACON_TOKEN: Value(T_U32, 50), K_BEACON_INTERVAL: Value(T_U32, 8)})


@pytest.mark.usefixtures("patched_runtime")
def test_model_generate_chat_and_eval_go_through_the_core(masked, spy):
    from toolchain import Model
    from toolchain.runtime.decode import greedy

    with Model.load(masked, n_ctx=512, **T1) as m:
        m.generate("The capital of France is", max_tokens=4)
        _all_through_the_core(spy)
        spy.clear()
        list(m.chat([{"role": "user", "content": "Hi"}], max_tokens=4, stream=True, temperature=0.7, seed=1))
        _all_through_the_core(spy)
        spy.clear()
        g = greedy(m, m.tokenize("Q: 1+1=? A:"), 4)
        assert g["ids"]
        _all_through_the_core(spy)


@pytest.mark.usefixtures("patched_runtime")
def test_beacon_paths_go_through_the_core(beacon_file, spy):
    from toolchain import Model
    from toolchain.runtime.beacons import BeaconGenerator, generate_with_beacons
    from toolchain.runtime.decode import greedy_beacons

    with Model.load(beacon_file, n_ctx=256, **T1) as m:
        assert m.beacons
        m.generate("the word", max_tokens=20)
        assert m.beacon_stats.beacons == 2
        _all_through_the_core(spy)
        spy.clear()
        generate_with_beacons(m, "the word", max_tokens=10, stream=False)
        _all_through_the_core(spy)
        spy.clear()
        g = greedy_beacons(m, m.tokenize("the word"), 20)
        assert g["beacon_stats"]["beacons"] == 2
        _all_through_the_core(spy)
        spy.clear()
        out = list(BeaconGenerator(m, 50, 8).generate(m.tokenize("the word"), 12))
        assert len(out) == 12
        _all_through_the_core(spy)


@pytest.mark.usefixtures("patched_runtime")
def test_the_generate_and_chat_verbs_go_through_the_core(masked, spy):
    from toolchain.commands.chat import command as chat_cmd
    from toolchain.commands.generate import command as generate_cmd

    res = CliRunner().invoke(generate_cmd, [str(masked), "-p", "Hello", "-n", "4", "--n-ctx", "512", "-t", "1"])
    assert res.exit_code == 0, res.output
    _all_through_the_core(spy)
    spy.clear()
    res = CliRunner().invoke(chat_cmd, [str(masked), "-n", "4", "--temp", "0", "--n-ctx", "512", "-t", "1"],
                             input="Hi\n")
    assert res.exit_code == 0, res.output
    _all_through_the_core(spy)


# ---------------------------------------------------------------------------------------------- behaviour
@pytest.mark.usefixtures("patched_runtime")
def test_seeded_sampling_is_reproducible(masked, beacon_file):
    """A given seed repeats exactly (whole and streamed); unseeded calls follow from the load seed, so a fresh load
    repeats the sequence; the beacon path follows the same rules."""
    from toolchain import Model

    kw = dict(max_tokens=12, temperature=0.9, top_k=30, top_p=0.9, min_p=0.02)
    for path, text in ((masked, "Once upon a time"), (beacon_file, "the word")):  # the tiny vocabulary: lower case
        with Model.load(path, n_ctx=512, seed=3, **T1) as a:
            s1 = a.generate(text, seed=42, **kw)
            s2 = "".join(a.generate(text, seed=42, stream=True, **kw))
            u = [a.generate(text, **kw) for _ in range(2)]
            rp = a.generate(text, seed=5, repeat_penalty=1.3, **kw)  # the penalty path runs
        assert s1 == s2 and isinstance(rp, str)
        with Model.load(path, n_ctx=512, seed=3, **T1) as b:
            assert b.generate(text, seed=42, **kw) == s1
            assert [b.generate(text, **kw) for _ in range(2)] == u


@pytest.mark.usefixtures("patched_runtime")
def test_a_live_stream_of_a_closed_model_raises(beacon_file, tiny_gguf):
    from toolchain import Model

    for path in (tiny_gguf, beacon_file):
        m = Model.load(path, n_ctx=256, **T1)
        it = m.generate("the word", max_tokens=30, stream=True)
        next(it)
        m.close()
        with pytest.raises(KvtoolError, match="model is closed"):
            list(it)


def test_stop_filter_releases_whole_pieces():
    """Released text keeps the tokens' pieces; a piece that may start a stop string waits, and the cut is at the
    earliest stop string whichever order the list has."""
    from toolchain.runtime.text import stop_filter

    hit = []
    out = list(stop_filter(iter([" ", "4", ",", " ", "7", "x"]), ["9", " 7"], lambda: hit.append(1)))
    assert out == [" ", "4", ","] and hit == [1]
    assert list(stop_filter(iter(["ab", "cd"]), ["d", "bc"], lambda: None)) == ["a"]
