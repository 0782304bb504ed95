"""The pinned llama-cpp-python sdist: its name and version, and fetching it once into the cache.

Why a base module: both the runtime build (patches the sdist's vendored llama.cpp) and the HF->GGUF converter (runs
the sdist's own ``convert_hf_to_gguf.py``) need it, and converters must not import the runtime.
"""
from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Callable

from .errors import KvtoolError
from .paths import cache_root

SDIST_PROJECT = "llama-cpp-python"
SDIST_VERSION = "0.3.36"
SDIST_FILE = f"llama_cpp_python-{SDIST_VERSION}.tar.gz"
SDIST_TOP = f"llama_cpp_python-{SDIST_VERSION}"


def fetch_sdist(echo: Callable[[str], None]) -> Path:
    """The pinned sdist, downloaded once into the cache with pip (no binary, no dependencies)."""
    dest = cache_root() / "sdist"
    path = dest / SDIST_FILE
    if path.exists() and tarfile.is_tarfile(path):
        return path
    dest.mkdir(parents=True, exist_ok=True)
    echo(f"[kvtool] downloading {SDIST_PROJECT}=={SDIST_VERSION} sdist")
    # --no-binary for this one project only: ':all:' would also compile cmake from source for the build env.
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-build-isolation",
           "--no-binary", SDIST_PROJECT, f"{SDIST_PROJECT}=={SDIST_VERSION}", "-d", str(dest)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0 or not path.exists():
        last = (res.stderr.strip().splitlines() or ["no output"])[-1]
        raise KvtoolError(f"could not download the {SDIST_PROJECT} sdist: {last}", code=1)
    return path
