"""The hand-kept cache-type table matches ggml's own ids and block sizes (gguf-py's constants)."""
from __future__ import annotations

import pytest

from toolchain.errors import KvtoolError
from toolchain.gguf_keys import CACHE_TYPES, K_BEACON_INTERVAL, K_BEACON_TOKEN, K_ENABLED, PREFIX, cache_type


def test_cache_types_match_gguf_enum():
    gguf = pytest.importorskip("gguf")
    for name, ct in CACHE_TYPES.items():
        q = gguf.GGMLQuantizationType[name.upper()]
        assert ct.ggml_id == int(q), name
        assert (ct.block, ct.block_bytes) == tuple(gguf.GGML_QUANT_SIZES[q]), name


def test_default_first_and_unknown_type_is_one_error():
    assert next(iter(CACHE_TYPES)) == "f16"
    assert cache_type("q8_0").ggml_id == 8
    with pytest.raises(KvtoolError, match="unknown cache type 'q3_k'.*choose from f16, f32"):
        cache_type("q3_k")


def test_keys_share_the_prefix():
    assert all(k.startswith(PREFIX) for k in (K_ENABLED, K_BEACON_TOKEN, K_BEACON_INTERVAL))
