"""llama.cpp's own programs (llama-server, llama-bench, ...) built from the patched tree (issue 18).

Why this shape:
- A llama.cpp user already drives ``llama-server`` and ``llama-bench``. Built from the same patched source tree as the
  runtime wheel, with the same backend flags, they read a kvtool GGUF's budgets at load and get the mixed cache with
  no extra flags; ``--override-kv kvtool.kv.enabled=bool:false`` gives the stock cache on the same file.
- A separate CMake build dir (``build/tools-<key>``) with static libraries: the wheel's build dir is scikit-build's
  and stays as it is, and static binaries can be cached and moved without an rpath to one venv's ``libllama.so``.
- The binaries are cached beside the wheels, in ``tools/<patch hash>-<backend key>/``. They compile from their own
  patched source tree (``src/tools-<key>``) under their own lock (``build-tools-<key>.lock``): a cold tools build
  takes many minutes, and holding the wheel's lock (and its shared tree) that long would stall every other
  ``kvtool build-runtime`` on the machine.
- The sdist carries the server web UI's sources but not its built assets (``tools/ui/dist``), and building them needs
  npm and the network. The server is built with ``LLAMA_BUILD_UI=OFF`` and no prebuilt download: the HTTP API is
  complete, the browser page is absent. HTTPS (OpenSSL) and curl are off: the server binds loopback and nothing is
  downloaded.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional

from ..errors import KvtoolError
from ..paths import cache_root
from ..sdist import SDIST_TOP, fetch_sdist
from . import build as rb
from . import cuda

TOOLS = ("llama-server", "llama-cli", "llama-bench", "llama-perplexity", "llama-batched-bench")
TOOLS_MARKER = "kvtool_tools.json"
# Bump when the CMake options below change what the binaries are.
TOOLS_RECIPE = "1"
TOOLS_CMAKE_ARGS = [
    "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_BUILD_COMMON=ON", "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_CURL=OFF",
]


def tools_dir(phash: str, backend: str = "cpu", portable: bool = False, cuda_arch: Optional[str] = None) -> Path:
    return cache_root() / "tools" / f"{phash}-{rb.wheel_key(backend, portable, cuda_arch)}"


def cached_tools(d: Path) -> Optional[dict]:
    """The marker of a complete cached tool set in ``d``, else None (absent, partial or from another recipe)."""
    try:
        marker = json.loads((d / TOOLS_MARKER).read_text())
    except (OSError, ValueError):
        return None
    if marker.get("recipe") != TOOLS_RECIPE:
        return None
    if not all(os.access(d / "bin" / t, os.X_OK) for t in TOOLS):
        return None
    return marker


def _configure_args(tree: Path, build_dir: Path, backend: str, portable: bool, phash: str,
                    extra: list[str]) -> list[str]:
    args = ["cmake", "-S", str(tree / "vendor" / "llama.cpp"), "-B", str(build_dir)]
    if shutil.which("ninja"):
        args += ["-G", "Ninja"]
    args += [*TOOLS_CMAKE_ARGS, *rb.COMMON_CMAKE_ARGS, *rb.BACKEND_CMAKE_ARGS[backend], *extra,
             f"-DKVTOOL_PATCH_HASH={phash}", f"-DKVTOOL_BACKEND={backend}"]
    if portable:
        args.append("-DGGML_NATIVE=OFF")
    user = os.environ.get("CMAKE_ARGS")
    if user:
        args += user.split()
    return args


def _run_logged(cmd: list[str], log, env: dict) -> int:
    log.write("$ " + " ".join(cmd) + "\n")
    log.flush()
    return subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode


def _compile(tree: Path, backend: str, portable: bool, jobs: int, phash: str, extra: list[str], out_bin: Path,
             echo: rb.Echo) -> float:
    key = rb.build_key(backend, portable)
    build_dir = cache_root() / "build" / f"tools-{key}"
    logs = cache_root() / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"tools-{phash}-{key}.log"
    env = dict(os.environ)
    env.pop("CMAKE_ARGS", None)  # passed explicitly above
    echo(f"[kvtool] compiling {', '.join(TOOLS)} ({backend}, {jobs} jobs; cold: see docs/running.md); "
         f"log: {log_path}")
    t0 = time.time()
    with open(log_path, "w") as log:
        rc = _run_logged(_configure_args(tree, build_dir, backend, portable, phash, extra), log, env)
        if rc == 0:
            rc = _run_logged(["cmake", "--build", str(build_dir), "-j", str(jobs), "--target", *TOOLS], log, env)
    if rc != 0:
        for ln in log_path.read_text().splitlines()[-15:]:
            echo("    " + ln)
        raise KvtoolError(f"tools build failed (exit {rc}); full log: {log_path}", code=1)
    out_bin.mkdir(parents=True, exist_ok=True)
    for t in TOOLS:
        src = build_dir / "bin" / t
        if not src.is_file():
            raise KvtoolError(f"tools build produced no {t}; full log: {log_path}", code=1)
        shutil.copy2(src, out_bin / t)
    return time.time() - t0


def _prepare_tree(sdist: Path, phash: str, backend: str, portable: bool, echo: rb.Echo,
                  cuda_arch: Optional[str]) -> Path:
    """The patched tree for the tools, synced so unchanged files keep their mtimes (incremental rebuilds)."""
    tree = cache_root() / "src" / ("tools-" + rb.build_key(backend, portable)) / SDIST_TOP
    staging = Path(tempfile.mkdtemp(prefix="staging-tools-", dir=cache_root()))
    try:
        echo("[kvtool] extracting sdist and applying the patches (tools tree)")
        project = rb.patched_project(sdist, staging, phash, backend, portable, cuda_arch)
        tree.mkdir(parents=True, exist_ok=True)
        n = rb.sync_tree(project, tree)
        echo(f"[kvtool] tools source tree ready ({n} files changed): {tree}")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return tree


def build_tools(backend: str = "cpu", portable: bool = False, jobs: Optional[int] = None,
                sdist: Optional[str] = None, rebuild: bool = False, echo: rb.Echo = print,
                cuda_arch: Optional[str] = None) -> dict:
    """Build (or reuse) the patched tools for this checkout's patch hash; returns what was done."""
    cuda_arch = rb.check_backend_args(backend, cuda_arch)
    sdist_path = rb.check_sdist(Path(sdist)) if sdist else None
    phash = rb.patch_hash(backend)
    dst = tools_dir(phash, backend, portable, cuda_arch)
    with rb.build_lock("tools-" + rb.build_key(backend, portable), echo):
        if not rebuild and cached_tools(dst):
            echo(f"[kvtool] tools are cached: {dst}")
            return {"action": "cached", "patch_hash": phash, "dir": str(dst), "seconds": 0.0}
        rb.ensure_build_requirements(echo)
        extra = cuda.cmake_args(cuda_arch, echo) if backend == "cuda" else []
        sdist_path = sdist_path or fetch_sdist(echo)
        tree = _prepare_tree(sdist_path, phash, backend, portable, echo, cuda_arch)
        dst.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{dst.name}-", dir=dst.parent))
        try:
            secs = _compile(tree, backend, portable, jobs or os.cpu_count() or 1, phash, extra, staging / "bin",
                            echo)
            marker = {"patch_hash": phash, "backend": backend, "portable": portable, "cuda_arch": cuda_arch,
                      "recipe": TOOLS_RECIPE, "tools": list(TOOLS), "web_ui": False, "compile_seconds": round(secs)}
            (staging / TOOLS_MARKER).write_text(json.dumps(marker, indent=1) + "\n")
            if dst.exists():
                shutil.rmtree(dst)
            os.replace(staging, dst)  # the whole set appears at once, never half of it
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    echo(f"[kvtool] tools built in {secs:.0f} s: {dst}")
    return {"action": "built", "patch_hash": phash, "dir": str(dst), "seconds": secs}


def current_key() -> tuple[str, str, bool, Optional[str]]:
    """(patch hash, backend, portable, cuda_arch) of the installed runtime, so the tools match the libllama this venv
    loads; this checkout's CPU hash when no patched runtime is installed."""
    inst = rb.installed_build()
    if inst and inst.get("patch_hash"):
        return inst["patch_hash"], inst.get("backend", "cpu"), bool(inst.get("portable")), inst.get("cuda_arch")
    return rb.patch_hash("cpu"), "cpu", False, None


def tool_paths() -> dict[str, Path]:
    """Name -> path of the cached tools matching the installed runtime; a one-line error when not built."""
    phash, backend, portable, arch = current_key()
    d = tools_dir(phash, backend, portable, arch)
    if cached_tools(d) is None:
        flag = f" --backend {backend}" if backend != "cpu" else ""
        raise KvtoolError(f"llama.cpp tools for patch hash {phash} ({backend}) are not built: run "
                          f"`kvtool build-runtime --tools{flag}` (or `make tools`)")
    return {t: d / "bin" / t for t in TOOLS}


def tool_path(name: str) -> Path:
    short = name if name.startswith("llama-") else f"llama-{name}"
    if short not in TOOLS:
        raise KvtoolError(f"unknown tool {name!r} (choose from {', '.join(TOOLS)})")
    return tool_paths()[short]
