"""Read and write the ``kvtool.*`` keys of a GGUF without touching its tensors (docs/architecture.md §2).

Why a raw streaming copy rather than ``gguf.GGUFWriter``: the writer re-lays tensor offsets and writes tensors
with ``ndarray.tofile``; fed from a memmap, that faults every page of the input into this process (RSS ≈ file
size). Here ``gguf_header.GGUFHeader`` only parses the header (an mmap; header pages only); the output is

    header (new KV count) | kept KV pairs, byte for byte | new kvtool KV pairs | tensor infos, byte for byte |
    padding to the file's alignment | the input's data section, copied by the kernel (copy_file_range)

Tensor offsets in a GGUF are relative to the data section, so the infos stay valid unchanged and every tensor's
bytes are identical by construction. The output appears only by ``os.replace`` of a finished temp file.
"""
from __future__ import annotations

import errno
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from toolchain.errors import KvtoolError
from toolchain.gguf_keys import (
    BEACON_PREFIX,
    K_BEACON_INTERVAL,
    K_BEACON_TOKEN,
    K_ENABLED,
    K_HEAD_WINDOW,
    K_METHOD,
    K_SINK,
    K_SPARSITY,
    K_VERSION,
    KVTOOL_VERSION,
    PREFIX,
)
from toolchain.heads import HeadsMask, default_file_mode, shape_error

from .gguf_header import SCALAR_FMT as _SCALAR_FMT
from .gguf_header import (
    T_ARR,
    T_BOOL,
    T_F32,
    T_F64,
    T_I8,
    T_I16,
    T_I32,
    T_I64,
    T_STR,
    T_U8,
    T_U16,
    T_U32,
    T_U64,
    GGUFHeader,
)

_COPY_CHUNK = 8 << 20


@dataclass(frozen=True)
class Value:
    """A typed GGUF value to write. ``sub`` is the element type of an array."""

    type: int
    value: Any
    sub: Optional[int] = None


# --- reading ----------------------------------------------------------------------------------------------------
def open_gguf(path: str | os.PathLike) -> GGUFHeader:
    """The parsed header; every way a file can be bad is one KvtoolError line."""
    return GGUFHeader(path)


def read_kvs(path: str | os.PathLike, prefix: str = "") -> dict[str, Any]:
    with open_gguf(path) as h:
        return {k: h.value(k) for k in h.kvs if k.startswith(prefix)}


def read_kvtool_keys(path: str | os.PathLike) -> dict[str, Any]:
    """All ``kvtool.*`` keys as Python values (lists for arrays)."""
    return read_kvs(path, PREFIX)


@dataclass(frozen=True)
class ModelShape:
    arch: str
    n_layer: int
    n_head_kv: int
    name: Optional[str] = None
    n_vocab: Optional[int] = None


def model_shape(h: GGUFHeader) -> ModelShape:
    """block_count x head_count_kv (uniform across layers, which is what heads.json can express)."""
    path = h.path
    arch = h.value("general.architecture")
    if not isinstance(arch, str):
        raise KvtoolError(f"{path}: GGUF has no general.architecture")
    n_layer = h.value(f"{arch}.block_count")
    if not isinstance(n_layer, int) or n_layer < 1:
        raise KvtoolError(f"{path}: GGUF has no valid {arch}.block_count")
    v = h.value(f"{arch}.attention.head_count_kv")
    if v is None:  # llama.cpp's default: as many KV heads as query heads
        v = h.value(f"{arch}.attention.head_count")
    if v is None:
        raise KvtoolError(f"{path}: GGUF has no {arch}.attention.head_count_kv")
    counts = [int(x) for x in v] if isinstance(v, list) else [int(v)] * n_layer
    if len(counts) != n_layer:
        raise KvtoolError(f"{path}: {arch}.attention.head_count_kv has {len(counts)} entries for {n_layer} layers")
    if len(set(counts)) != 1 or counts[0] < 1:
        raise KvtoolError(f"{path}: head_count_kv differs across layers ({sorted(set(counts))}); "
                          f"kvtool masks need the same number of KV heads in every layer")
    return ModelShape(arch, n_layer, counts[0], h.value("general.name"), h.array_len("tokenizer.ggml.tokens"))


@dataclass(frozen=True)
class Budgets:
    """The kvtool keys of a file, validated by the same rules as the runtime (cpp/kvtool-config.cpp)."""

    enabled: bool
    sink: int
    head_window: Optional[list[list[int]]]  # [layer][kv head], 0 = full; None when the file has no budgets
    method: Optional[str]
    sparsity: Optional[float]
    beacon_token_id: Optional[int]
    beacon_interval: Optional[int]


_INT_TYPES = (T_U8, T_I8, T_U16, T_I16, T_U32, T_I32, T_U64, T_I64)
_I32_MAX = 0x7FFFFFFF


def read_budgets(path: str | os.PathLike) -> Optional[Budgets]:
    """None when the file has no kvtool keys; KvtoolError naming the key when the runtime would refuse them."""
    with open_gguf(path) as h:
        return _budgets(h)


def _budgets(h: GGUFHeader) -> Optional[Budgets]:
    path = h.path
    kv = {k: s for k, s in h.kvs.items() if k.startswith(PREFIX)}
    if not kv:
        return None

    def get(key: str, types: tuple, what: str):
        s = kv.get(key)
        if s is None:
            return None
        if s.type not in types:
            raise KvtoolError(f"{path}: {key} has the wrong type (expected {what})")
        return h.value(key)

    ver = get(K_VERSION, _INT_TYPES, "u32")
    if ver is not None and ver != KVTOOL_VERSION:
        raise KvtoolError(f"{path}: {K_VERSION} is {ver}, this kvtool reads {KVTOOL_VERSION}")
    head_window = None
    if K_HEAD_WINDOW in kv:
        span = kv[K_HEAD_WINDOW]
        if span.type != T_ARR or span.sub not in (T_I32, T_U32):
            raise KvtoolError(f"{path}: {K_HEAD_WINDOW} has the wrong type (expected an i32 array)")
        shape = model_shape(h)
        hw = h.value(K_HEAD_WINDOW)
        if len(hw) != shape.n_layer * shape.n_head_kv:
            raise KvtoolError(f"{path}: {K_HEAD_WINDOW} has {len(hw)} entries, expected "
                              f"{shape.n_layer}x{shape.n_head_kv} = {shape.n_layer * shape.n_head_kv}")
        if any(not 0 <= w <= _I32_MAX for w in hw):
            raise KvtoolError(f"{path}: {K_HEAD_WINDOW} has a negative window (0 = full head)")
        H = shape.n_head_kv
        head_window = [list(hw[i * H:(i + 1) * H]) for i in range(shape.n_layer)]
    enabled = get(K_ENABLED, (T_BOOL,), "bool")
    enabled = head_window is not None if enabled is None else bool(enabled)
    if enabled and head_window is None:
        raise KvtoolError(f"{path}: {K_HEAD_WINDOW} is missing (required when {K_ENABLED} is true)")
    sink = get(K_SINK, _INT_TYPES, "u32")
    sink = 0 if sink is None else int(sink)
    if not 0 <= sink <= _I32_MAX:
        raise KvtoolError(f"{path}: {K_SINK} must be a non-negative u32, got {sink}")
    method = get(K_METHOD, (T_STR,), "string")
    sparsity = get(K_SPARSITY, (T_F32, T_F64), "f32")
    tok = get(K_BEACON_TOKEN, _INT_TYPES, "u32")
    interval = get(K_BEACON_INTERVAL, _INT_TYPES, "u32")
    if (tok is None) != (interval is None):
        raise KvtoolError(f"{path}: {K_BEACON_TOKEN} and {K_BEACON_INTERVAL} must be given together")
    if interval is not None and interval < 1:
        raise KvtoolError(f"{path}: {K_BEACON_INTERVAL} must be >= 1")
    if tok is not None and tok < 0:
        raise KvtoolError(f"{path}: {K_BEACON_TOKEN} must be >= 0")
    return Budgets(enabled, sink, head_window, method, None if sparsity is None else float(sparsity), tok, interval)


# --- writing ----------------------------------------------------------------------------------------------------
def _pack_str(s: str, e: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack(e + "Q", len(b)) + b


def _pack_value(v: Value, e: str) -> bytes:
    out = struct.pack(e + "I", v.type)
    if v.type == T_STR:
        return out + _pack_str(v.value, e)
    if v.type == T_ARR:
        items = list(v.value)
        out += struct.pack(e + "IQ", v.sub, len(items))
        if v.sub == T_STR:
            return out + b"".join(_pack_str(x, e) for x in items)
        return out + struct.pack(e + _SCALAR_FMT[v.sub] * len(items), *items)
    return out + struct.pack(e + _SCALAR_FMT[v.type], v.value)


def pack_kv(key: str, v: Value, big_endian: bool = False) -> bytes:
    e = ">" if big_endian else "<"
    return _pack_str(key, e) + _pack_value(v, e)


def _write_all(fd: int, data) -> None:
    mv = memoryview(data)
    while mv:
        mv = mv[os.write(fd, mv):]


def _copy_range(src_fd: int, dst_fd: int, offset: int, count: int) -> None:
    """Copy count bytes from src at offset to dst's position, in the kernel when it can (no page cache in our RSS)."""
    os.lseek(src_fd, offset, os.SEEK_SET)
    left = count
    use_cfr = hasattr(os, "copy_file_range")
    buf = None
    while left > 0:
        n = 0
        if use_cfr:
            try:
                n = os.copy_file_range(src_fd, dst_fd, min(left, 1 << 30))
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM):
                    raise
                use_cfr = False
                continue
        else:  # portable path: one reused buffer, so RSS stays flat
            if buf is None:
                buf = memoryview(bytearray(_COPY_CHUNK))
            n = os.readv(src_fd, [buf[:min(left, _COPY_CHUNK)]])
            _write_all(dst_fd, buf[:n])
        if n == 0:
            raise KvtoolError("input GGUF ended early while copying tensor data (truncated?)")
        left -= n


def _same_file(a: Path, b: Path) -> bool:
    try:
        return b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def rewrite_gguf(src: str | os.PathLike, dst: str | os.PathLike, set_keys: dict[str, Value],
                 drop: Callable[[str], bool] = lambda k: False, fsync: bool = False) -> Path:
    """Copy ``src`` to ``dst`` with ``set_keys`` added (replacing same-named keys) and keys where ``drop`` is true
    removed. Tensor infos and data are copied byte for byte. Atomic: ``dst`` appears complete or not at all."""
    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve() or _same_file(src, dst):
        raise KvtoolError(f"refusing to overwrite the input {src}; give another output path")
    if dst.is_dir():
        raise KvtoolError(f"output {dst} is a directory")
    if not dst.parent.is_dir():
        raise KvtoolError(f"output directory {dst.parent} does not exist")
    with open_gguf(src) as h:
        e = ">" if h.big_endian else "<"
        kept = [kv for k, kv in h.kvs.items() if k not in set_keys and not drop(k)]
        head = bytearray(h.raw(0, 16))  # magic, version, n_tensors as in the source
        head += struct.pack(e + "Q", len(kept) + len(set_keys))
        for kv in kept:
            head += h.raw(kv.start, kv.end)
        for k, v in set_keys.items():
            head += pack_kv(k, v, h.big_endian)
        head += h.raw(h.kv_end, h.ti_end)  # tensor infos: offsets are relative to the data section
        head += b"\0" * ((-len(head)) % h.alignment)
        data_offset, data_len, src_size = h.data_offset, h.file_size - h.data_offset, h.file_size

    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    except OSError as ex:
        raise KvtoolError(f"cannot write to {dst.parent}: {ex.strerror}") from None
    try:
        with open(src, "rb") as fin:
            if os.fstat(fin.fileno()).st_size != src_size:
                raise KvtoolError(f"{src} changed while converting")
            _write_all(fd, bytes(head))
            _copy_range(fin.fileno(), fd, data_offset, data_len)
        if fsync:
            os.fsync(fd)
        os.close(fd)
        fd = -1
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, dst)
    except BaseException as ex:
        if fd >= 0:
            os.close(fd)
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(ex, OSError):
            raise KvtoolError(f"writing {dst} failed: {ex.strerror or ex}") from None
        raise
    return dst


def budget_keys(mask: HeadsMask, beacon_token: Optional[int] = None, beacon_interval: Optional[int] = None,
                enabled: bool = True) -> dict[str, Value]:
    """The kvtool keys for a mask (and optional beacon), typed as docs/architecture.md §2 fixes them."""
    mask.validate()
    keys = {
        K_VERSION: Value(T_U32, KVTOOL_VERSION),
        K_ENABLED: Value(T_BOOL, bool(enabled)),
        K_SINK: Value(T_U32, mask.sink),
        K_HEAD_WINDOW: Value(T_ARR, mask.head_window(), T_I32),
        K_METHOD: Value(T_STR, mask.method),
        K_SPARSITY: Value(T_F32, float(mask.sparsity)),
    }
    if mask.sink > _I32_MAX or mask.window > _I32_MAX:
        raise KvtoolError(f"sink and window must be <= {_I32_MAX} (the runtime's limit)")
    if (beacon_token is None) != (beacon_interval is None):
        raise KvtoolError("--beacon-token and --beacon-interval go together")
    if beacon_token is not None:
        if not 0 <= beacon_token <= 0xFFFFFFFF:
            raise KvtoolError(f"beacon token id must be >= 0, got {beacon_token}")
        if not 1 <= beacon_interval <= 0xFFFFFFFF:
            raise KvtoolError(f"beacon interval must be >= 1, got {beacon_interval}")
        keys[K_BEACON_TOKEN] = Value(T_U32, int(beacon_token))
        keys[K_BEACON_INTERVAL] = Value(T_U32, int(beacon_interval))
    return keys


def apply_mask(src: str | os.PathLike, dst: str | os.PathLike, mask: HeadsMask,
               beacon_token: Optional[int] = None, beacon_interval: Optional[int] = None,
               enabled: bool = True, fsync: bool = False) -> Path:
    """Write ``dst`` = ``src`` + the mask's kvtool keys. Earlier budget keys are replaced; earlier beacon keys are
    kept unless new ones are given (beacons belong to the trained weights, the mask to this conversion)."""
    with open_gguf(src) as h:
        shape = model_shape(h)
    if (mask.n_layer, mask.n_head_kv) != (shape.n_layer, shape.n_head_kv):
        raise shape_error((mask.n_layer, mask.n_head_kv), (shape.n_layer, shape.n_head_kv))
    if beacon_token is not None and shape.n_vocab is not None and beacon_token >= shape.n_vocab:
        raise KvtoolError(f"beacon token id {beacon_token} is outside the model's vocabulary of {shape.n_vocab}")
    keys = budget_keys(mask, beacon_token, beacon_interval, enabled)
    new_beacon = beacon_token is not None

    def drop(k: str) -> bool:
        if not k.startswith(PREFIX):
            return False
        return new_beacon or not k.startswith(BEACON_PREFIX)

    return rewrite_gguf(src, dst, keys, drop, fsync=fsync)


def tensor_spans(path: str | os.PathLike) -> list[tuple[str, int, int]]:
    """(name, absolute offset, n_bytes) per tensor."""
    with open_gguf(path) as h:
        return [(t.name, t.data_offset, t.n_bytes) for t in h.tensors]
