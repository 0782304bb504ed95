"""The embedding examples run as a user would run them: python_embed.py, openai_client.py, and the C program
built with CMake against the patched libllama of the installed runtime (its KV bytes must equal Python's)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers_runtime import write_windows

pytestmark = pytest.mark.usefixtures("patched_runtime")

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


@pytest.fixture(scope="module")
def masked(smollm2, tmp_path_factory):
    return write_windows(smollm2, tmp_path_factory.mktemp("ex") / "smol-w64.gguf", [[0, 64, 64]] * 30, 16)


def test_python_embed(masked):
    res = subprocess.run([sys.executable, str(EXAMPLES / "python_embed.py"), str(masked)], capture_output=True,
                         text=True, timeout=300, cwd="/")  # cwd elsewhere: uses the installed package
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert len(lines) >= 3 and lines[0].strip()
    m = re.search(r"KV cache: ([\d.]+) MiB allocated \(mixed=True\), a full cache would take ([\d.]+) MiB", res.stdout)
    assert m and float(m.group(1)) < float(m.group(2)), res.stdout
    assert re.search(r"\d+ tokens at [\d.]+ tok/s", res.stdout)


def test_openai_client(masked, tmp_path):
    pytest.importorskip("openai")
    pytest.importorskip("fastapi")
    from helpers_serve import start_server, stop_server

    proc, base = start_server(masked, tmp_path / "serve.log", "--n-ctx", 1024)
    try:
        res = subprocess.run([sys.executable, str(EXAMPLES / "openai_client.py"), base, "--max-tokens", "8"],
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr
        assert re.search(r"^reply: \S", res.stdout, re.M), res.stdout
        assert re.search(r"^usage: \d+ prompt \+ \d+ completion tokens", res.stdout, re.M)
        assert re.search(r"^streamed: \S", res.stdout, re.M)
        # the base URL may come from the environment instead
        env = dict(os.environ, KVTOOL_BASE_URL=base)
        res = subprocess.run([sys.executable, str(EXAMPLES / "openai_client.py"), "--max-tokens", "2"],
                             capture_output=True, text=True, timeout=300, env=env)
        assert res.returncode == 0, res.stderr
    finally:
        stop_server(proc)


def _llama_tree() -> Path:
    from toolchain.paths import cache_root
    from toolchain.sdist import SDIST_TOP

    for tree in sorted((cache_root() / "src").glob(f"*/{SDIST_TOP}/vendor/llama.cpp")):
        if (tree / "include" / "kvtool.h").is_file():
            return tree
    pytest.skip("no patched llama.cpp source tree under the kvtool cache (headers for the C example)")


@pytest.fixture(scope="module")
def c_embed(tmp_path_factory) -> Path:
    """examples/c_embed configured and built with CMake, as its CMakeLists.txt header says."""
    import llama_cpp

    if shutil.which("cmake") is None or shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("needs cmake and a C compiler")
    tree = _llama_tree()
    lib = Path(llama_cpp.__file__).parent / "lib"
    build = tmp_path_factory.mktemp("c_embed") / "build"
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    cfg = subprocess.run(["cmake", "-S", str(EXAMPLES / "c_embed"), "-B", str(build), *gen,
                          f"-DLLAMA_LIB_DIR={lib}", f"-DLLAMA_INCLUDE_DIR={tree / 'include'}",
                          f"-DGGML_INCLUDE_DIR={tree / 'ggml' / 'include'}"], capture_output=True, text=True)
    assert cfg.returncode == 0, cfg.stdout + cfg.stderr
    b = subprocess.run(["cmake", "--build", str(build)], capture_output=True, text=True)
    assert b.returncode == 0, b.stdout + b.stderr
    return build / "c_embed"


def test_c_embed_reports_the_same_kv_bytes_as_python(c_embed, masked):
    res = subprocess.run([str(c_embed), str(masked), "The capital of France is", "1024"], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    m = re.search(r"mixed=(\d) full_bytes=(\d+) ring_bytes=(\d+)", res.stdout)
    assert m, res.stdout
    assert m.group(1) == "1"
    assert "group 1 window=64" in res.stdout

    from toolchain import Model

    with Model.load(masked, n_ctx=1024) as py:  # same file, same n_ctx; FA on by default in both
        kv = py.kv_stats()
    assert (int(m.group(2)), int(m.group(3))) == (kv["full_bytes"], kv["ring_bytes"])
    assert int(m.group(2)) + int(m.group(3)) < kv["stock_bytes"]


def test_c_embed_on_a_file_without_budgets_runs_a_stock_cache(c_embed, smollm2):
    res = subprocess.run([str(c_embed), str(smollm2), "Hello", "1024"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    m = re.search(r"mixed=(\d) full_bytes=(\d+) ring_bytes=(\d+)", res.stdout)
    assert m and m.group(1) == "0" and m.group(3) == "0" and int(m.group(2)) > 0, res.stdout


def test_c_embed_override_kv_sparsity_equals_a_converted_file(c_embed, smollm2, tmp_path):
    """A C app passes llama.cpp's --override-kv form; the runtime rebuilds the mask from the stored scores, so the
    one file at s=0.75 allocates, masks and generates exactly as the file converted at 0.75."""
    from converters.gguf_budgets import apply_mask
    from toolchain.heads import random_mask

    mask = random_mask(30, 3, 0.5, seed=0)
    one = apply_mask(smollm2, tmp_path / "one.gguf", mask)
    conv = apply_mask(smollm2, tmp_path / "s75.gguf", mask.with_sparsity(0.75))
    run = lambda *a: subprocess.run([str(c_embed), *map(str, a)], capture_output=True, text=True,  # noqa: E731
                                    timeout=300)
    ref = run(conv, "The capital of France is", 1024)
    got = run(one, "The capital of France is", 1024, "--override-kv", "kvtool.kv.sparsity=float:0.75")
    assert ref.returncode == 0 and got.returncode == 0, ref.stderr + got.stderr
    want = ",".join(str(w) for w in mask.with_sparsity(0.75).head_window())
    assert f"budgets sink=16 windows={want}" in got.stdout
    assert got.stdout.replace(str(one), "") == ref.stdout.replace(str(conv), "")
    bad = run(one, "x", 256, "--override-kv", "kvtool.kv.sparsity=float:2")
    assert bad.returncode == 1 and "kvtool.kv.sparsity: must be in [0, 1], got 2" in bad.stderr
