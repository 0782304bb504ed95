"""KV variant names shared by `bench`, `eval` and `plan`: mixed allocation on/off crossed with a cache type.

Why one table: the equal-memory comparison pits kvtool's per-head budgets against what llama.cpp users pick instead
(`-ctk/-ctv q8_0|q4_0`). The same name must mean the same load everywhere, so a table row in docs/benchmarks.md and
a `kvtool eval` row can be compared. ``stock`` is the file with ``kvtool.kv.enabled=false`` (every head full);
``mixed`` is the file's budgets. A suffix ``+q8_0`` / ``+q4_0`` quantizes both K and V.

A quantized V cache needs flash attention in llama.cpp (without it V is stored transposed, which ggml cannot do
for block types): every quantized variant runs with flash attention, and a request for one without it is refused
with one line (:func:`check_flash_attn`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .errors import KvtoolError

QUANT_CACHES = ("q8_0", "q4_0")
# order matters: it is the row order of tables
NAMES = ("stock", "stock+q8_0", "stock+q4_0", "mixed", "mixed+q8_0", "mixed+q4_0")
UNQUANTIZED = ("f32", "f16", "bf16")


@dataclass(frozen=True)
class KVVariant:
    name: str
    mixed: bool
    cache: Optional[str]  # None: the run's default cache type (f16 in bench, --cache-type in eval)


def kv_variant(name: str) -> Optional[KVVariant]:
    """The variant called ``name`` (``stock``/``full`` and ``mixed``, with an optional ``+q8_0``/``+q4_0``), or None
    when ``name`` is not a KV variant (callers add their own names, e.g. eval's ``beacons``)."""
    base, _, cache = name.partition("+")
    if base not in ("stock", "full", "mixed"):
        return None
    if cache and cache not in QUANT_CACHES:
        return None
    return KVVariant(name, base == "mixed", cache or None)


def check_flash_attn(cache_type: str, flash_attn: bool) -> None:
    """One-line refusal for a quantized V cache without flash attention (llama.cpp would fail the context)."""
    if cache_type not in UNQUANTIZED and not flash_attn:
        raise KvtoolError(f"a quantized KV cache ({cache_type}) needs flash attention: llama.cpp stores V "
                          f"transposed without it, which block types cannot be; drop --no-flash-attn (flash_attn=False) or use f16")
