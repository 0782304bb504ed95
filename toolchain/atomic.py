"""Atomic outputs: a locked temp file beside the destination, renamed into place only when complete.

Why the lock and the sweep: SIGKILL (or a power cut) cannot be caught, so a multi-GB temp file can outlive its
writer. Each writer holds ``flock`` on its temp file while it writes. The next writer to the same directory
removes temp files of kvtool's naming pattern that are older than its own process and whose lock it can take
(their writer is gone). A live writer's file is never touched. SIGTERM and SIGHUP are turned into an exception
(``Terminated``) so the same cleanup that runs on Ctrl-C runs for them too.
"""
from __future__ import annotations

import contextlib
import os
import re
import signal
import tempfile
import time
from pathlib import Path
from typing import Iterator, Union

from .errors import KvtoolError

SUFFIX = ".kvtool.tmp"
# .<name, at most 64 chars>.<mkstemp's 8 random chars>.kvtool.tmp
_PATTERN = re.compile(r"^\..{1,64}\.[A-Za-z0-9_]{8}" + re.escape(SUFFIX) + r"$", re.S)
_PROCESS_START = time.time()

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no locks, no sweep
    fcntl = None


class Terminated(BaseException):
    """SIGTERM/SIGHUP arrived: unwinds like KeyboardInterrupt so temp files are removed."""

    def __init__(self, signum: int):
        super().__init__(f"terminated by {signal.Signals(signum).name}")
        self.signum = signum


def _raise_terminated(signum, frame):
    raise Terminated(signum)


def install_termination_handlers() -> None:
    """SIGTERM/SIGHUP raise ``Terminated`` in the main thread (the CLI calls this once at start)."""
    for name in ("SIGTERM", "SIGHUP"):
        sig = getattr(signal, name, None)
        if sig is None:
            continue
        try:
            if signal.getsignal(sig) in (signal.SIG_DFL, None):
                signal.signal(sig, _raise_terminated)
        except (ValueError, OSError):  # not the main thread
            pass


def temp_prefix(dst: Path) -> str:
    return f".{dst.name[:64]}."


def sweep_stale(directory: Union[str, os.PathLike]) -> list[Path]:
    """Remove kvtool temp files in ``directory`` left by writers that died (older than this process, unlocked)."""
    removed: list[Path] = []
    if fcntl is None:
        return removed
    d = Path(directory)
    try:
        entries = list(os.scandir(d))
    except OSError:
        return removed
    for e in entries:
        if not _PATTERN.match(e.name):
            continue
        try:
            st = e.stat(follow_symlinks=False)
            if not e.is_file(follow_symlinks=False) or st.st_mtime >= _PROCESS_START or st.st_uid != os.getuid():
                continue
            fd = os.open(e.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # its writer is alive
            os.unlink(e.path)
            removed.append(Path(e.path))
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed


@contextlib.contextmanager
def atomic_output(dst: Union[str, os.PathLike], mode: int) -> Iterator[int]:
    """Yields the fd of a locked temp file next to ``dst``; on success it gets ``mode`` and replaces ``dst``.

    On any exception (including ``KeyboardInterrupt`` and ``Terminated``) the temp file is removed and the
    exception propagates; an OSError becomes one KvtoolError line.
    """
    dst = Path(dst)
    sweep_stale(dst.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(dst), suffix=SUFFIX, dir=dst.parent)
    except OSError as ex:
        raise KvtoolError(f"cannot write to {dst.parent}: {ex.strerror or ex}") from None
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
        os.fchmod(fd, mode)
        os.replace(tmp, dst)
    except BaseException as ex:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(ex, OSError):
            raise KvtoolError(f"writing {dst} failed: {ex.strerror or ex}") from None
        raise
    finally:
        try:  # after the rename: the lock covers the whole write, and close cannot lose written data
            os.close(fd)
        except OSError:
            pass


def write_all(fd: int, data) -> None:
    mv = memoryview(data)
    while mv:
        mv = mv[os.write(fd, mv):]
