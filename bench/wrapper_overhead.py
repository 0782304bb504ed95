"""Overhead of kvtool's ``Model`` against raw ``llama_cpp.Llama`` on the same prompt and settings.

    .venv/bin/python bench/wrapper_overhead.py [MODEL.gguf] [--tokens 128] [--reps 3] [--threads N] [--json]

Both objects load the same GGUF with identical settings (n_ctx, threads, flash attention, KV type, n_ubatch).
Each repetition clears both caches and streams ``--tokens`` greedy tokens; decode tok/s is measured the same way
for both, outside the code under test: (chunks - 1) / (time of last chunk - time of first chunk), by the wall
clock and by this thread's CPU time (see ``decode_rate``). The two run interleaved (order alternating) so machine
load hits both alike; the medians are compared. Without MODEL it uses
SmolLM2 with windows 64 on KV heads 1 and 2 of every layer, sink 16 (written to a temporary file).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

PROMPT = "Once upon a time, in a small village by the sea, there lived an old fisherman who"


def decode_rate(chunks) -> tuple[float, float, int]:
    """(wall tok/s, CPU tok/s, chunks). CPU time is this thread's: with --threads 1 llama.cpp computes on the
    calling thread, so it counts all the work per token (ggml and Python) but not the time other processes
    hold the core, which makes it the steadier figure on a loaded machine."""
    wall, cpu = [], []
    for _ in chunks:
        wall.append(time.perf_counter())
        cpu.append(time.thread_time())
    if len(wall) < 2:
        raise SystemExit("the model stopped after one token; use another prompt")
    n = len(wall) - 1
    return n / (wall[-1] - wall[0]), n / (cpu[-1] - cpu[0]), len(wall)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", help="GGUF (default: masked SmolLM2)")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--n-ctx", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from llama_cpp import Llama

    from toolchain import Model
    from toolchain.runtime.handles import clear_kv

    tmp = None
    path = args.model
    if path is None:
        from helpers_runtime import write_windows

        from toolchain.models import fetch_smollm2

        tmp = tempfile.TemporaryDirectory(prefix="kvtool-bench-")
        path = str(write_windows(fetch_smollm2(), Path(tmp.name) / "smol-w64.gguf", [[0, 64, 64]] * 30, 16))

    model = Model.load(path, n_ctx=args.n_ctx, n_threads=args.threads)
    raw = Llama(path, n_ctx=args.n_ctx, n_batch=512, n_ubatch=model.n_ubatch, n_threads=model.n_threads,
                n_threads_batch=model.n_threads, flash_attn=model.flash_attn, type_k=1, type_v=1, seed=0,
                verbose=False)

    def run_raw():
        clear_kv(raw)
        return decode_rate(raw.create_completion(PROMPT, max_tokens=args.tokens, temperature=0.0, stream=True))

    def run_model():
        model.reset()
        return decode_rate(model.generate(PROMPT, max_tokens=args.tokens, temperature=0.0, stream=True))

    run_raw(), run_model()  # warm-up: first graph allocations, page faults
    res = {"raw": {"wall": [], "cpu": []}, "model": {"wall": [], "cpu": []}}
    n_chunks = set()
    for i in range(args.reps):
        order = (("raw", run_raw), ("model", run_model)) if i % 2 == 0 else (("model", run_model), ("raw", run_raw))
        for name, fn in order:
            wall, cpu, n = fn()
            res[name]["wall"].append(wall)
            res[name]["cpu"].append(cpu)
            n_chunks.add(n)
    med = {k: {m: statistics.median(v[m]) for m in ("wall", "cpu")} for k, v in res.items()}
    out = {"model": str(path), "tokens": args.tokens, "reps": args.reps, "n_threads": model.n_threads,
           "flash_attn": model.flash_attn, "mixed": model.kv_stats()["mixed"], "chunks_per_run": sorted(n_chunks)}
    for m in ("wall", "cpu"):
        out[m] = {"raw_tok_s": [round(x, 2) for x in res["raw"][m]],
                  "model_tok_s": [round(x, 2) for x in res["model"][m]],
                  "median_raw": round(med["raw"][m], 2), "median_model": round(med["model"][m], 2),
                  "ratio": round(med["model"][m] / med["raw"][m], 4),
                  "overhead_pct": round(100 * (1 - med["model"][m] / med["raw"][m]), 2)}

    # Isolated per-token cost of the text layers: the same two call paths with the token loop taken out (raw:
    # Llama.generate; Model: the decode core's generate_step; each replaced by a generator replaying fixed tokens),
    # best of many runs. What is left is Python work only: create_completion's detokenize/stop handling against
    # stream_generate's pieces/stop filter/stats. (The loops themselves are in the end-to-end rates above.)
    replay = model.tokenize(" The fisherman pulled his net from the water and counted the fish." * 40,
                            add_bos=False)[:args.tokens]

    def fake_generate(self, tokens, *a, **k):
        yield from replay

    from toolchain.runtime import decode as core

    def fake_step(*a, **k):
        yield from replay

    real_generate, real_step = Llama.generate, core.generate_step
    Llama.generate, core.generate_step = fake_generate, fake_step
    try:
        def best(fn, n=30) -> float:
            ts = []
            for _ in range(n):
                t0 = time.perf_counter()
                for _ in fn():
                    pass
                ts.append(time.perf_counter() - t0)
            return min(ts)

        t_raw = best(lambda: raw.create_completion(PROMPT, max_tokens=args.tokens, temperature=0.0, stream=True))
        t_model = best(lambda: model.generate(PROMPT, max_tokens=args.tokens, temperature=0.0, stream=True))
    finally:
        Llama.generate, core.generate_step = real_generate, real_step
    per_tok_us = (t_model - t_raw) / len(replay) * 1e6
    token_ms = 1e3 / med["raw"]["wall"]
    out["isolated"] = {"python_per_token_us_raw": round(t_raw / len(replay) * 1e6, 2),
                       "python_per_token_us_model": round(t_model / len(replay) * 1e6, 2),
                       "wrapper_us_per_token": round(per_tok_us, 2), "decode_ms_per_token": round(token_ms, 3),
                       "overhead_pct": float(f"{100 * per_tok_us / (token_ms * 1e3):.2g}")}
    model.close()
    raw.close()
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"decode tok/s, median of {args.reps} ({args.tokens} tokens, {out['n_threads']} threads, "
              f"flash_attn={out['flash_attn']}, mixed={out['mixed']}):")
        for m, label in (("wall", "wall clock"), ("cpu", "thread CPU time")):
            o = out[m]
            print(f"  {label:16s} raw {o['median_raw']:8.2f}  Model {o['median_model']:8.2f}  "
                  f"ratio {o['ratio']:.4f} (overhead {o['overhead_pct']:+.2f}%)  "
                  f"runs raw {o['raw_tok_s']} Model {o['model_tok_s']}")
        i = out["isolated"]
        print(f"  isolated: Model adds {i['wrapper_us_per_token']:.1f} us of Python per token "
              f"({i['python_per_token_us_raw']:.1f} -> {i['python_per_token_us_model']:.1f} us with llama.cpp "
              f"replaced by a replay) = {i['overhead_pct']:.2g}% of a {i['decode_ms_per_token']:.2f} ms decode step")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
