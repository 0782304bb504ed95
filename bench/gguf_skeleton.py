"""A GGUF's skeleton: its header (metadata, tokenizer, tensor infos) without the weights, and back.

Why: bench/gpu_check.sh benchmarks SmolLM2 on a GPU machine that has no network, and the Q4_1 file (94 MiB) does
not fit in what can travel there. Speed does not depend on the weights' values, only on their types and shapes, so
the skeleton (about 1 MiB gzipped) is inflated there into a file of the same size, types and shapes whose data are
filler bytes in [0x00, 0x3b]: every f32/f16/bf16 scale read from them is finite and below 1, so no NaN path is
taken. Its logits mean nothing; only timings and memory are measured with it.

    python bench/gguf_skeleton.py strip SRC.gguf OUT.skel
    python bench/gguf_skeleton.py inflate OUT.skel DST.gguf
"""
from __future__ import annotations

import gzip
import os
import struct
import sys
from pathlib import Path

import numpy as np

MAGIC = b"KVSKEL1\n"
CHUNK = 1 << 24


def strip(src: Path, out: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from converters.gguf_budgets import open_gguf

    with open_gguf(src) as h:
        header, data_len = h.raw(0, h.data_offset), h.file_size - h.data_offset
    tmp = out.with_name(out.name + ".tmp")
    with gzip.open(tmp, "wb") as f:
        f.write(MAGIC + struct.pack("<QQ", len(header), data_len) + header)
    os.replace(tmp, out)
    print(f"skeleton of {src}: header {len(header)} bytes, data {data_len} bytes -> {out} ({out.stat().st_size} bytes)")


def inflate(skel: Path, dst: Path, seed: int = 0) -> None:
    with gzip.open(skel, "rb") as f:
        if f.read(len(MAGIC)) != MAGIC:
            sys.exit(f"gguf_skeleton: error: {skel} is not a skeleton")
        n_header, data_len = struct.unpack("<QQ", f.read(16))
        header = f.read(n_header)
    rng = np.random.default_rng(seed)
    tmp = dst.with_name(dst.name + ".tmp")
    with open(tmp, "wb") as out:
        out.write(header)
        left = data_len
        while left:
            n = min(CHUNK, left)
            out.write(rng.integers(0, 0x3C, size=n, dtype=np.uint8).tobytes())
            left -= n
    os.replace(tmp, dst)
    print(f"inflated {skel} -> {dst} ({n_header + data_len} bytes, filler weights)")


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] not in ("strip", "inflate"):
        sys.exit("usage: gguf_skeleton.py strip SRC.gguf OUT.skel | inflate SKEL DST.gguf")
    (strip if sys.argv[1] == "strip" else inflate)(Path(sys.argv[2]), Path(sys.argv[3]))
