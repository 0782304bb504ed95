"""The loaded libllama: is it our patched build, and its kvtool C API (cpp/kvtool.h) through ctypes.

Why ctypes on llama-cpp-python's own handle: kvtool must talk to the very library the ``Llama`` objects use,
and llama-cpp-python already loaded it (with the right RPATH for ggml backends).
"""
from __future__ import annotations

import ctypes
import functools
from typing import Optional

from ..errors import RuntimeNotBuilt


@functools.lru_cache(maxsize=1)
def _lib() -> Optional[ctypes.CDLL]:
    try:
        import llama_cpp.llama_cpp as lc
    except Exception:  # not installed or the shared library failed to load
        return None
    return lc._lib


def _fn(name: str, restype, argtypes):
    lib = _lib()
    if lib is None:
        return None
    try:
        f = getattr(lib, name)
    except AttributeError:
        return None
    f.restype, f.argtypes = restype, argtypes
    return f


def runtime_info() -> dict:
    """What doctor reports about the runtime. ``runtime_patched`` is true only if the symbols exist."""
    info = {"llama_cpp_python": None, "runtime_patched": False, "runtime_version": None,
            "patch_hash": None, "backend": None}
    try:
        import llama_cpp
        info["llama_cpp_python"] = llama_cpp.__version__
    except Exception:
        return info
    ver = _fn("kvtool_runtime_version", ctypes.c_int, [])
    if ver is None:
        return info
    info["runtime_patched"] = True
    info["runtime_version"] = int(ver())
    info["patch_hash"] = _fn("kvtool_patch_hash", ctypes.c_char_p, [])().decode()
    info["backend"] = _fn("kvtool_backend", ctypes.c_char_p, [])().decode()
    return info


def require_patched() -> ctypes.CDLL:
    """Every command that needs the mixed cache calls this first."""
    if _fn("kvtool_runtime_version", ctypes.c_int, []) is None:
        raise RuntimeNotBuilt()
    return _lib()
