"""The CUDA recipe for ``kvtool build-runtime --backend cuda``: toolkit, cuBLAS and the arch list.

Why this shape (issue 15): a build machine may have nvcc but no cuBLAS and no driver. PyPI's ``nvidia-cublas``
wheel carries cuBLAS, but putting a whole ``nvidia/cu13/include`` on nvcc's include path can mix newer CUDA headers
with an older nvcc (``__cudaLaunch`` macro mismatch). So we expose *only* the ``cublas*.h`` headers and the
``libcublas*`` libraries from a small directory of our own, hand CMake the libraries by full path, and let it find
the rest of the toolkit from ``CUDAToolkit_ROOT``. ``-DGGML_CUDA_NO_VMM=ON`` (in build.py) keeps libcuda out of the
link, so nothing here needs a GPU.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Callable, Optional

from ..errors import KvtoolError
from ..paths import cache_root

# Turing (75: T4, RTX 20xx), Ampere laptop/desktop (86), Jetson Orin (87), Ada (89: RTX 40xx), Hopper (90).
DEFAULT_ARCHS = "75;86;87;89;90"
CUBLAS_PROJECT = "nvidia-cublas"

Echo = Callable[[str], None]


def parse_archs(spec: str) -> list[str]:
    """``75;86`` or ``75,86`` -> ['75', '86']; ``native`` stays as is (CMake picks the GPU of the machine)."""
    items = [a.strip() for a in re.split(r"[;,]", spec) if a.strip()]
    if items == ["native"]:
        return items
    if not items or not all(re.fullmatch(r"\d{2,3}[af]?(-real|-virtual)?", a) for a in items):
        raise KvtoolError(f"bad --cuda-arch {spec!r}: give compute capabilities like 75;86;89 or 'native'")
    return items


def toolkit_root() -> Path:
    """The CUDA toolkit: $CUDAToolkit_ROOT, $CUDA_HOME, $CUDA_PATH, /usr/local/cuda, or nvcc's own directory.
    A wrapper script on the PATH (``exec /usr/local/cuda-13.0/bin/nvcc``) is followed through its exec line."""
    cands = [os.environ.get(v) for v in ("CUDAToolkit_ROOT", "CUDA_HOME", "CUDA_PATH")] + ["/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = Path(nvcc).resolve()
        cands.append(str(real.parent.parent))
        try:
            m = re.search(r"exec\s+(\S+/bin/nvcc)\b", real.read_text(errors="ignore")[:4096])
        except OSError:
            m = None
        if m:
            cands.append(str(Path(m.group(1)).resolve().parent.parent))
    for c in cands:
        if c and (Path(c) / "bin" / "nvcc").is_file() and (Path(c) / "include" / "cuda_runtime.h").is_file():
            return Path(c).resolve()
    raise KvtoolError("CUDA toolkit not found: put nvcc on the PATH or set CUDA_HOME", code=1)


def nvcc_major(root: Path) -> int:
    res = subprocess.run([str(root / "bin" / "nvcc"), "--version"], capture_output=True, text=True)
    m = re.search(r"release (\d+)\.", res.stdout)
    if res.returncode != 0 or not m:
        raise KvtoolError(f"could not read the CUDA version from {root / 'bin' / 'nvcc'} --version", code=1)
    return int(m.group(1))


def _toolkit_cublas(root: Path) -> Optional[tuple[Path, Path]]:
    """(include dir, lib dir) when the toolkit already has cuBLAS."""
    for lib in (root / "lib64", root / "lib", *sorted((root / "targets").glob("*/lib"))):
        if (lib / "libcublas.so").exists() and (root / "include" / "cublas_v2.h").is_file():
            return root / "include", lib
    return None


def cublas_dirs(root: Path, echo: Echo) -> tuple[Path, Path, bool]:
    """(include dir, lib dir, from_pypi). Without cuBLAS in the toolkit, the ``nvidia-cublas`` wheel of the same
    major version is downloaded once and only its cublas headers and libraries are unpacked into the cache."""
    have = _toolkit_cublas(root)
    if have:
        return have[0], have[1], False
    major = nvcc_major(root)
    base = cache_root() / "cuda" / f"cublas-cu{major}"
    inc, lib = base / "include", base / "lib"
    if (inc / "cublas_v2.h").is_file() and (lib / "libcublas.so").exists() and (lib / "libcublasLt.so").exists():
        return inc, lib, True
    dl = cache_root() / "cuda" / "downloads"
    dl.mkdir(parents=True, exist_ok=True)
    req = f"{CUBLAS_PROJECT}>={major},<{major + 1}"
    echo(f"[kvtool] the CUDA toolkit has no cuBLAS: downloading {req} (once, ~450 MB)")
    res = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                          "-d", str(dl), req], capture_output=True, text=True)
    wheels = sorted(dl.glob("nvidia_cublas-*.whl"))
    wheels = [w for w in wheels if re.match(rf"nvidia_cublas-{major}\.", w.name)]
    if res.returncode != 0 or not wheels:
        last = (res.stderr.strip().splitlines() or ["no output"])[-1]
        raise KvtoolError(f"could not download {req}: {last}", code=1)
    tmp = base.with_name(base.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "include").mkdir(parents=True)
    (tmp / "lib").mkdir()
    with zipfile.ZipFile(wheels[-1]) as zf:
        for name in zf.namelist():
            leaf = name.rsplit("/", 1)[-1]
            if "/include/" in name and leaf.startswith("cublas") and leaf.endswith(".h"):
                (tmp / "include" / leaf).write_bytes(zf.read(name))
            elif "/lib/" in name and re.fullmatch(r"libcublas(Lt)?\.so\.\d+", leaf):
                (tmp / "lib" / leaf).write_bytes(zf.read(name))
    for stem in ("libcublas", "libcublasLt"):
        versioned = sorted((tmp / "lib").glob(f"{stem}.so.*"))
        if not versioned:
            shutil.rmtree(tmp, ignore_errors=True)
            raise KvtoolError(f"{wheels[-1].name} has no {stem}.so", code=1)
        os.symlink(versioned[-1].name, tmp / "lib" / f"{stem}.so")
    shutil.rmtree(base, ignore_errors=True)
    os.replace(tmp, base)
    return inc, lib, True


def cmake_args(archs: str, echo: Echo) -> list[str]:
    """CMake arguments for the CUDA build (no spaces inside one argument: CMAKE_ARGS is split on whitespace)."""
    root = toolkit_root()
    inc, lib, _ = cublas_dirs(root, echo)
    echo(f"[kvtool] CUDA toolkit {root}, cuBLAS from {lib}, archs {archs}")
    return [f"-DCUDAToolkit_ROOT={root}", f"-DCMAKE_CUDA_COMPILER={root / 'bin' / 'nvcc'}",
            f"-DCMAKE_CUDA_ARCHITECTURES={archs}",
            f"-DCUDA_cublas_LIBRARY={lib / 'libcublas.so'}", f"-DCUDA_cublasLt_LIBRARY={lib / 'libcublasLt.so'}",
            f"-DCMAKE_CUDA_FLAGS=-I{inc}"]
