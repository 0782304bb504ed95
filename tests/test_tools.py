"""llama.cpp's own tools built from the patched tree: found by ``kvtool tools``, launched from the venv, and mixed.

The KV check reads llama-server's own allocation lines and compares them with ``runtime.memory.predict`` (the
rule the runtime allocates by): the file alone turns the mixed cache on, and ``--override-kv
kvtool.kv.enabled=bool:false`` gives back the stock cache from the same file.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helpers_cli import assert_one_line_error, kvtool
from helpers_tools import tiny_mixed, tool_paths

from toolchain.runtime.tools import TOOLS

pytest.importorskip("httpx")


@pytest.fixture(scope="module")
def tools():
    return tool_paths()


@pytest.fixture(scope="module")
def tiny(tiny_gguf, tmp_path_factory):
    return tiny_mixed(tiny_gguf, tmp_path_factory.mktemp("tools") / "tiny-mixed.gguf")


def test_not_built_is_one_line(tmp_path):
    env = {"KVTOOL_CACHE": str(tmp_path)}
    # no runtime marker can point into an empty cache, so the tool set for this hash is missing there
    line = assert_one_line_error(kvtool("tools", env=env), code=2, contains="not built")
    assert "kvtool build-runtime --tools" in line
    assert_one_line_error(kvtool("tools", "path", "llama-nope", env=env), code=2, contains="unknown tool")


def test_tools_lists_existing_paths(tools):
    res = kvtool("tools")
    assert res.returncode == 0, res.stderr
    listed = dict(line.split() for line in res.stdout.strip().splitlines())
    assert set(listed) == set(TOOLS)
    for name, p in listed.items():
        assert Path(p) == tools[name] and Path(p).is_file()
    assert kvtool("tools", "path", "server").stdout.strip() == str(tools["llama-server"])


def test_venv_launcher_runs_the_binary(tools):
    exe = Path(sys.executable).parent / "kvtool-llama-cli"
    assert exe.exists(), "pip install -e . installs the kvtool-llama-* launchers"
    res = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "version" in (res.stdout + res.stderr).lower()
    res = kvtool("tools", "run", "llama-bench", "--help")
    assert res.returncode == 0 and "--n-depth" in res.stdout


def _server_kv(tools, model: Path, tmp_path: Path, *extra: str, parallel: int = 2, n_ctx: int = 1024):
    from toolchain.commands.llama_server import LlamaServer, parse_kv_log, server_args

    args = server_args(str(tools["llama-server"]), str(model), "{sock}", parallel, n_ctx, 64, 1, "f16", False, None,
                       "0", 0, "tiny")
    srv = LlamaServer(args + list(extra), tmp_path / "server.log")
    try:
        srv.start(timeout=120)
        return parse_kv_log(srv.log_text())
    finally:
        srv.stop()


def test_llama_server_gets_the_mixed_cache_from_the_file(tools, tiny, tmp_path):
    from converters.gguf_budgets import read_budgets
    from toolchain.runtime.memory import dims_from_gguf, predict

    dims, b = dims_from_gguf(tiny), read_budgets(tiny)
    kw = dict(n_ubatch=64, n_seq=2, flash_attn=True, unified=False)
    want_mixed = predict(dims, b.head_window, b.sink, 2048, **kw)
    want_stock = predict(dims, None, 0, 2048, **kw)
    assert want_mixed.mixed and want_mixed.mixed_bytes < want_stock.stock_bytes

    mixed = _server_kv(tools, tiny, tmp_path)
    assert mixed.mixed and mixed.budgets_enabled and (mixed.compressed_heads, mixed.total_heads) == (3, 6)
    assert sorted(x["cells"] for x in mixed.buffers) == sorted([want_mixed.full_cells, *want_mixed.ring_cells.values()])
    assert all(x["seqs"] == 2 for x in mixed.buffers)  # one stream per slot
    # the log prints MiB with two decimals: each buffer is exact to 0.005 MiB
    assert abs(mixed.allocated_bytes - want_mixed.mixed_bytes) <= 0.006 * 2**20 * len(mixed.buffers)

    stock = _server_kv(tools, tiny, tmp_path, "--override-kv", "kvtool.kv.enabled=bool:false")
    assert not stock.mixed and stock.budgets_enabled is False and len(stock.buffers) == 1
    assert abs(stock.allocated_bytes - want_stock.stock_bytes) <= 0.006 * 2**20


def test_parse_kv_log_sums_every_group():
    from toolchain.commands.llama_server import parse_kv_log

    log = ("llama_model_loader: ...\n"
           "kvtool_load_config: kvtool budgets: 45 of 90 KV heads compressed, sink = 16, mixed KV enabled\n"
           "llama_kv_cache_mixed: group 0: window 0, 4096 cells\n"
           "llama_kv_cache: size =   45.00 MiB (  4096 cells,  30 layers,  4/4 seqs), K (f16):   22.50 MiB, V (f16):   "
           "22.50 MiB\n"
           "llama_kv_cache: size =    2.81 MiB (   256 cells,  30 layers,  4/4 seqs), K (f16):    1.41 MiB, V (f16):    "
           "1.41 MiB\n")
    kv = parse_kv_log(log)
    assert kv.mixed and kv.budgets_enabled and (kv.compressed_heads, kv.total_heads) == (45, 90)
    assert [b["cells"] for b in kv.buffers] == [4096, 256] and all(b["seqs"] == 4 for b in kv.buffers)
    assert kv.allocated_bytes == round(47.81 * 2**20)
    assert parse_kv_log("no cache here").allocated_bytes == 0 and parse_kv_log("").budgets_enabled is None


def test_upstream_errors_keep_4xx_and_hide_5xx():
    from toolchain.commands.serve_proxy import upstream_body, upstream_error

    st, body = upstream_error(400, b'{"error": {"code": 400, "message": "exceeds the context", "type": "x"}}')
    assert st == 400 and body["error"]["message"] == "exceeds the context" and body["error"]["type"] == "x"
    st, body = upstream_error(500, b"segfault text")
    assert st == 502 and "llama-server failed" in body["error"]["message"]
    out = upstream_body({"prompt": "a", "max_completion_tokens": 3, "ignore_eos": True}, 512)
    assert out["max_tokens"] == 3 and "max_completion_tokens" not in out and out["ignore_eos"] is True
    assert out["temperature"] == 0.7 and "seed" not in out  # kvtool's defaults, not llama-server's


def _fake_set(d: Path, names=TOOLS, recipe=None) -> None:
    import json

    from toolchain.runtime import tools as rt

    (d / "bin").mkdir(parents=True)
    for n in names:
        (d / "bin" / n).write_text("#!/bin/sh\n")
        (d / "bin" / n).chmod(0o755)
    (d / rt.TOOLS_MARKER).write_text(json.dumps({"recipe": recipe or rt.TOOLS_RECIPE}))


def test_a_complete_cached_set_is_reused_and_a_partial_one_is_not(tmp_path, monkeypatch):
    from helpers_cli import no_subprocess

    from toolchain.runtime import build as rb
    from toolchain.runtime import tools as rt

    monkeypatch.setenv("KVTOOL_CACHE", str(tmp_path))
    d = rt.tools_dir(rb.patch_hash("cpu"))
    _fake_set(d)
    monkeypatch.setattr(subprocess, "run", no_subprocess)
    monkeypatch.setattr(subprocess, "Popen", no_subprocess)
    assert rt.build_tools(echo=lambda m: None)["action"] == "cached"  # no compile, no download
    partial, stale = tmp_path / "p", tmp_path / "s"
    _fake_set(partial, TOOLS[:-1])
    _fake_set(stale, recipe="0")
    assert rt.cached_tools(d) and rt.cached_tools(partial) is None and rt.cached_tools(stale) is None
