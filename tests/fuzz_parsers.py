"""Open-ended fuzzing of the two parsers every bad file goes through (``make fuzz``; not collected by ``make test``).

The GGUF header parser (``converters.gguf_header.GGUFHeader`` + ``gguf_fields.model_fields`` + the kvtool key
validator) and the heads.json reader (``HeadsMask.load``) must, for ANY bytes, either return or raise KvtoolError:
never another exception, never a hang. Hypothesis generates the bytes: structured ones (valid headers with mutated
values, nested arrays, random types) and raw ones. Run longer with ``FUZZ_EXAMPLES=100000 make fuzz``.
"""
from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from toolchain.errors import KvtoolError  # noqa: E402

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "2000"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
_TMP = Path(tempfile.mkdtemp(prefix="kvtool-fuzz-"))

KEYS = ["general.architecture", "general.alignment", "llama.block_count", "llama.attention.head_count",
        "llama.attention.head_count_kv", "llama.embedding_length", "llama.attention.key_length",
        "kvtool.version", "kvtool.kv.enabled", "kvtool.kv.sink", "kvtool.kv.head_window", "kvtool.beacon.token_id",
        "kvtool.beacon.interval", "kvtool.heads.scores", "kvtool.heads.per_layer", "kvtool.heads.window",
        "tokenizer.ggml.tokens"]


def _str(b: bytes) -> bytes:
    return struct.pack("<Q", len(b)) + b


@st.composite
def values(draw, depth=0):
    """(type id, encoded value) of any GGUF type, arrays of arrays included, plus out-of-range type ids."""
    t = draw(st.integers(0, 13 if depth < 3 else 12))
    if t == 9 and depth < 3:  # array
        sub_t = draw(st.integers(0, 12))
        n = draw(st.integers(0, 4))
        items = [draw(values(depth + 1)) for _ in range(n)]
        body = b"".join(v for tt, v in items if tt == sub_t) if sub_t != 9 else b"".join(v for _, v in items)
        count = draw(st.sampled_from([n, 0, 2**63, n + 1]))
        return 9, struct.pack("<IQ", sub_t, count) + body
    if t == 8:
        return 8, _str(draw(st.binary(max_size=12)))
    size = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}.get(t, 0)
    return t, draw(st.binary(min_size=size, max_size=size))


@st.composite
def gguf_files(draw):
    pairs = []
    for _ in range(draw(st.integers(0, 8))):
        key = draw(st.one_of(st.sampled_from(KEYS), st.text(max_size=8).map(lambda s: s)))
        t, v = draw(values())
        pairs.append(_str(key.encode("utf-8", "surrogatepass")) + struct.pack("<I", t) + v)
    n_kv = draw(st.sampled_from([len(pairs), len(pairs) + 1, 0, 2**64 - 1]))
    n_t = draw(st.sampled_from([0, 1, 2**40]))
    data = b"GGUF" + struct.pack("<IQQ", draw(st.sampled_from([3, 2, 1, 0x03000000])), n_t, n_kv) + b"".join(pairs)
    cut = draw(st.integers(0, len(data)))
    return data[:cut] if draw(st.booleans()) else data


def _parse(data: bytes) -> None:
    from converters.gguf_budgets import _budgets, open_gguf
    from converters.gguf_fields import model_fields

    f = _TMP / "x.gguf"
    f.write_bytes(data)
    try:
        with open_gguf(f) as h:
            for k in list(h.kvs):
                h.value(k)
            for dims in (False, True):
                try:
                    model_fields(h, dims=dims)
                except KvtoolError:
                    pass
            _budgets(h)
    except KvtoolError:
        pass


@SETTINGS
@given(gguf_files())
def test_gguf_header_structured(data):
    _parse(data)


@SETTINGS
@given(st.binary(max_size=256).map(lambda b: b"GGUF" + b))
def test_gguf_header_raw(data):
    _parse(data)


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
                           lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=4),
                           max_leaves=20)


@st.composite
def heads_docs(draw):
    from toolchain.heads import random_mask

    d = random_mask(2, 2, 0.5, seed=0).to_dict()
    for k in draw(st.lists(st.sampled_from(sorted(d) + ["bogus"]), max_size=3)):
        if draw(st.booleans()):
            d.pop(k, None)
        else:
            d[k] = draw(json_values)
    text = json.dumps(d, allow_nan=True)
    mode = draw(st.integers(0, 3))
    if mode == 1:
        return text.encode()[:draw(st.integers(0, len(text)))]
    if mode == 2:
        return draw(st.binary(max_size=64))
    if mode == 3:
        return b"[" * draw(st.integers(1, 200_000))
    return text.encode()


@SETTINGS
@given(heads_docs())
def test_heads_json_reader(data):
    from toolchain.heads import HeadsMask

    f = _TMP / "h.json"
    f.write_bytes(data)
    try:
        HeadsMask.load(f)
    except KvtoolError:
        pass
