"""Measure ``kvtool convert`` on a GGUF: wall time and peak RSS of the converting process (issue 5 target:
1 GB in < 10 s with < 300 MB RSS).

Why a synthetic file: it isolates the metadata rewrite from the model. It has the awkward parts of a real one: a
Llama-3-sized tokenizer (128,256 token strings + 280,000 merges, the slow part of parsing a header) and 1 GiB of
tensor data in 16 tensors. Each run is a fresh child process (imports included); its peak RSS is VmHWM from /proc (Linux).
The input was just written, so it is in the page cache; a cold read is bounded by the disk instead.

    .venv/bin/python bench/convert_speed.py [--gib 1] [--keep DIR] [--model some.gguf]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CHILD = r"""
import os, sys, time
if sys.argv[4] == "rw":
    del os.copy_file_range  # force the portable read/write loop
t0 = time.perf_counter()
from toolchain.heads import random_mask
from converters.gguf_budgets import apply_mask, model_shape, open_gguf
with open_gguf(sys.argv[1]) as h:
    s = model_shape(h)
apply_mask(sys.argv[1], sys.argv[2], random_mask(s.n_layer, s.n_head_kv, 0.5, 0))
dt = time.perf_counter() - t0
hwm = [l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
print(f"{dt:.3f} {int(hwm) / 1024:.1f}", file=open(sys.argv[3], "w"))
"""


def make_gguf(path: Path, gib: float, n_vocab: int = 128256, n_merges: int = 280000) -> None:
    import gguf

    n_tensors = 16
    per = int(gib * (1 << 30)) // n_tensors // 4 * 4
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(32)
    w.add_head_count(32)
    w.add_head_count_kv(8)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"tok{i:06d}" for i in range(n_vocab)])
    w.add_token_merges([f"t{i} m{i}" for i in range(n_merges)])
    for i in range(n_tensors):
        w.add_tensor_info(f"blk.{i}.ffn_up.weight", (per // 4,), np.dtype(np.float32), per)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(0)
    chunk = rng.integers(0, 255, size=per, dtype=np.uint8).view(np.float32)
    for i in range(n_tensors):
        chunk[:1] = i  # tensors differ
        w.write_tensor_data(chunk)
    w.close()


def run_child(src: Path, dst: Path, mode: str) -> tuple[float, float, float]:
    timing = dst.with_suffix(".t")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-c", CHILD, str(src), str(dst), str(timing), mode], env=env)
    _, status, _ = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    if status != 0:
        raise SystemExit(f"convert child failed with status {status}")
    inner, hwm = map(float, timing.read_text().split())
    timing.unlink()
    # VmHWM is the peak RSS of the child's own address space. (ru_maxrss would also count the parent's pages
    # the child held between fork and exec.)
    return wall, inner, hwm


def same_tensors(a: Path, b: Path) -> bool:
    from converters.gguf_budgets import tensor_spans

    sa, sb = tensor_spans(a), tensor_spans(b)
    if [x[::2] for x in sa] != [x[::2] for x in sb]:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        for (_, oa, n), (_, ob, _) in zip(sa, sb):
            fa.seek(oa), fb.seek(ob)
            left = n
            while left:
                k = min(left, 64 << 20)
                if fa.read(k) != fb.read(k):
                    return False
                left -= k
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--model", type=Path, help="measure this GGUF instead of a synthetic one")
    ap.add_argument("--keep", type=Path, help="work in this directory and keep the files")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    work = Path(args.keep or tempfile.mkdtemp(prefix="kvtool-bench-", dir=os.environ.get("TMPDIR", "/tmp")))
    work.mkdir(parents=True, exist_ok=True)
    try:
        if args.model:
            src = args.model
        else:
            src = work / "synthetic.gguf"
            t0 = time.perf_counter()
            make_gguf(src, args.gib)
            print(f"made {src} ({src.stat().st_size / 1e9:.3f} GB) in {time.perf_counter() - t0:.1f} s")
        size = src.stat().st_size
        print(f"input {src}: {size / 1e9:.3f} GB ({size / (1 << 30):.3f} GiB)")
        for mode in ("copy_file_range", "rw"):
            for i in range(args.repeat):
                dst = work / f"out.{mode}.{i}.gguf"
                wall, inner, rss = run_child(src, dst, mode)
                ok = same_tensors(src, dst)
                print(f"{mode:16s} run {i}: process wall {wall:6.2f} s  convert {inner:6.2f} s  "
                      f"peak RSS {rss:6.1f} MiB  tensors identical: {ok}")
                dst.unlink()
    finally:
        if not args.keep:
            import shutil

            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
