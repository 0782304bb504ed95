"""Predicted KV-cache bytes, full vs mixed: the formula the runtime allocates by (docs/memory.md).

Why a Python copy of the allocation rule: `inspect` and `plan` must answer "what fits on my laptop" without loading
the model, and tests check that the runtime's measured bytes (kvtool_kv_bytes) equal this prediction exactly.

Rule (llama.cpp 0c1e570 + kvtool), per cache of `cells` cells and `streams` streams:
  bytes = streams * cells * sum over its layers of (row(type_k, d_k * h_l) + row(type_v, dv_l))
  dv_l  = d_v * h_l with flash attention; without it V is stored transposed and every layer is padded to the
          largest d_v * h_l of that cache (llama.cpp's [TAG_V_CACHE_VARIABLE]): mixed masks lose V savings then.
  full cache cells = n_ctx_seq (n_ctx padded to 256; divided by n_seq when not unified, padded again)
  ring of window W: min(n_ctx_seq, pad256(min(n_ctx_seq, (W + S) * (n_seq if unified else 1) + n_ubatch)))
A window >= n_ctx_seq is a full head. Heads with equal windows share one ring.
Sliding-window hybrids (gemma2/3, gpt-oss, cohere2): stock is llama_kv_cache_iswa, a base cache of the global layers
(n_ctx_seq cells) plus an SWA cache of the sliding layers, pad256(min(n_ctx_seq, n_swa * (n_seq if unified else 1)
+ n_ubatch)) cells, or n_ctx_seq with swa_full. Mixed keeps that SWA cache as it is (its "native" group, counted
with the rings) and applies the budgets to the global layers only; budgets on sliding layers are ignored.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from ..errors import KvtoolError
from ..gguf_keys import CACHE_TYPES, cache_type


def pad(x: int, n: int) -> int:
    return (x + n - 1) // n * n


def row_bytes(cache_type: str, n: int) -> int:
    blck, size = CACHE_TYPES[cache_type][1:]
    if n % blck:
        raise KvtoolError(f"cache type {cache_type} needs rows that are a multiple of {blck} values, got {n}")
    return n // blck * size


@dataclass(frozen=True)
class ModelDims:
    """What the KV cache depends on: per-layer KV head counts and head sizes."""

    arch: str
    n_layer: int
    n_head_kv: tuple[int, ...]
    head_dim_k: int
    head_dim_v: int
    n_ctx_train: Optional[int] = None
    n_swa: int = 0                          # window of the sliding layers, 0 when the model has none
    is_swa: Optional[tuple[bool, ...]] = None  # per layer (None: no sliding layers)

    def swa_layer(self, il: int) -> bool:
        return bool(self.n_swa and self.is_swa and self.is_swa[il])


@dataclass
class KVPlan:
    n_ctx: int
    n_ctx_seq: int
    stock_bytes: int
    full_bytes: int
    ring_bytes: int
    full_cells: int
    ring_cells: dict[int, int] = field(default_factory=dict)  # window -> cells
    mixed: bool = False
    layer_bytes: tuple[int, ...] = ()  # allocated bytes per layer (all caches), what the device split is made of
    swa_bytes: int = 0  # the sliding layers' cache of an SWA hybrid (inside stock_bytes, and inside ring_bytes if mixed)
    swa_cells: int = 0

    def device_bytes(self, n_device_layers: int) -> int:
        """KV bytes on the device when llama.cpp offloads the last ``n_device_layers`` layers (offload.device_layers)."""
        n = max(0, min(len(self.layer_bytes), n_device_layers))
        return sum(self.layer_bytes[len(self.layer_bytes) - n:])

    @property
    def mixed_bytes(self) -> int:
        return self.full_bytes + self.ring_bytes

    @property
    def ratio(self) -> float:
        return self.mixed_bytes / self.stock_bytes if self.stock_bytes else 1.0


def dims_from_gguf(path: str | Path) -> ModelDims:
    """The KV-relevant dims of any GGUF, its header fields validated (``converters.gguf_fields``)."""
    from converters.gguf_budgets import open_gguf
    from converters.gguf_fields import model_fields
    from converters.gguf_swa import swa_info

    with open_gguf(path) as h:
        f = model_fields(h)
        swa = swa_info(h, f.arch, f.n_layer)
    return ModelDims(f.arch, f.n_layer, f.n_head_kv, f.head_dim_k, f.head_dim_v, f.n_ctx_train,
                     swa.n_swa if swa.any else 0, swa.is_swa if swa.any else None)


def layer_bytes(dims: ModelDims, heads_per_layer: Sequence[int], cells: int, streams: int,
                type_k: str, type_v: str, flash_attn: bool) -> list[int]:
    """Bytes of each layer of one cache (0 for a layer filtered out of it); they sum to ``cache_bytes``."""
    v_max = max(dims.head_dim_v * h for h in heads_per_layer)
    out = []
    for h in heads_per_layer:
        if h == 0:
            out.append(0)  # layer filtered out of this cache
            continue
        dv = dims.head_dim_v * h if flash_attn else v_max
        out.append((row_bytes(type_k, dims.head_dim_k * h) + row_bytes(type_v, dv)) * cells * streams)
    return out


def cache_bytes(dims: ModelDims, heads_per_layer: Sequence[int], cells: int, streams: int,
                type_k: str, type_v: str, flash_attn: bool) -> int:
    return sum(layer_bytes(dims, heads_per_layer, cells, streams, type_k, type_v, flash_attn))


def predict(dims: ModelDims, windows: Optional[Sequence[Sequence[int]]], sink: int, n_ctx: int,
            n_ubatch: int = 512, n_seq: int = 1, type_k: str = "f16", type_v: Optional[str] = None,
            flash_attn: bool = True, unified: bool = False, mixed: bool = True, swa_full: bool = False) -> KVPlan:
    """Bytes the runtime allocates for these settings; ``windows`` [layer][head] (0 = full) or None for stock.

    ``swa_full`` matters only for sliding-window hybrids (llama.cpp's full-size SWA cache, kvtool's ``--swa-full``).
    """
    type_v = type_v or type_k
    for t in (type_k, type_v):
        cache_type(t)
    if n_ctx < 1 or n_ubatch < 1 or n_seq < 1:
        raise KvtoolError("n_ctx, n_ubatch and n_seq must be >= 1")
    n_ctx_pad = pad(n_ctx, 256)
    if unified or n_seq == 1:
        n_ctx_seq = n_ctx_pad
    else:
        n_ctx_seq = pad(n_ctx_pad // n_seq, 256)
    streams = 1 if unified else n_seq
    swa_layers = [dims.swa_layer(il) for il in range(dims.n_layer)]
    iswa = any(swa_layers)

    def only(keep) -> list[int]:
        return [h if keep(il) else 0 for il, h in enumerate(dims.n_head_kv)]

    swa_cells = 0
    swa_bytes = 0
    swa_lb = [0] * dims.n_layer
    if iswa:
        need = dims.n_swa * (n_seq if unified else 1) + n_ubatch
        swa_cells = n_ctx_seq if swa_full else pad(min(n_ctx_seq, need), 256)
        swa_lb = layer_bytes(dims, only(lambda il: swa_layers[il]), swa_cells, streams, type_k, type_v, flash_attn)
        swa_bytes = sum(swa_lb)
        base_lb = layer_bytes(dims, only(lambda il: not swa_layers[il]), n_ctx_seq, streams, type_k, type_v, flash_attn)
        stock_layers = [a + b for a, b in zip(base_lb, swa_lb)]
    else:
        stock_layers = layer_bytes(dims, dims.n_head_kv, n_ctx_seq, streams, type_k, type_v, flash_attn)
    stock = sum(stock_layers)

    def eff(w: int) -> int:
        return 0 if w >= n_ctx_seq else w

    budget_rows = [] if windows is None else [row for il, row in enumerate(windows) if not swa_layers[il]]
    active = bool(mixed and windows is not None and any(eff(w) > 0 for row in budget_rows for w in row))
    if not active:
        return KVPlan(n_ctx_pad, n_ctx_seq, stock, stock, 0, n_ctx_seq, {}, False, tuple(stock_layers),
                      swa_bytes, swa_cells)

    # the sliding layers' heads are the native group: never in a budget group
    per_layer_windows = [[None] * len(row) if swa_layers[il] else [eff(w) for w in row] for il, row in enumerate(windows)]
    groups = sorted({w for row in per_layer_windows for w in row if w is not None})
    full_bytes = ring_bytes = 0
    ring_cells: dict[int, int] = {}
    layers = list(swa_lb)
    for w in groups:
        per_layer = [sum(1 for x in row if x == w) for row in per_layer_windows]
        if w == 0:
            lb = layer_bytes(dims, per_layer, n_ctx_seq, streams, type_k, type_v, flash_attn)
            full_bytes = sum(lb)
        else:
            need = (w + sink) * (n_seq if unified else 1) + n_ubatch
            cells = min(n_ctx_seq, pad(min(n_ctx_seq, need), 256))
            ring_cells[w] = cells
            lb = layer_bytes(dims, per_layer, cells, streams, type_k, type_v, flash_attn)
            ring_bytes += sum(lb)
        layers = [a + b for a, b in zip(layers, lb)]
    return KVPlan(n_ctx_pad, n_ctx_seq, stock, full_bytes, ring_bytes + swa_bytes, n_ctx_seq if 0 in groups else 0,
                  ring_cells, True, tuple(layers), swa_bytes, swa_cells)
