"""ggml's own ``test-backend-ops``, compiled against the *installed* runtime's libggml.

Why not the CMake target: building it there recompiles ggml and every backend a second time (a long compile for
Vulkan on 2 cores). The test is one C++ file that needs only ggml's public headers, and linking it to the wheel's
own libggml/libggml-base means it checks exactly the kernels kvtool ships. kvtool's patches do not touch ggml (the
Vulkan series only guards a header-version difference in instance creation), so the sdist's copy of the file and
headers is the right one.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

from toolchain.paths import cache_root
from toolchain.sdist import SDIST_TOP, SDIST_VERSION, fetch_sdist

MEMBERS = ("vendor/llama.cpp/tests/test-backend-ops.cpp", "vendor/llama.cpp/ggml/include/")


def _llama_cpp_sources(out_dir: Path, echo) -> Path:
    """A vendor/llama.cpp directory holding tests/test-backend-ops.cpp and ggml/include: $KVTOOL_LLAMA_CPP_SRC
    (bench/gpu_check.sh, offline), else the two members extracted once from the cached sdist."""
    env = os.environ.get("KVTOOL_LLAMA_CPP_SRC")
    if env:
        return Path(env)
    src_dir = out_dir / f"src-{SDIST_VERSION}"
    llama_dir = src_dir / "vendor" / "llama.cpp"
    if (llama_dir / "tests" / "test-backend-ops.cpp").is_file():
        return llama_dir
    sdist = fetch_sdist(echo)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f"src-{SDIST_VERSION}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    with tarfile.open(sdist) as tf:
        picked = [m for m in tf.getmembers() if any(m.name.startswith(f"{SDIST_TOP}/{p}") for p in MEMBERS)]
        tf.extractall(tmp, members=picked)
    shutil.rmtree(src_dir, ignore_errors=True)
    os.replace(tmp / SDIST_TOP, src_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    return llama_dir


def installed_lib_dir() -> Path:
    spec = importlib.util.find_spec("llama_cpp")
    assert spec and spec.submodule_search_locations, "llama_cpp is not installed"
    return Path(list(spec.submodule_search_locations)[0]) / "lib"


def build_test_backend_ops(echo=print) -> Path:
    """Compile once per (runtime libs, sdist) into the kvtool cache; returns the binary."""
    lib = installed_lib_dir()
    libs = sorted(lib.glob("libggml*.so"))
    assert libs, f"no libggml in {lib}"
    key = hashlib.sha256(b"".join(p.name.encode() + str(p.stat().st_size).encode() + str(p.stat().st_mtime_ns).encode()
                                  for p in libs) + SDIST_VERSION.encode()).hexdigest()[:12]
    out_dir = cache_root() / "tools"
    exe = out_dir / f"test-backend-ops-{key}"
    if exe.is_file():
        return exe
    out_dir.mkdir(parents=True, exist_ok=True)
    llama_dir = _llama_cpp_sources(out_dir, echo)
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    assert cxx, "no C++ compiler"
    partial = exe.with_name(exe.name + ".tmp")
    cmd = [cxx, "-O2", "-std=c++17", "-pthread", f"-I{llama_dir / 'ggml/include'}",
           str(llama_dir / "tests/test-backend-ops.cpp"), "-o", str(partial), f"-L{lib}", "-lggml", "-lggml-base",
           f"-Wl,-rpath,{lib}"]
    echo("[test] compiling test-backend-ops against " + str(lib))
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    os.replace(partial, exe)
    return exe

