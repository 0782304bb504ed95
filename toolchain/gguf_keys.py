"""The names kvtool writes into and reads from GGUF files, in one namespace: the ``kvtool.*`` metadata keys and the
KV cache types.

Why one module at the base: the converters write these keys, the runtime reads them back (and overrides
``kvtool.kv.enabled`` per load), and the commands, eval and tests name them; a literal repeated in each drifts.

The cache types carry ggml's type ids (``gguf.GGMLQuantizationType``) and block sizes (``gguf.GGML_QUANT_SIZES``)
as plain numbers, so that choosing a cache type on the command line does not import gguf (a third of a second);
``tests/test_gguf_keys.py`` checks them against gguf's enum.
"""
from __future__ import annotations

from typing import NamedTuple

from .errors import KvtoolError

KVTOOL_VERSION = 1  # value of K_VERSION written by this kvtool
PREFIX = "kvtool."
K_VERSION = "kvtool.version"
K_ENABLED = "kvtool.kv.enabled"
K_SINK = "kvtool.kv.sink"
K_HEAD_WINDOW = "kvtool.kv.head_window"
K_METHOD = "kvtool.heads.method"
K_SPARSITY = "kvtool.heads.sparsity"
# the head scores the mask came from, so the runtime can rebuild it at another sparsity (cpp/kvtool-rederive.cpp)
K_SCORES = "kvtool.heads.scores"
K_PER_LAYER = "kvtool.heads.per_layer"
K_HEADS_WINDOW = "kvtool.heads.window"
# load-time overrides only (kv_overrides / --override-kv): never written into a file
K_KV_SPARSITY = "kvtool.kv.sparsity"
K_KV_WINDOW = "kvtool.kv.window"
BEACON_PREFIX = "kvtool.beacon."
K_BEACON_TOKEN = "kvtool.beacon.token_id"
K_BEACON_INTERVAL = "kvtool.beacon.interval"


class CacheType(NamedTuple):
    """A K/V cache element type: its ggml_type id (for ``type_k``/``type_v``) and ggml block layout."""

    ggml_id: int
    block: int  # values per block
    block_bytes: int  # bytes per block


# The cache types llama.cpp accepts for K/V, the default (f16) first.
CACHE_TYPES: dict[str, CacheType] = {
    "f16": CacheType(1, 1, 2),
    "f32": CacheType(0, 1, 4),
    "bf16": CacheType(30, 1, 2),
    "q8_0": CacheType(8, 32, 34),
    "q4_0": CacheType(2, 32, 18),
    "q4_1": CacheType(3, 32, 20),
    "q5_0": CacheType(6, 32, 22),
    "q5_1": CacheType(7, 32, 24),
    "iq4_nl": CacheType(20, 32, 18),
}


def cache_type(name: str) -> CacheType:
    """The cache type called ``name``; a KvtoolError naming the choices otherwise."""
    if name not in CACHE_TYPES:
        raise KvtoolError(f"unknown cache type {name!r} (choose from {', '.join(CACHE_TYPES)})")
    return CACHE_TYPES[name]
