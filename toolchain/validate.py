"""Checks on what users hand kvtool: numeric ranges, output paths, text bytes, thread counts.

Why one module: the same rule must hold in every command and in the Python API. A value that would wrap in a
C integer, an output path that is also an input (or a device), or bytes that are not UTF-8 all become one
``KvtoolError`` line before any work starts, never a traceback, a wrapped value or a replaced file.
"""
from __future__ import annotations

import math
import os
import stat
from pathlib import Path
from typing import Any, Iterable, Optional, Union

from .errors import KvtoolError

I32_MAX = 0x7FFFFFFF
U32_MAX = 0xFFFFFFFF
# llama.cpp keeps positions and context sizes in int32/uint32; 2^24 tokens is far beyond any model's training
# context and still leaves room for position arithmetic
N_CTX_MAX = 1 << 24
# ggml's GGML_MAX_N_THREADS
THREADS_MAX = 512

PathLike = Union[str, os.PathLike]


def check_int(name: str, value: Any, lo: Optional[int] = None, hi: Optional[int] = None) -> int:
    """An integer in [lo, hi] (booleans and floats refused), else one line naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            import numpy as np

            ok = isinstance(value, np.integer)
        except ImportError:  # pragma: no cover - numpy is a core dependency
            ok = False
        if not ok:
            raise KvtoolError(f"{name} must be an integer, got {value!r}")
    v = int(value)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise KvtoolError(f"{name} must be {_range(lo, hi)}, got {v}")
    return v


def _range(lo, hi) -> str:
    if hi is None:
        return f">= {lo:g}" if isinstance(lo, float) else f">= {lo}"
    if lo is None:
        return f"<= {hi}"
    return f"in [{lo:g}, {hi:g}]" if isinstance(lo, float) else f"in [{lo}, {hi}]"


def check_float(name: str, value: Any, lo: Optional[float] = None, hi: Optional[float] = None) -> float:
    """A finite number in [lo, hi] (NaN and inf refused)."""
    lo = None if lo is None else float(lo)
    hi = None if hi is None else float(hi)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise KvtoolError(f"{name} must be a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise KvtoolError(f"{name} must be a finite number, got {value!r}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise KvtoolError(f"{name} must be {_range(lo, hi)}, got {v:g}")
    return v


def _stat(p: Path, follow: bool = True) -> Optional[os.stat_result]:
    """os.stat, None when the path does not exist; other failures (too long, no permission) are one line."""
    try:
        return os.stat(p) if follow else os.lstat(p)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        raise KvtoolError(f"{_short(p)}: {e.strerror or e}") from None


def _short(p: Path) -> str:
    s = str(p)
    return s if len(s) <= 200 else s[:96] + "..." + s[-96:]


def check_input_path(path: PathLike, what: str = "input") -> Path:
    """An existing path whose name the system accepts (a too-long name is one line, not an OSError)."""
    p = Path(path).expanduser()
    if _stat(p) is None:
        raise KvtoolError(f"{_short(p)}: no such file or directory")
    return p


def _identities(paths: Iterable[Optional[PathLike]]) -> set:
    """(st_dev, st_ino) of every input file; a directory counts with every file below it."""
    ids = set()
    for x in paths:
        if x is None:
            continue
        p = Path(x).expanduser()
        try:
            st = os.stat(p)
        except OSError:
            continue
        ids.add((st.st_dev, st.st_ino))
        if stat.S_ISDIR(st.st_mode):
            for root, _dirs, files in os.walk(p):
                for f in files:
                    try:
                        s = os.stat(os.path.join(root, f))
                    except OSError:
                        continue
                    ids.add((s.st_dev, s.st_ino))
    return ids


_KINDS = ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"),
          (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory"))


def check_output_path(path: PathLike, inputs: Iterable[Optional[PathLike]] = (), what: str = "output") -> Path:
    """A path kvtool may replace atomically: not an input (compared by inode, through links), not a device, FIFO,
    socket or directory (a rename would replace the device node itself), in an existing directory."""
    p = Path(path).expanduser()
    if not p.name or len(os.fsencode(p.name)) > 255:
        raise KvtoolError(f"{what} {_short(p)}: file name too long or empty")
    st = _stat(p)
    if st is not None:
        for test, kind in _KINDS:
            if test(st.st_mode):
                raise KvtoolError(f"{what} {_short(p)} is {kind}; kvtool writes regular files only")
        if (st.st_dev, st.st_ino) in _identities(inputs):
            raise KvtoolError(f"refusing to overwrite the input {_short(p)}; give another {what} path")
    parent = p.parent
    pst = _stat(parent)
    if pst is None or not stat.S_ISDIR(pst.st_mode):
        raise KvtoolError(f"{what} directory {_short(parent)} does not exist")
    return p


def check_sampling(temperature: Any = 0.0, top_p: Any = 0.95, top_k: Any = 40, min_p: Any = 0.05,
                   repeat_penalty: Any = 1.0, seed: Any = None, max_tokens: Any = None) -> dict:
    """Sampling settings as llama.cpp takes them (floats finite, ints inside their C types), checked before a
    model loads: NaN, inf and values that would wrap are one line, not a silent change of meaning."""
    return dict(temperature=check_float("temperature", temperature, 0.0),
                top_p=check_float("top_p", top_p, 0.0, 1.0), top_k=check_int("top_k", top_k, 0, I32_MAX),
                min_p=check_float("min_p", min_p, 0.0, 1.0),
                repeat_penalty=check_float("repeat_penalty", repeat_penalty, 0.0),
                seed=None if seed is None else check_int("seed", seed, 0, U32_MAX),
                max_tokens=None if max_tokens is None else check_int("max_tokens", max_tokens, None, I32_MAX))


_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1000, "kib": 1 << 10, "m": 1 << 20, "mb": 1000**2, "mib": 1 << 20,
          "g": 1 << 30, "gb": 1000**3, "gib": 1 << 30, "t": 1 << 40, "tb": 1000**4, "tib": 1 << 40}


def parse_size(text: Any) -> int:
    """A memory size: bytes as an int, or text such as 2GiB, 512MiB, 1.5GB (GiB/MiB binary, GB/MB decimal)."""
    import re

    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise KvtoolError(f"a memory size must be >= 0 bytes, got {text}")
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text) if isinstance(text, str) else None
    if not m or m.group(2).lower() not in _UNITS:
        raise KvtoolError(f"cannot read memory size {text!r} (examples: 2GiB, 512MiB, 1.5GB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def decode_text(data: bytes, where: str) -> str:
    """UTF-8 text, or one line saying where the first bad byte is."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise KvtoolError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def max_threads() -> int:
    """Threads this process can start for llama.cpp: ggml's limit, 8 per CPU it may run on (more only wait on
    each other), and the room left under RLIMIT_NPROC when one is set."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    cap = min(THREADS_MAX, 8 * max(1, cpus))
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_NPROC)
        if soft != resource.RLIM_INFINITY and soft > 0:
            cap = min(cap, max(1, soft // 2))
    except (ImportError, ValueError, OSError):
        pass
    return max(1, cap)


def cap_threads(n: Optional[int], echo=None) -> Optional[int]:
    """``n`` checked (>= 1) and capped at ``max_threads()``; the cap is said in one line through ``echo``."""
    if n is None:
        return None
    n = check_int("threads", n, 1)
    cap = max_threads()
    if n > cap:
        if echo is not None:
            echo(f"kvtool: note: {n} threads is more than this machine can start usefully; using {cap}")
        return cap
    return n
