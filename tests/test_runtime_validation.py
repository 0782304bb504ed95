"""Bad budgets fail the load with a message naming the key and the expected shape: no crash, no abort."""
from __future__ import annotations

import subprocess
import sys

import pytest

from converters.gguf_budgets import T_ARR, T_BOOL, T_F32, T_I32, T_STR, T_U32, Value, rewrite_gguf
from toolchain.gguf_keys import K_ENABLED, K_HEAD_WINDOW, K_SINK, K_VERSION

pytestmark = pytest.mark.usefixtures("patched_runtime")

LOAD = """
import sys
from llama_cpp import Llama
try:
    Llama(sys.argv[1], n_ctx=256, verbose=True)
except ValueError as e:
    print("LOAD-FAILED", e)
    sys.exit(3)
print("LOADED")
"""


def _try_load(path):
    return subprocess.run([sys.executable, "-c", LOAD, str(path)], capture_output=True, text=True, timeout=120)


def _write(src, dst, keys):
    base = {K_VERSION: Value(T_U32, 1), K_ENABLED: Value(T_BOOL, True), K_SINK: Value(T_U32, 4)}
    base.update(keys)
    return rewrite_gguf(src, dst, {k: v for k, v in base.items() if v is not None}, drop=lambda k: k.startswith("kvtool."))


BAD = {
    "short_array": ({K_HEAD_WINDOW: Value(T_ARR, [0, 32, 0], T_I32)}, ["kvtool.kv.head_window", "length 6", "got length 3"]),
    "negative": ({K_HEAD_WINDOW: Value(T_ARR, [0, 32, 0, -5, 0, 0], T_I32)}, ["kvtool.kv.head_window", "layer 1 head 1", "-5"]),
    "float_array": ({K_HEAD_WINDOW: Value(T_ARR, [0.0] * 6, T_F32)}, ["kvtool.kv.head_window", "f32"]),
    "scalar": ({K_HEAD_WINDOW: Value(T_U32, 32)}, ["kvtool.kv.head_window", "scalar"]),
    "enabled_not_bool": ({K_HEAD_WINDOW: Value(T_ARR, [0] * 6, T_I32), K_ENABLED: Value(T_U32, 1)}, ["kvtool.kv.enabled", "bool"]),
    "sink_string": ({K_HEAD_WINDOW: Value(T_ARR, [0] * 6, T_I32), K_SINK: Value(T_STR, "4")}, ["kvtool.kv.sink", "u32"]),
    "bad_version": ({K_HEAD_WINDOW: Value(T_ARR, [0] * 6, T_I32), K_VERSION: Value(T_U32, 7)}, ["kvtool.version", "7"]),
    "enabled_without_windows": ({}, ["kvtool.kv.head_window", "missing"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_budgets_fail_cleanly(tiny_gguf, tmp_path, case):
    keys, needles = BAD[case]
    path = _write(tiny_gguf, tmp_path / f"{case}.gguf", keys)
    res = _try_load(path)
    assert res.returncode == 3, (res.returncode, res.stderr[-2000:])  # a Python error, not a crash or abort
    err = [ln for ln in res.stderr.splitlines() if "kvtool" in ln and "error" in ln.lower()]
    assert err, res.stderr[-2000:]
    for n in needles:
        assert n in err[0], (n, err[0])


def test_good_budgets_load(tiny_gguf, tmp_path):
    path = _write(tiny_gguf, tmp_path / "ok.gguf", {K_HEAD_WINDOW: Value(T_ARR, [0, 32, 16, 0, 0, 0], T_I32)})
    res = _try_load(path)
    assert res.returncode == 0 and "LOADED" in res.stdout, res.stderr[-2000:]
    assert "2 of 6 KV heads compressed" in res.stderr
