"""Issue 16: one regression test (or more) per numbered case; the case number leads each test name.

Case 1 (several windows per layer) lives in test_many_windows.py; the generated catalogue of bad inputs in
test_fuzz_inputs.py.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers_cli_run import REPO, assert_one_line_error, digest, run_cli, snapshot
from helpers_fake_model import FakeModel
from helpers_gguf import alignment_kv, header, model_kvs, nested_array_kv, write

from converters.gguf_budgets import (
    K_BEACON_INTERVAL,
    K_BEACON_TOKEN,
    K_HEAD_WINDOW,
    T_ARR,
    T_STR,
    T_U32,
    Value,
    read_budgets,
    rewrite_gguf,
)
from toolchain.errors import KvtoolError
from toolchain.heads import random_mask


@pytest.fixture(scope="module")
def heads_json(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("heads") / "h.json"
    random_mask(3, 2, 0.5, seed=0).save(p)
    return p


def _with_keys(src: Path, dst: Path, keys: dict, drop=lambda k: False) -> Path:
    return rewrite_gguf(src, dst, keys, drop=drop)


# --- 2: a closed Model ---------------------------------------------------------------------------------------
def test_02_closed_model_streams_and_methods_raise(tiny_gguf, smollm2, tmp_path, patched_runtime):
    from toolchain.runtime.model import Model

    m = Model.load(tiny_gguf, n_ctx=256, n_threads=1)
    it = m.generate("the word", max_tokens=32, stream=True)
    next(it)
    m.close()
    with pytest.raises(KvtoolError, match="model is closed"):
        next(it)
    for call in (lambda: m.generate("x"), lambda: m.chat([{"role": "user", "content": "x"}]),
                 lambda: m.tokenize("x"), lambda: m.detokenize([1]), lambda: m.kv_stats(), lambda: m.reset(),
                 lambda: m.stop(), lambda: m.n_ctx, lambda: m.n_ubatch, lambda: m.has_chat_template,
                 lambda: m.render_chat([{"role": "user", "content": "x"}])):
        with pytest.raises(KvtoolError, match="model is closed"):
            call()
    m.close()  # twice is fine

    # a chat stream (SmolLM2 has a template)
    s = Model.load(smollm2, n_ctx=256, n_threads=1)
    it = s.chat([{"role": "user", "content": "Once upon a time"}], max_tokens=16, stream=True)
    next(it)
    s.close()
    with pytest.raises(KvtoolError, match="model is closed"):
        next(it)

    # the beacon loop's stream
    from converters.gguf_budgets import K_BEACON_INTERVAL as KI
    from converters.gguf_budgets import K_BEACON_TOKEN as KT

    b = _with_keys(tiny_gguf, tmp_path / "beacon.gguf", {KT: Value(T_U32, 5), KI: Value(T_U32, 4)})
    m = Model.load(b, n_ctx=256, n_threads=1)
    assert m.beacons
    it = m.generate("the word", max_tokens=32, stream=True)
    next(it)
    m.close()
    with pytest.raises(KvtoolError, match="model is closed"):
        next(it)


# --- 3 and 7: header fields validated for every file ---------------------------------------------------------
def test_03_block_count_zero_without_kvtool_keys(tiny_gguf, tmp_path, patched_runtime):
    from toolchain.runtime.model import Model

    bad = _with_keys(tiny_gguf, tmp_path / "b0.gguf", {"llama.block_count": Value(T_U32, 0)})
    assert read_budgets(bad) is None  # no kvtool keys at all
    with pytest.raises(KvtoolError, match="block_count is 0"):
        Model.load(bad, n_ctx=256)
    for cmd in (["generate", bad, "-p", "hi", "-n", "1"], ["inspect", bad], ["plan", bad, "--mem", "1GiB"]):
        assert_one_line_error(run_cli(cmd), "block_count", what=str(cmd))


@pytest.mark.parametrize("kvs,match", [
    (model_kvs(n_head_kv=Value(T_STR, "2")), "head_count_kv must be an integer"),
    (model_kvs(arch=None), "no general.architecture"),
    (model_kvs(arch="nosucharch")[:1], "unknown architecture 'nosucharch'"),
    (model_kvs(n_layer=0), "block_count is 0"),
    (model_kvs(n_head_kv=0), "head_count_kv is 0"),
], ids=["head_count_kv-string", "no-arch", "unknown-arch", "block_count-0", "head_count_kv-0"])
def test_07_15_bad_header_fields(tmp_path, heads_json, kvs, match):
    f = write(tmp_path / "m.gguf", header(kvs))
    for cmd in (["inspect", f], ["plan", f, "--mem", "1GiB"], ["heads", "random", "--model", f, "-s", "0.5",
                                                                 "--seed", "1"],
                ["convert", f, "--mask", heads_json, "-o", tmp_path / "o.gguf"], ["generate", f, "-p", "x"]):
        assert_one_line_error(run_cli(cmd), match, what=str(cmd))
    assert not (tmp_path / "o.gguf").exists()


# --- 4: --threads ---------------------------------------------------------------------------------------------
def test_04_threads_capped_with_one_line(tiny_gguf, patched_runtime):
    from toolchain.validate import cap_threads, max_threads

    notes = []
    assert cap_threads(10**6, notes.append) == max_threads() and len(notes) == 1
    assert cap_threads(1, notes.append) == 1 and len(notes) == 1
    res = run_cli(["generate", tiny_gguf, "-p", "the word", "-n", "2", "--threads", "100000"], fork=False)
    assert res.rc == 0 and res.signal is None, res.err
    assert sum("threads is more than this machine can start" in ln for ln in res.lines) == 1, res.err


# --- 5: convert never replaces an input, a device or a FIFO ---------------------------------------------------
def test_05_convert_output_onto_any_input_is_refused(tiny_gguf, heads_json, tmp_path):
    h = tmp_path / "h.json"
    h.write_bytes(heads_json.read_bytes())
    before = digest(h)
    assert_one_line_error(run_cli(["convert", tiny_gguf, "--mask", h, "-o", h]), "refusing to overwrite the input")
    (tmp_path / "hard.json").hardlink_to(h)
    (tmp_path / "soft.json").symlink_to(h)
    for o in ("hard.json", "soft.json", "./h.json"):
        assert_one_line_error(run_cli(["convert", tiny_gguf, "--mask", h, "-o", o], cwd=tmp_path),
                              "refusing to overwrite the input", what=o)
    assert digest(h) == before
    m = tmp_path / "model-link.gguf"
    m.symlink_to(tiny_gguf)
    assert_one_line_error(run_cli(["convert", tiny_gguf, "--mask", h, "-o", m]), "refusing to overwrite")


def test_05_output_fifo_and_devices_are_refused(tiny_gguf, heads_json, tmp_path):
    from toolchain.validate import check_output_path

    fifo = tmp_path / "out.gguf"
    os.mkfifo(fifo)
    assert_one_line_error(run_cli(["convert", tiny_gguf, "--mask", heads_json, "-o", fifo]), "is a FIFO")
    assert_one_line_error(run_cli(["heads", "show", heads_json, "--plot", fifo]), "is a FIFO")
    assert_one_line_error(run_cli(["heads", "import", "rlkv", REPO / "tests/data/rlkv_Llama-3.1-8B-R1.adapter_weights.tsv",
                                   "-s", "0.5", "-o", fifo]), "is a FIFO")
    assert fifo.is_fifo()
    for dev in ("/dev/null", "/dev/zero"):  # checked without writing: as root a rename would replace the node
        with pytest.raises(KvtoolError, match="is a character device"):
            check_output_path(dev)


# --- 6: deep nesting --------------------------------------------------------------------------------------------
def test_06_deeply_nested_inputs(tmp_path, tiny_gguf, heads_json):
    f = write(tmp_path / "deep.gguf", header(model_kvs() + [nested_array_kv("x.deep", 5000)]))
    for cmd in (["inspect", f], ["plan", f, "--mem", "1GiB"], ["heads", "random", "--model", f, "-s", "0.5",
                                                                 "--seed", "1"],
                ["convert", f, "--mask", heads_json, "-o", tmp_path / "o.gguf"], ["generate", f, "-p", "x"]):
        assert_one_line_error(run_cli(cmd), "nested", what=str(cmd))
    from toolchain.runtime.model import Model

    with pytest.raises(KvtoolError, match="nested"):
        Model.load(f)
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000)
    assert_one_line_error(run_cli(["heads", "show", deep]), "nested too deeply")
    assert_one_line_error(run_cli(["convert", tiny_gguf, "--mask", deep, "-o", tmp_path / "o.gguf"]), "nested")
    assert not (tmp_path / "o.gguf").exists()


# --- 8: names too long ------------------------------------------------------------------------------------------
def test_08_path_too_long(tmp_path, tiny_gguf, heads_json):
    long = tmp_path / ("a" * 300 + ".gguf")
    deep = tmp_path / "/".join(["b" * 200] * 25) / "m.gguf"  # past PATH_MAX
    for p in (long, deep):
        for cmd in (["inspect", p], ["generate", p, "-p", "x"], ["convert", p, "--mask", heads_json],
                    ["convert", tiny_gguf, "--mask", heads_json, "-o", p]):
            assert_one_line_error(run_cli(cmd), what=str(cmd)[:200])


# --- 9: bytes that are not UTF-8 on stdin -----------------------------------------------------------------------
def test_09_non_utf8_stdin(tiny_gguf, smollm2, patched_runtime):
    assert_one_line_error(run_cli(["generate", tiny_gguf, "-f", "-"], stdin=b"Once \xff\xfe upon"), "not UTF-8")
    res = run_cli(["chat", smollm2, "-t", "1", "--n-ctx", "256"], stdin=b"hello \xc3\x28\n", fork=False)
    assert_one_line_error(res, "not UTF-8")


# --- 10: context and batch ranges -------------------------------------------------------------------------------
def test_10_small_n_ctx_and_huge_values(tiny_gguf, patched_runtime):
    from toolchain.runtime.model import Model

    m = Model.load(tiny_gguf, n_ctx=100, n_threads=1)
    try:
        assert m.n_ctx == 256  # llama.cpp pads to 256; the prompt check uses the same number as Llama's buffer
        n = 10
        while len(m.tokenize(" ".join(["the word"] * n))) <= 120:
            n += 5
        prompt = " ".join(["the word"] * n)  # between the 100 asked for and the 256 llama.cpp gives
        assert 120 < len(m.tokenize(prompt)) < 250
        m.generate(prompt, max_tokens=2)
        with pytest.raises(KvtoolError, match="context holds 256"):
            m.generate(" ".join(["the word"] * 200), max_tokens=2)
    finally:
        m.close()
    t0 = time.perf_counter()
    for kw, match in (({"n_ubatch": 4294967296}, "n_ubatch must be in"), ({"n_ctx": 4294967296}, "n_ctx must be in"),
                      ({"n_ctx": 2147483647}, "n_ctx must be in"), ({"n_ctx": 0}, "n_ctx must be in"),
                      ({"seed": -1}, "seed must be in"), ({"n_threads": 0}, "threads must be")):
        with pytest.raises(KvtoolError, match=match):
            Model.load(tiny_gguf, **kw)
    assert time.perf_counter() - t0 < 30  # refused up front, not after allocating (generous bound, not a benchmark)


def test_10_kv_larger_than_memory_is_refused_up_front(tiny_gguf, monkeypatch, patched_runtime):
    from toolchain.runtime.model import Model

    real = os.sysconf
    monkeypatch.setattr(os, "sysconf", lambda k: 1 if k == "SC_PHYS_PAGES" else real(k))
    with pytest.raises(KvtoolError, match="more than this machine's"):
        Model.load(tiny_gguf, n_ctx=1 << 20)


# --- 11: write errors -------------------------------------------------------------------------------------------
def test_11_full_disk_and_dev_full(tmp_path, heads_json, monkeypatch):
    import tempfile

    from toolchain.cli import main

    real = tempfile.mkstemp

    def full_disk(*a, **kw):  # a temp file whose writes fail with ENOSPC, like a full filesystem
        fd, name = real(*a, **kw)
        os.close(fd)
        return os.open("/dev/full", os.O_WRONLY), name

    monkeypatch.setattr(tempfile, "mkstemp", full_disk)
    tsv = REPO / "tests/data/rlkv_Llama-3.1-8B-R1.adapter_weights.tsv"
    out = tmp_path / "out.json"
    for argv in (["heads", "import", "rlkv", str(tsv), "-s", "0.5", "-o", str(out)],
                 ["heads", "show", str(heads_json), "--plot", str(tmp_path / "p.png")]):
        if "--plot" in argv:
            pytest.importorskip("matplotlib")
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code != 0
        assert not out.exists() and not (tmp_path / "p.png").exists()
        assert not list(tmp_path.glob(".*.tmp"))
    monkeypatch.undo()
    for cmd in (f"heads show {heads_json}", f"heads import rlkv {tsv} -s 0.5"):
        res = subprocess.run(f"{sys.executable} -m toolchain.cli {cmd} > /dev/full", shell=True, capture_output=True,
                             text=True, cwd=REPO)
        assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("kvtool: error:") and "No space left" in lines[0], lines


# --- 12: huge alignment ---------------------------------------------------------------------------------------
def test_12_huge_alignment(tmp_path, heads_json):
    f = write(tmp_path / "a.gguf", header(model_kvs(n_layer=3) + [alignment_kv(1 << 40)]))
    snap = snapshot(tmp_path)
    assert_one_line_error(run_cli(["convert", f, "--mask", heads_json, "-o", tmp_path / "o.gguf"]), "alignment")
    assert snapshot(tmp_path) == snap


# --- 13: server request fields --------------------------------------------------------------------------------
@pytest.mark.parametrize("body", [
    {"prompt": "Hello", "stream": True, "stream_options": "yes"},
    {"prompt": "Hello", "stream": True, "stream_options": {"include_usage": "yes"}},
    {"prompt": "Hello", "stream": True, "stream_options": {"bogus": True}},
    {"prompt": "Hello", "stream": "yes"},
    {"prompt": "Hello", "temperature": float("nan")},
    {"prompt": "Hello", "temperature": float("inf")},
    {"prompt": "Hello", "temperature": -1},
    {"prompt": "Hello", "top_p": float("nan")},
    {"prompt": "Hello", "top_p": 1.5},
    {"prompt": "Hello", "seed": 2**40},
    {"prompt": "Hello", "seed": -5},
    {"prompt": "Hello", "top_k": 2**40},
    {"prompt": "Hello", "max_tokens": 2**40},
    {"prompt": "Hello", "max_tokens": True},
    {"prompt": "Hello", "repeat_penalty": 1e300},
])
def test_13_server_rejects_bad_fields_with_400(body):
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from toolchain.commands.serve import make_app

    client = TestClient(make_app(FakeModel()))
    for path, b in (("/v1/completions", body),
                    ("/v1/chat/completions", {**{k: v for k, v in body.items() if k != "prompt"},
                                              "messages": [{"role": "user", "content": "hi"}]})):
        r = client.post(path, content=json.dumps(b))  # json.dumps writes NaN/Infinity as Python's json reads them
        assert r.status_code == 400, (path, b, r.status_code, r.text)
        assert "error" in r.json()
    ok = client.post("/v1/completions", json={"prompt": "Hello", "stream": True,
                                               "stream_options": {"include_usage": True}})
    assert ok.status_code == 200 and ok.text.rstrip().endswith("data: [DONE]") and '"usage"' in ok.text


# --- 14: beacon keys validated on the way in and out, one validator --------------------------------------------
@pytest.mark.parametrize("keys,match", [
    ({K_BEACON_TOKEN: Value(T_U32, 5), K_BEACON_INTERVAL: Value(T_U32, 0)}, "interval must be >= 1"),
    ({K_BEACON_TOKEN: Value(T_U32, 100000), K_BEACON_INTERVAL: Value(T_U32, 8)}, "outside the model's vocabulary"),
    ({K_BEACON_TOKEN: Value(T_U32, 5)}, "must be given together"),
])
def test_14_invalid_beacon_keys_are_not_copied(tiny_gguf, heads_json, tmp_path, keys, match):
    bad = _with_keys(tiny_gguf, tmp_path / "bad.gguf", keys)
    out = tmp_path / "o.gguf"
    assert_one_line_error(run_cli(["convert", bad, "--mask", heads_json, "-o", out]), match)
    assert not out.exists()
    assert_one_line_error(run_cli(["inspect", bad]), match)  # inspect and generate share the validator
    with pytest.raises(KvtoolError, match=match):
        read_budgets(bad)


# --- 15: windows, TSV cells, --window ---------------------------------------------------------------------------
def test_15_large_u32_window_and_tsv_and_window_flag(tiny_gguf, tmp_path):
    f = _with_keys(tiny_gguf, tmp_path / "w.gguf", {K_HEAD_WINDOW: Value(T_ARR, [0, 2**31, 0, 0, 0, 0], T_U32)})
    with pytest.raises(KvtoolError, match=r"layer 0 head 1 is 2147483648: larger than 2147483647") as e:
        read_budgets(f)
    assert "negative" not in str(e.value)
    tsv = tmp_path / "s.tsv"
    tsv.write_text("0.5\t1_0\n0.1\t0.2\n")
    assert_one_line_error(run_cli(["heads", "import", "rlkv", tsv, "-s", "0.5"]), "'1_0' is not a number")
    good = REPO / "tests/data/rlkv_Llama-3.1-8B-R1.adapter_weights.tsv"
    out = tmp_path / "h.json"
    for flag in (["--window", "4294967296"], ["--window", "2147483648"], ["--sink", "4294967296"]):
        assert_one_line_error(run_cli(["heads", "import", "rlkv", good, "-s", "0.5", "-o", out, *flag]),
                              "must be an integer in")
        assert not out.exists()


# --- 16: signals during convert, stale temp files ---------------------------------------------------------------
_SLOW_CONVERT = r"""
import os, signal, sys, time
import converters.gguf_budgets as gb
real = gb._copy_range
def slow(src, dst, off, n):  # the write is under way when the signal comes
    os.write(dst, b"x" * 4096)
    print("writing", flush=True)
    time.sleep(60)
gb._copy_range = slow
from toolchain.cli import main
main(sys.argv[1:])
"""


def _default_signals() -> None:
    """The convert starts as from a terminal: a runner under nohup or in a background job ignores SIGHUP/SIGINT,
    and ignored signals are inherited, which would test the runner instead of kvtool."""
    for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(s, signal.SIG_DFL)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_16_signal_during_convert_leaves_no_temp_file(tiny_gguf, heads_json, tmp_path, sig):
    out = tmp_path / "out.gguf"
    p = subprocess.Popen([sys.executable, "-c", _SLOW_CONVERT, "convert", str(tiny_gguf), "--mask", str(heads_json),
                          "-o", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                         preexec_fn=_default_signals)
    assert p.stdout.readline().strip() == "writing"
    assert len(list(tmp_path.glob(".out.gguf.*"))) == 1  # the temp file exists while writing
    p.send_signal(sig)
    _, err = p.communicate(timeout=60)
    assert p.returncode != 0 and "Traceback" not in err, err
    assert [ln for ln in err.splitlines() if ln.strip()][-1].startswith("kvtool:")
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_16_stale_temp_files_are_swept_live_ones_kept(tiny_gguf, heads_json, tmp_path):
    from toolchain.atomic import SUFFIX

    stale = tmp_path / f".out.gguf.abcd1234{SUFFIX}"
    stale.write_bytes(b"x" * 1000)
    live = tmp_path / f".other.gguf.efgh5678{SUFFIX}"
    live.write_bytes(b"y")
    foreign = tmp_path / ".notes.txt.tmp"  # not our pattern
    foreign.write_bytes(b"z")
    old = time.time() - 3600
    for f in (stale, live, foreign):
        os.utime(f, (old, old))
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl,sys,time; f=open(sys.argv[1]);"
                               "fcntl.flock(f, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(120)", str(live)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        res = run_cli(["convert", tiny_gguf, "--mask", heads_json, "-o", tmp_path / "out.gguf"], fork=False)
        assert res.rc == 0, res.err
        assert not stale.exists() and live.exists() and foreign.exists()
        assert read_budgets(tmp_path / "out.gguf") is not None
    finally:
        holder.kill()
        holder.wait()
