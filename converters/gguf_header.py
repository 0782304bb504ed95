"""A fast, bounds-checked scan of a GGUF header: where each KV pair and tensor info lies, and values on demand.

Why not ``gguf.GGUFReader``: it builds numpy views for every part of every field, so a tokenizer with 49k strings
(SmolLM2) takes ~2 s to open and Llama-3's 128k tokens + 280k merges several times that, while the whole point of
a metadata-only convert is to finish in seconds. This scan walks the header with ``struct`` over an ``mmap`` (only
header pages are touched), records byte spans, and decodes just the values asked for. ``gguf.GGUFReader`` stays the
independent oracle in the tests.
"""
from __future__ import annotations

import mmap
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from toolchain.errors import KvtoolError
from toolchain.validate import check_input_path

# GGUF value type ids (same numbering as gguf.GGUFValueType).
T_U8, T_I8, T_U16, T_I16, T_U32, T_I32, T_F32, T_BOOL, T_STR, T_ARR, T_U64, T_I64, T_F64 = range(13)
SCALAR_FMT = {T_U8: "B", T_I8: "b", T_U16: "H", T_I16: "h", T_U32: "I", T_I32: "i", T_F32: "f",
              T_BOOL: "?", T_U64: "Q", T_I64: "q", T_F64: "d"}
HEADER_LEN = 24  # magic, version u32, n_tensors u64, n_kv u64
DEFAULT_ALIGNMENT = 32
# the GGUF spec stores general.alignment as u32 (ggml reads it so)
MAX_ALIGNMENT = 1 << 31
# ggml's gguf reader takes no arrays of arrays at all; one level is allowed here, deeper is a damaged file
# (and must not recurse 5000 frames deep)
MAX_ARRAY_DEPTH = 2


class _Truncated(Exception):
    pass


class _TooDeep(Exception):
    pass


@dataclass(frozen=True)
class KVSpan:
    key: str
    type: int           # value type; for arrays T_ARR
    sub: Optional[int]  # element type for arrays
    start: int          # first byte of the pair (the key length)
    value_start: int    # first byte after the type id
    end: int            # one past the last byte


@dataclass(frozen=True)
class TensorSpan:
    name: str
    dims: tuple[int, ...]
    ggml_type: int
    rel_offset: int     # offset inside the data section, as stored
    n_bytes: int
    data_offset: int    # absolute offset in the file


class GGUFHeader:
    """Parsed layout of one GGUF file. Raises KvtoolError (one line) for anything that is not a sound GGUF."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        p = self.path
        self._mm = None
        check_input_path(p)  # a missing path or a name the system refuses (too long) is one line
        if p.is_dir():
            raise KvtoolError(f"{p} is a directory, not a GGUF file")
        try:
            with open(p, "rb") as f:
                if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                    raise KvtoolError(f"{p}: not a regular file")
                self.file_size = os.fstat(f.fileno()).st_size
                magic = f.read(4)
                if magic != b"GGUF":
                    raise KvtoolError(f"{p}: not a GGUF file (magic {magic!r})")
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as e:
            raise KvtoolError(f"{p}: cannot read ({e.strerror or e})") from None
        try:
            self._parse()
        except _Truncated:
            raise KvtoolError(f"{p}: truncated GGUF (header ends past the end of the file)") from None
        except _TooDeep:
            raise KvtoolError(f"{p}: damaged GGUF header (arrays nested deeper than {MAX_ARRAY_DEPTH} levels)") from None
        except (UnicodeDecodeError, ValueError, OverflowError) as e:
            raise KvtoolError(f"{p}: damaged GGUF header ({e.__class__.__name__})") from None

    def close(self) -> None:
        if self._mm is not None:
            self._mm.close()
            self._mm = None

    def __enter__(self) -> "GGUFHeader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- low-level reads ------------------------------------------------------------------------------------
    def _need(self, off: int, n: int) -> None:
        if n < 0 or off + n > self.file_size:
            raise _Truncated

    def _unpack(self, fmt: str, off: int) -> tuple:
        s = struct.Struct(self.e + fmt)
        self._need(off, s.size)
        return s.unpack_from(self._mm, off)

    def _str(self, off: int) -> tuple[str, int]:
        (n,) = self._unpack("Q", off)
        self._need(off + 8, n)
        return bytes(self._mm[off + 8:off + 8 + n]).decode("utf-8"), off + 8 + n

    def _skip_value(self, t: int, off: int, depth: int = 0) -> int:
        if t in SCALAR_FMT:
            n = struct.calcsize(SCALAR_FMT[t])
            self._need(off, n)
            return off + n
        if t == T_STR:
            (n,) = self._unpack("Q", off)
            self._need(off + 8, n)
            return off + 8 + n
        if t == T_ARR:
            sub, count = self._unpack("IQ", off)
            off += 12
            if sub in SCALAR_FMT:
                n = struct.calcsize(SCALAR_FMT[sub]) * count
                self._need(off, n)
                return off + n
            if sub == T_STR:
                q = struct.Struct(self.e + "Q")
                mm, size = self._mm, self.file_size
                for _ in range(count):  # the hot loop for tokenizer vocabularies
                    if off + 8 > size:
                        raise _Truncated
                    off += 8 + q.unpack_from(mm, off)[0]
                if off > size:
                    raise _Truncated
                return off
            if sub == T_ARR:
                if depth + 1 >= MAX_ARRAY_DEPTH:
                    raise _TooDeep
                for _ in range(count):
                    off = self._skip_value(T_ARR, off, depth + 1)
                return off
        raise ValueError(f"unknown GGUF value type {t}")

    # --- structure ------------------------------------------------------------------------------------------
    def _parse(self) -> None:
        self._need(0, HEADER_LEN)
        (v,) = struct.unpack_from("<I", self._mm, 4)
        self.e = "<"
        if v & 0xFFFF == 0:  # written on the other byte order
            self.e = ">"
            (v,) = struct.unpack_from(">I", self._mm, 4)
        self.big_endian = self.e == ">"
        if v not in (2, 3):
            raise KvtoolError(f"{self.path}: GGUF version {v} is not supported (2 or 3)")
        self.version = v
        self.n_tensors, n_kv = self._unpack("QQ", 8)
        if n_kv > self.file_size or self.n_tensors > self.file_size:
            raise KvtoolError(f"{self.path}: damaged GGUF header (counts larger than the file)")
        off = HEADER_LEN
        self.kvs: dict[str, KVSpan] = {}
        for _ in range(n_kv):
            start = off
            key, off = self._str(off)
            (t,) = self._unpack("I", off)
            off += 4
            sub = self._unpack("I", off)[0] if t == T_ARR else None
            end = self._skip_value(t, off)
            if key in self.kvs:
                raise KvtoolError(f"{self.path}: duplicate key {key}")
            self.kvs[key] = KVSpan(key, t, sub, start, off, end)
            off = end
        self.kv_end = off
        align = self.value("general.alignment", DEFAULT_ALIGNMENT)
        if isinstance(align, bool) or not isinstance(align, int) or align <= 0 or align & (align - 1) \
                or align > MAX_ALIGNMENT:
            raise KvtoolError(f"{self.path}: general.alignment must be a power of two <= 2^31, got {align!r}")
        self.alignment = align
        infos = []
        for _ in range(self.n_tensors):
            name, off = self._str(off)
            (nd,) = self._unpack("I", off)
            if nd > 8:
                raise KvtoolError(f"{self.path}: damaged tensor info for {name} ({nd} dims)")
            dims = self._unpack("Q" * nd, off + 4)
            ggml_type, rel = self._unpack("IQ", off + 4 + 8 * nd)
            off += 4 + 8 * nd + 12
            infos.append((name, dims, ggml_type, rel))
        self.ti_end = off
        self.data_offset = off + (-off) % self.alignment
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        self.tensors: list[TensorSpan] = []
        for name, dims, ggml_type, rel in infos:
            try:
                block, tsize = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
            except (ValueError, KeyError):
                raise KvtoolError(f"{self.path}: tensor {name} has unknown ggml type {ggml_type}") from None
            n_el = 1
            for d in dims:
                n_el *= d
            nb = n_el // block * tsize
            t = TensorSpan(name, tuple(dims), ggml_type, rel, nb, self.data_offset + rel)
            if t.data_offset + nb > self.file_size:
                raise KvtoolError(f"{self.path}: truncated GGUF (tensor {name} ends past the end of the file)")
            self.tensors.append(t)

    # --- values ---------------------------------------------------------------------------------------------
    def raw(self, start: int, end: int) -> bytes:
        return bytes(self._mm[start:end])

    def value(self, key: str, default: Any = None) -> Any:
        """Decoded value: int/float/bool/str, or a list for arrays."""
        kv = self.kvs.get(key)
        if kv is None:
            return default
        try:
            return self._decode(kv.type, kv.value_start)[0]
        except UnicodeDecodeError:  # found by make fuzz: values are only decoded on demand
            raise KvtoolError(f"{self.path}: {key[:80]} holds a string that is not UTF-8") from None
        except (_Truncated, ValueError, struct.error):
            raise KvtoolError(f"{self.path}: damaged value of {key[:80]}") from None

    def array_len(self, key: str) -> Optional[int]:
        kv = self.kvs.get(key)
        if kv is None or kv.type != T_ARR:
            return None
        return self._unpack("IQ", kv.value_start)[1]

    def _decode(self, t: int, off: int) -> tuple[Any, int]:
        if t in SCALAR_FMT:
            fmt = SCALAR_FMT[t]
            return self._unpack(fmt, off)[0], off + struct.calcsize(fmt)
        if t == T_STR:
            return self._str(off)
        if t == T_ARR:
            sub, count = self._unpack("IQ", off)
            off += 12
            if sub in SCALAR_FMT:
                fmt = SCALAR_FMT[sub]
                vals = list(self._unpack(fmt * count, off))
                return vals, off + struct.calcsize(fmt) * count
            out = []
            for _ in range(count):
                v, off = self._decode(sub, off)
                out.append(v)
            return out, off
        raise ValueError(f"unknown GGUF value type {t}")
