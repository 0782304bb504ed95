"""Hand-made GGUF headers for bad-input tests: any key, any type, nested arrays, odd alignments, no tensors."""
from __future__ import annotations

import struct
from pathlib import Path
from typing import Iterable, Optional

from converters.gguf_budgets import Value, pack_kv
from converters.gguf_header import T_ARR, T_I32, T_STR, T_U32, T_U64

MAGIC = b"GGUF"


def header(kvs: Iterable[bytes], n_tensors: int = 0, version: int = 3) -> bytes:
    kvs = list(kvs)
    return MAGIC + struct.pack("<IQQ", version, n_tensors, len(kvs)) + b"".join(kvs)


def kv(key: str, v: Value) -> bytes:
    return pack_kv(key, v)


def nested_array_kv(key: str, depth: int) -> bytes:
    """key = [[[...[1]...]]] nested ``depth`` arrays deep."""
    k = key.encode()
    body = struct.pack("<Q", len(k)) + k + struct.pack("<I", T_ARR)
    for _ in range(depth - 1):
        body += struct.pack("<IQ", T_ARR, 1)
    return body + struct.pack("<IQi", T_I32, 1, 1)


def model_kvs(arch: Optional[str] = "llama", n_layer=2, n_head=4, n_head_kv=2, n_embd=64, extra=()) -> list:
    """Header fields of a small llama-like model (no tensors); each may be replaced or dropped (None)."""
    out = []
    if arch is not None:
        out.append(kv("general.architecture", Value(T_STR, arch)))
    a = arch or "llama"
    for name, val in ((f"{a}.block_count", n_layer), (f"{a}.attention.head_count", n_head),
                      (f"{a}.attention.head_count_kv", n_head_kv), (f"{a}.embedding_length", n_embd)):
        if val is None:
            continue
        if isinstance(val, Value):
            out.append(kv(name, val))
        else:
            out.append(kv(name, Value(T_U32, val)))
    return out + list(extra)


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def alignment_kv(align: int) -> bytes:
    return kv("general.alignment", Value(T_U64 if align > 0xFFFFFFFF else T_U32, align))
