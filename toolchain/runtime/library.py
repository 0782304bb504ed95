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


def kv_bytes(ctx) -> tuple[bool, int, int]:
    """(mixed active, full-head bytes, ring bytes) allocated by a llama_context (a ctypes pointer)."""
    f = _fn("kvtool_kv_bytes", ctypes.c_int, [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_size_t)])
    if f is None:
        raise RuntimeNotBuilt()
    full, ring = ctypes.c_size_t(0), ctypes.c_size_t(0)
    rc = f(ctx, ctypes.byref(full), ctypes.byref(ring))
    return rc == 1, int(full.value), int(ring.value)


def model_budgets(model) -> Optional[tuple[list[int], int]]:
    """(layer-major head windows, sink) a llama_model (a ctypes pointer) loaded with, after kv_overrides; None
    when the file has no kvtool budgets."""
    f = _fn("kvtool_model_budgets", ctypes.c_int, [ctypes.c_void_p, ctypes.POINTER(ctypes.c_int32), ctypes.c_int,
                                                   ctypes.POINTER(ctypes.c_uint32)])
    if f is None:
        raise RuntimeNotBuilt()
    n = f(model, None, 0, None)
    if n < 0:
        return None
    buf, sink = (ctypes.c_int32 * max(1, n))(), ctypes.c_uint32(0)
    f(model, buf, n, ctypes.byref(sink))
    return list(buf[:n]), int(sink.value)


def kv_used_cells(ctx) -> tuple[int, int]:
    """Cells in use now: (full-head cache, rings)."""
    f = _fn("kvtool_kv_used_cells", ctypes.c_int, [ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32), ctypes.POINTER(ctypes.c_uint32)])
    if f is None:
        raise RuntimeNotBuilt()
    full, ring = ctypes.c_uint32(0), ctypes.c_uint32(0)
    f(ctx, ctypes.byref(full), ctypes.byref(ring))
    return int(full.value), int(ring.value)


def can_seq_rm(ctx, seq_id: int, p0: int, p1: int = -1) -> bool:
    """Whether ``llama_memory_seq_rm(seq_id, p0, p1)`` would be honoured, asked without changing anything (a mixed
    cache refuses a tail cut its window rings cannot back; llama-server's prompt reuse asks this first)."""
    f = _fn("kvtool_can_seq_rm", ctypes.c_int, [ctypes.c_void_p, ctypes.c_int32, ctypes.c_int32, ctypes.c_int32])
    if f is None:
        raise RuntimeNotBuilt()
    return f(ctx, seq_id, p0, p1) == 1


def kv_groups(ctx) -> list[tuple[int, int]]:
    """[(window, cells)] of the mixed cache's head groups; [] when the context runs a stock cache."""
    n = _fn("kvtool_kv_n_groups", ctypes.c_int, [ctypes.c_void_p])
    info = _fn("kvtool_kv_group_info", ctypes.c_int, [ctypes.c_void_p, ctypes.c_int,
                                                      ctypes.POINTER(ctypes.c_uint32), ctypes.POINTER(ctypes.c_uint32)])
    if n is None or info is None:
        raise RuntimeNotBuilt()
    out = []
    for g in range(n(ctx)):
        w, c = ctypes.c_uint32(0), ctypes.c_uint32(0)
        info(ctx, g, ctypes.byref(w), ctypes.byref(c))
        out.append((int(w.value), int(c.value)))
    return out


def kv_buffers(ctx) -> list[dict]:
    """Where the KV cache lives, from the allocated buffers: [{"group": "full"|"ring", "device": buffer type name
    ("CPU", "CUDA0", "Vulkan0", ...), "bytes": n}]. A stock cache reports its buffers as group "full"."""
    n = _fn("kvtool_kv_n_buffers", ctypes.c_int, [ctypes.c_void_p])
    info = _fn("kvtool_kv_buffer_info", ctypes.c_int, [ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(ctypes.c_int),
                                                       ctypes.POINTER(ctypes.c_char_p), ctypes.POINTER(ctypes.c_size_t)])
    if n is None or info is None:
        raise RuntimeNotBuilt()
    out = []
    for i in range(n(ctx)):
        group, name, size = ctypes.c_int(0), ctypes.c_char_p(), ctypes.c_size_t(0)
        if info(ctx, i, ctypes.byref(group), ctypes.byref(name), ctypes.byref(size)) != 0:
            continue
        out.append({"group": "ring" if group.value == 1 else "full", "device": (name.value or b"?").decode(),
                    "bytes": int(size.value)})
    return out


def devices() -> Optional[list[dict]]:
    """The devices ggml sees, CPU included: [{"name", "description", "type", "free_bytes", "total_bytes"}].
    None when the loaded library predates kvtool_device_info (or is not patched)."""
    n = _fn("kvtool_n_devices", ctypes.c_int, [])
    info = _fn("kvtool_device_info", ctypes.c_int, [ctypes.c_int] + [ctypes.POINTER(ctypes.c_char_p)] * 3
               + [ctypes.POINTER(ctypes.c_size_t)] * 2)
    if n is None or info is None:
        return None
    out = []
    for i in range(n()):
        name, desc, kind = ctypes.c_char_p(), ctypes.c_char_p(), ctypes.c_char_p()
        free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
        if info(i, ctypes.byref(name), ctypes.byref(desc), ctypes.byref(kind), ctypes.byref(free),
                ctypes.byref(total)) != 0:
            continue
        out.append({"name": (name.value or b"").decode(errors="replace"),
                    "description": (desc.value or b"").decode(errors="replace"),
                    "type": (kind.value or b"").decode(), "free_bytes": int(free.value),
                    "total_bytes": int(total.value)})
    return out


def gpu_offload_available() -> bool:
    """True when the loaded runtime has a GPU (or iGPU/RPC) device to offload layers to (llama.cpp's own test)."""
    lib = _lib()
    if lib is None:
        return False
    f = _fn("llama_supports_gpu_offload", ctypes.c_bool, [])
    return bool(f()) if f is not None else False
