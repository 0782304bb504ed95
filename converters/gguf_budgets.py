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
    K_HEADS_WINDOW,
    K_METHOD,
    K_PER_LAYER,
    K_SCORES,
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
    from .gguf_fields import model_fields

    f = model_fields(h, dims=False)
    counts = f.n_head_kv
    if len(set(counts)) != 1:
        raise KvtoolError(f"{h.path}: head_count_kv differs across layers ({sorted(set(counts))}); "
                          f"kvtool masks need the same number of KV heads in every layer")
    return ModelShape(f.arch, f.n_layer, counts[0], f.name, f.n_vocab)


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
    scores: Optional[list[list[float]]] = None  # kvtool.heads.scores [layer][kv head], for load-time re-derivation
    per_layer: bool = False  # kvtool.heads.per_layer
    heads_window: Optional[int] = None  # kvtool.heads.window: W of heads compressed by a re-derived mask


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
        for i, w in enumerate(hw):
            if not 0 <= w <= _I32_MAX:
                where = f"layer {i // shape.n_head_kv} head {i % shape.n_head_kv}"
                why = "a negative window (0 = full head)" if w < 0 else f"larger than {_I32_MAX}, the runtime's limit"
                raise KvtoolError(f"{path}: {K_HEAD_WINDOW}: the window of {where} is {w}: {why}")
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
    tok, interval = beacon_keys(h)
    scores, per_layer, heads_window = _score_keys(h, kv, get, head_window)
    return Budgets(enabled, sink, head_window, method, None if sparsity is None else float(sparsity), tok, interval,
                   scores, per_layer, heads_window)


def _score_keys(h: GGUFHeader, kv: dict, get, head_window) -> tuple[Optional[list[list[float]]], bool, Optional[int]]:
    """kvtool.heads.scores (f32 or f64 array, L x H, finite), .per_layer (bool) and .window (u32 >= 1)."""
    per_layer = bool(get(K_PER_LAYER, (T_BOOL,), "bool") or False)
    win = get(K_HEADS_WINDOW, _INT_TYPES, "u32")
    if win is not None and not 1 <= win <= _I32_MAX:
        raise KvtoolError(f"{h.path}: {K_HEADS_WINDOW} must be in [1, {_I32_MAX}], got {win}")
    if K_SCORES not in kv:
        return None, per_layer, win
    span = kv[K_SCORES]
    if span.type != T_ARR or span.sub not in (T_F32, T_F64):
        raise KvtoolError(f"{h.path}: {K_SCORES} has the wrong type (expected an f32 array)")
    if head_window is None:
        raise KvtoolError(f"{h.path}: {K_SCORES} without {K_HEAD_WINDOW}")
    L, H = len(head_window), len(head_window[0])
    flat = [float(x) for x in h.value(K_SCORES)]
    if len(flat) != L * H:
        raise KvtoolError(f"{h.path}: {K_SCORES} has {len(flat)} entries, expected {L}x{H} = {L * H}")
    for i, x in enumerate(flat):
        if x != x or x in (float("inf"), float("-inf")):
            raise KvtoolError(f"{h.path}: {K_SCORES}: the score of layer {i // H} head {i % H} is not finite")
    return [flat[i * H:(i + 1) * H] for i in range(L)], per_layer, win


def beacon_keys(h: GGUFHeader) -> tuple[Optional[int], Optional[int]]:
    """(token_id, interval) of a file's ``kvtool.beacon.*`` keys, (None, None) without them. The one validator
    that ``inspect``, ``generate`` and ``convert`` (on its input and its output) all use: both keys or none,
    interval in [1, 2^32), token id inside the file's vocabulary."""
    path = h.path
    vals = {}
    for key in (K_BEACON_TOKEN, K_BEACON_INTERVAL):
        s = h.kvs.get(key)
        if s is not None and s.type not in _INT_TYPES:
            raise KvtoolError(f"{path}: {key} has the wrong type (expected u32)")
        vals[key] = None if s is None else h.value(key)
    tok, interval = vals[K_BEACON_TOKEN], vals[K_BEACON_INTERVAL]
    if (tok is None) != (interval is None):
        raise KvtoolError(f"{path}: {K_BEACON_TOKEN} and {K_BEACON_INTERVAL} must be given together")
    if tok is None:
        return None, None
    check_beacon(tok, interval, h.array_len("tokenizer.ggml.tokens"), f"{path}: ")
    return int(tok), int(interval)


def check_beacon(token_id: int, interval: int, n_vocab: Optional[int], where: str = "") -> None:
    if not 1 <= interval <= 0xFFFFFFFF:
        raise KvtoolError(f"{where}beacon interval must be >= 1 and < 2^32, got {interval}")
    if not 0 <= token_id <= 0xFFFFFFFF:
        raise KvtoolError(f"{where}beacon token id must be >= 0, got {token_id}")
    if n_vocab is not None and token_id >= n_vocab:
        raise KvtoolError(f"{where}beacon token id {token_id} is outside the model's vocabulary of {n_vocab}")


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


def rewrite_gguf(src: str | os.PathLike, dst: str | os.PathLike, set_keys: dict[str, Value],
                 drop: Callable[[str], bool] = lambda k: False, fsync: bool = False) -> Path:
    """Copy ``src`` to ``dst`` with ``set_keys`` added (replacing same-named keys) and keys where ``drop`` is true
    removed. Tensor infos and data are copied byte for byte. Atomic: ``dst`` appears complete or not at all, and
    an interrupted write (Ctrl-C, SIGTERM, SIGHUP) leaves no temp file (``toolchain.atomic``)."""
    from toolchain.atomic import atomic_output
    from toolchain.validate import check_output_path

    src, dst = Path(src), Path(dst)
    check_output_path(dst, [src])
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
        n_pad = (-len(head)) % h.alignment
        data_offset, data_len, src_size = h.data_offset, max(0, h.file_size - h.data_offset), h.file_size

    with atomic_output(dst, default_file_mode()) as fd:
        with open(src, "rb") as fin:
            if os.fstat(fin.fileno()).st_size != src_size:
                raise KvtoolError(f"{src} changed while converting")
            _write_all(fd, bytes(head))
            zeros = bytes(min(n_pad, _COPY_CHUNK))
            while n_pad > 0:  # padding in chunks: a large general.alignment must not allocate it at once
                _write_all(fd, zeros[:min(n_pad, len(zeros))])
                n_pad -= min(n_pad, len(zeros))
            _copy_range(fin.fileno(), fd, data_offset, data_len)
        if fsync:
            os.fsync(fd)
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
    if mask.scores is not None:
        keys.update(score_keys(mask))
    if mask.sink > _I32_MAX or mask.window > _I32_MAX:
        raise KvtoolError(f"sink and window must be <= {_I32_MAX} (the runtime's limit)")
    if (beacon_token is None) != (beacon_interval is None):
        raise KvtoolError("--beacon-token and --beacon-interval go together")
    if beacon_token is not None:
        check_beacon(beacon_token, beacon_interval, None)
        keys[K_BEACON_TOKEN] = Value(T_U32, int(beacon_token))
        keys[K_BEACON_INTERVAL] = Value(T_U32, int(beacon_interval))
    return keys


def score_keys(mask: HeadsMask) -> dict[str, Value]:
    """The mask's scores (clipped to [0, 1]), rule and window, so the runtime can rebuild the mask at any sparsity. f32 as the format
    says, unless rounding to f32 would turn two different scores into a tie: the rule breaks ties by (layer, head),
    so a new tie could change which heads a sparsity compresses; those scores are stored as f64 instead."""
    import numpy as np

    a = np.clip(np.asarray(mask.scores, dtype=np.float64), 0.0, 1.0).ravel()  # the rule clips first anyway
    b = a.astype(np.float32).astype(np.float64)
    order = np.argsort(a, kind="stable")
    keeps_order = bool(np.all((np.diff(a[order]) == 0) | (np.diff(b[order]) > 0)))
    scores = Value(T_ARR, (b if keeps_order else a).tolist(), T_F32 if keeps_order else T_F64)
    return {K_SCORES: scores, K_PER_LAYER: Value(T_BOOL, bool(mask.per_layer)),
            K_HEADS_WINDOW: Value(T_U32, int(mask.window))}


def apply_mask(src: str | os.PathLike, dst: str | os.PathLike, mask: HeadsMask,
               beacon_token: Optional[int] = None, beacon_interval: Optional[int] = None,
               enabled: bool = True, fsync: bool = False) -> Path:
    """Write ``dst`` = ``src`` + the mask's kvtool keys. Earlier budget keys are replaced; earlier beacon keys are
    kept unless new ones are given (beacons belong to the trained weights, the mask to this conversion)."""
    new_beacon = beacon_token is not None
    from .gguf_fields import model_fields

    with open_gguf(src) as h:
        shape = model_shape(h)
        model_fields(h)  # the fields a runtime needs: never write a file that inspect would refuse
        if not new_beacon:
            beacon_keys(h)  # beacon keys carried over from the input must be valid ones
    if (mask.n_layer, mask.n_head_kv) != (shape.n_layer, shape.n_head_kv):
        raise shape_error((mask.n_layer, mask.n_head_kv), (shape.n_layer, shape.n_head_kv))
    if new_beacon:
        check_beacon(beacon_token, beacon_interval if beacon_interval is not None else 1, shape.n_vocab)
    keys = budget_keys(mask, beacon_token, beacon_interval, enabled)

    def drop(k: str) -> bool:
        if not k.startswith(PREFIX):
            return False
        return new_beacon or not k.startswith(BEACON_PREFIX)

    return rewrite_gguf(src, dst, keys, drop, fsync=fsync)


def tensor_spans(path: str | os.PathLike) -> list[tuple[str, int, int]]:
    """(name, absolute offset, n_bytes) per tensor."""
    with open_gguf(path) as h:
        return [(t.name, t.data_offset, t.n_bytes) for t in h.tensors]
