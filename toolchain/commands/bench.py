"""`kvtool bench`: the same GGUF with mixed KV off vs on, each with an f16, q8_0 or q4_0 cache, in one process.

Why this design: the only fair comparison is the same file, same build, same threads, alternating variants in one
process; the variants (``toolchain.kv_variants``: stock, stock+q8_0, stock+q4_0, mixed, mixed+q8_0, mixed+q4_0)
differ only by the `kvtool.kv.enabled` override and the cache type (flash attention is on for all of them, which a
quantized V cache needs). Reported figures are
medians of repeated runs; speed claims are ratios measured in the same run.

Per context size C, all variants loaded side by side and measured round robin:
  - KV bytes: what the runtime allocated (kvtool_kv_bytes), not a log line;
  - prefill tok/s: a `prompt`-token prompt into an empty cache (n_ubatch as given);
  - decode tok/s: `n_decode` single-token steps with the cache filled to about C tokens. The fill is done once per
    variant; each repeat removes its decoded tail with seq_rm (which the ring can honour) and decodes again.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from ..errors import KvtoolError
from ..gguf_keys import CACHE_TYPES, K_ENABLED
from ..kv_variants import NAMES, kv_variant
from ..runtime.handles import clear_kv, ctx_ptr, cut_kv, synchronize

VARIANTS = {n: dict(mixed=kv_variant(n).mixed, cache=kv_variant(n).cache or "f16") for n in NAMES}


@dataclass
class BenchRow:
    ctx: int
    variant: str
    kv_bytes: int
    full_bytes: int
    ring_bytes: int
    prefill_tps: float
    decode_tps: float
    prefill_runs: list
    decode_runs: list
    gpu_layers: object = 0                             # resolved --gpu-layers: an int or "all"
    kv_buffers: list = field(default_factory=list)     # measured: [{"group", "device", "bytes"}]


def _load(path: Path, n_ctx: int, n_ubatch: int, n_threads: int, mixed: bool, cache: str, gpu_layers=0):
    from llama_cpp import Llama

    from ..runtime.offload import llama_value

    t = CACHE_TYPES[cache].ggml_id
    return Llama(str(path), n_ctx=n_ctx, n_batch=n_ubatch, n_ubatch=n_ubatch, n_threads=n_threads,
                 n_threads_batch=n_threads, flash_attn=True, type_k=t, type_v=t, verbose=False,
                 kv_overrides={K_ENABLED: mixed}, n_gpu_layers=llama_value(gpu_layers))


def bench_ctx(path: Path, ctx: int, variants: Sequence[str], prompt: int, n_decode: int, repeats: int,
              n_ubatch: int, n_threads: int, rng: np.random.Generator, echo: Callable[[str], None],
              gpu_layers=0) -> list[BenchRow]:
    """All variants of one context size, loaded side by side and measured in alternation (round robin), so a
    slowdown of the machine hits every variant alike and the ratios stay honest."""
    from ..runtime.library import kv_buffers, kv_bytes

    llms = {}
    try:
        for v in variants:
            spec = VARIANTS[v]
            llms[v] = _load(path, ctx, n_ubatch, n_threads, spec["mixed"], spec["cache"], gpu_layers)
            if spec["mixed"] and not kv_bytes(ctx_ptr(llms[v]))[0]:
                raise KvtoolError(f"{path} has no kvtool budgets (mixed mode did not activate); convert it with --mask first")
        n_vocab = next(iter(llms.values())).n_vocab()
        lo = min(100, n_vocab // 10)  # stay clear of the special tokens at the start of most vocabularies
        toks = rng.integers(lo, n_vocab - lo, size=ctx).tolist()
        p = min(prompt, ctx - n_decode - 1)
        fill = ctx - n_decode - 1

        prefill = {v: [] for v in variants}
        for _ in range(repeats):
            for v, llm in llms.items():
                clear_kv(llm)
                t0 = time.perf_counter()
                llm.eval(toks[:p])
                synchronize(llm)
                prefill[v].append(p / (time.perf_counter() - t0))
        for v in variants:  # reported as soon as measured: on a slow backend the fill below can take many minutes
            echo(f"[bench] ctx {ctx} {v}: prefill {p} tokens, tok/s {_runs(prefill[v])}")

        for v, llm in llms.items():
            echo(f"[bench] ctx {ctx} {v}: filling {fill} tokens")
            clear_kv(llm)
            llm.eval(toks[:fill])
            synchronize(llm)
        decode = {v: [] for v in variants}
        for _ in range(repeats):
            for v, llm in llms.items():
                t0 = time.perf_counter()
                for i in range(n_decode):
                    llm.eval([toks[fill + i]])
                synchronize(llm)
                decode[v].append(n_decode / (time.perf_counter() - t0))
                if not cut_kv(llm, fill):
                    raise KvtoolError("the cache refused to drop the decoded tail; cannot repeat the decode run")
                llm.n_tokens = fill
        for v in variants:
            echo(f"[bench] ctx {ctx} {v}: decode {n_decode} steps at {fill} tokens, tok/s {_runs(decode[v])}")

        rows = []
        for v, llm in llms.items():
            _, full, ring = kv_bytes(ctx_ptr(llm))
            rows.append(BenchRow(ctx, v, full + ring, full, ring, statistics.median(prefill[v]),
                                 statistics.median(decode[v]), prefill[v], decode[v], gpu_layers,
                                 kv_buffers(ctx_ptr(llm))))
        return rows
    finally:
        for llm in llms.values():
            llm.close()


def run_bench(path: str, ctxs: Sequence[int], variants: Sequence[str] = ("stock", "mixed", "mixed+q8_0"),
              prompt: int = 2048, n_decode: int = 32, repeats: int = 3, n_ubatch: int = 512,
              n_threads: Optional[int] = None, seed: int = 0, echo: Callable[[str], None] = print,
              gpu_layers=None) -> list[BenchRow]:
    """``gpu_layers``: N, "all" or None (the runtime's default), resolved once for every variant."""
    from converters.gguf_budgets import open_gguf, read_budgets

    from ..runtime.library import require_patched
    from ..runtime.offload import parse_gpu_layers, resolve_gpu_layers
    from ..runtime.threads import physical_cores

    parse_gpu_layers(gpu_layers)
    p = Path(path)
    if not p.is_file():
        raise KvtoolError(f"model not found: {path}")
    with open_gguf(p):
        pass
    require_patched()
    for v in variants:
        if v not in VARIANTS:
            raise KvtoolError(f"unknown variant {v!r} (choose from {', '.join(VARIANTS)})")
    b = read_budgets(p)
    if any(VARIANTS[v]["mixed"] for v in variants) and (b is None or b.head_window is None):
        # checked before loading: the runtime refuses a kvtool.kv.enabled override on a file without budgets
        raise KvtoolError(f"{path} has no kvtool budgets (mixed mode did not activate); convert it with --mask first")
    if repeats < 1 or n_decode < 1 or prompt < 1:
        raise KvtoolError("--repeats, --decode and --prompt must be >= 1")
    for c in ctxs:
        if c < prompt + n_decode + 2 and c < n_decode + 64:
            raise KvtoolError(f"context {c} is too small for the benchmark")
    threads = n_threads or physical_cores()
    ngl = resolve_gpu_layers(gpu_layers)
    rows = []
    for c in ctxs:
        for r in bench_ctx(p, c, variants, prompt, n_decode, repeats, n_ubatch, threads, np.random.default_rng(seed), echo,
                           ngl):
            rows.append(r)
            echo(f"[bench] ctx {c} {r.variant}: KV {r.kv_bytes / 2**20:.1f} MiB, prefill {r.prefill_tps:.1f} tok/s, "
                 f"decode {r.decode_tps:.2f} tok/s")
    return rows


def _runs(runs: list) -> str:
    return "[" + ", ".join(f"{x:.2f}" for x in runs) + "]"


def _ratio(a: float, stock: Optional[float]) -> str:
    return f"{a / stock:.3f}x" if stock else "-"


def markdown(rows: list[BenchRow]) -> str:
    """A table with ratios against the stock variant of the same context."""
    base = {r.ctx: r for r in rows if r.variant == "stock"}
    out = ["| ctx | variant | KV MiB | KV vs stock | prefill tok/s | prefill vs stock | decode tok/s | decode vs stock |",
           "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        b = base.get(r.ctx)
        out.append(f"| {r.ctx} | {r.variant} | {r.kv_bytes / 2**20:.1f} | {_ratio(r.kv_bytes, b and b.kv_bytes)} | "
                   f"{r.prefill_tps:.1f} | {_ratio(r.prefill_tps, b and b.prefill_tps)} | {r.decode_tps:.2f} | "
                   f"{_ratio(r.decode_tps, b and b.decode_tps)} |")
    return "\n".join(out)


def rows_json(rows: list[BenchRow]) -> list[dict]:
    return [asdict(r) for r in rows]


def plot(rows: list[BenchRow], out: str) -> None:
    """Decode tok/s and KV bytes against context length, one line per variant."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise KvtoolError("--plot needs matplotlib (pip install 'kvtool[train]')") from e
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for v in dict.fromkeys(r.variant for r in rows):
        rs = sorted((r for r in rows if r.variant == v), key=lambda r: r.ctx)
        a.plot([r.ctx for r in rs], [r.decode_tps for r in rs], marker="o", label=v)
        b.plot([r.ctx for r in rs], [r.kv_bytes / 2**20 for r in rs], marker="o", label=v)
    for ax, label in ((a, "decode tok/s"), (b, "KV cache MiB")):
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel(label)
        ax.legend()
    fig.tight_layout()
    tmp = Path(out).with_suffix(".tmp.png")
    fig.savefig(tmp)
    tmp.replace(out)
