"""The model header fields kvtool relies on, read once and validated for every file (with or without budgets).

Why for every file: llama.cpp asserts (aborts the process) on some impossible values, e.g. a block_count of 0,
and Python code that trusts them raises TypeError on a string where a count belongs. Here each field is checked
for type and range, so a bad header is one line naming the key before anything loads it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from toolchain.errors import KvtoolError

from .gguf_header import GGUFHeader

# far beyond any real model; keeps products like n_layer x n_head_kv small
_MAX_LAYERS = 1 << 16
_MAX_HEADS = 1 << 16
_MAX_EMBD = 1 << 24


@dataclass(frozen=True)
class ModelFields:
    arch: str
    n_layer: int
    n_head: tuple[int, ...]
    n_head_kv: tuple[int, ...]
    n_embd: int
    head_dim_k: int
    head_dim_v: int
    n_ctx_train: Optional[int]
    name: Optional[str]
    n_vocab: Optional[int]


def _count(h: GGUFHeader, key: str, v: Any, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise KvtoolError(f"{h.path}: {key} must be an integer, got {type(v).__name__}")
    if not lo <= v <= hi:
        raise KvtoolError(f"{h.path}: {key} is {v}, expected {lo}..{hi}")
    return v


def _per_layer(h: GGUFHeader, key: str, n_layer: int) -> Optional[tuple[int, ...]]:
    """A count per layer: a scalar >= 1 for all layers, or an array (0 marks a layer without attention, as in
    hybrid models, but at least one layer must have heads)."""
    v = h.value(key)
    if v is None:
        return None
    if isinstance(v, list):
        if len(v) != n_layer:
            raise KvtoolError(f"{h.path}: {key} has {len(v)} entries for {n_layer} layers")
        out = tuple(_count(h, key, x, 0, _MAX_HEADS) for x in v)
        if not any(out):
            raise KvtoolError(f"{h.path}: {key} is 0 in every layer")
        return out
    return (_count(h, key, v, 1, _MAX_HEADS),) * n_layer


def model_fields(h: GGUFHeader, dims: bool = True) -> ModelFields:
    """Architecture, layer and head counts, and with ``dims`` the head sizes; KvtoolError naming the key for
    anything unusable. ``dims=False`` is what a mask needs (block_count x head_count_kv)."""
    arch = h.value("general.architecture")
    if arch is None:
        raise KvtoolError(f"{h.path}: GGUF has no general.architecture")
    if not isinstance(arch, str) or not arch or len(arch) > 64:
        raise KvtoolError(f"{h.path}: general.architecture must be a short string, got {str(arch)[:40]!r}")
    if f"{arch}.block_count" not in h.kvs:
        raise KvtoolError(f"{h.path}: unknown architecture {arch!r} (the file has no {arch}.block_count)")
    n_layer = _count(h, f"{arch}.block_count", h.value(f"{arch}.block_count"), 1, _MAX_LAYERS)
    n_head = _per_layer(h, f"{arch}.attention.head_count", n_layer)
    # llama.cpp's default: as many KV heads as query heads
    n_head_kv = _per_layer(h, f"{arch}.attention.head_count_kv", n_layer) or n_head
    if n_head_kv is None:
        raise KvtoolError(f"{h.path}: GGUF has no {arch}.attention.head_count_kv")
    n_embd = dk = dv = 0
    if dims:
        if n_head is None:
            raise KvtoolError(f"{h.path}: GGUF has no {arch}.attention.head_count")
        n_embd = _count(h, f"{arch}.embedding_length", h.value(f"{arch}.embedding_length"), 1, _MAX_EMBD)
        dk = h.value(f"{arch}.attention.key_length")
        dk = n_embd // max(n_head) if dk is None else _count(h, f"{arch}.attention.key_length", dk, 1, _MAX_EMBD)
        if dk < 1:
            raise KvtoolError(f"{h.path}: {arch}.embedding_length {n_embd} is smaller than head_count {max(n_head)}")
        dv = h.value(f"{arch}.attention.value_length")
        dv = dk if dv is None else _count(h, f"{arch}.attention.value_length", dv, 1, _MAX_EMBD)
    ctx = h.value(f"{arch}.context_length")
    ctx = _count(h, f"{arch}.context_length", ctx, 0, 1 << 40) or None if ctx is not None else None
    name = h.value("general.name")
    return ModelFields(arch, n_layer, n_head or n_head_kv, n_head_kv, n_embd, dk, dv, ctx,
                       name if isinstance(name, str) else None, h.array_len("tokenizer.ggml.tokens"))
