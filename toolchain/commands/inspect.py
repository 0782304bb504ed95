"""`kvtool inspect` and `kvtool plan`: what a converted GGUF will allocate, and what context fits in a memory budget.

Both use toolchain/runtime/memory.py, the same rule the runtime allocates by (tests check measured == predicted),
so the answer to "what do I gain on my laptop?" needs no model load.
"""
from __future__ import annotations

import json
from typing import Optional

import click

from ..errors import KvtoolError
from ..gguf_keys import cache_type as check_cache_type
from ..kv_variants import check_flash_attn
from ..runtime.kv_budget import max_ctx
from ..runtime.memory import KVPlan, ModelDims, dims_from_gguf, predict
from ..runtime.offload import device_layers, weights_on_device
from ..validate import parse_size
from .offload_option import gpu_layers_option


def _mib(b: int) -> str:
    return f"{b / 2**20:.1f} MiB"


def _load(model: str):
    from converters.gguf_budgets import read_budgets

    dims = dims_from_gguf(model)
    return dims, read_budgets(model)


def offload_report(model: str, dims: ModelDims, plan: KVPlan, gpu_layers, mem: Optional[int]) -> dict:
    """What the device holds for ``gpu_layers``: the weights of the offloaded layers and their KV (the KV of the
    layers left on the CPU stays in host memory), and whether that fits in ``mem`` bytes of device memory."""
    k = device_layers(gpu_layers, dims.n_layer)
    kv_dev = plan.device_bytes(k)
    weights = weights_on_device(model, gpu_layers, dims.n_layer)
    return {"gpu_layers": gpu_layers, "device_layers": k, "weights_device_bytes": weights,
            "kv_device_bytes": kv_dev, "kv_host_bytes": plan.mixed_bytes - kv_dev, "device_bytes": weights + kv_dev,
            "mem_bytes": mem, "fits": None if mem is None else weights + kv_dev <= mem}


def budget_notes(dims: ModelDims, windows) -> list[str]:
    """What the runtime will do with this architecture's budgets, when that is not "all of them" (issue 19)."""
    from converters.gguf_swa import budget_refusal

    why = budget_refusal(dims.arch)
    if why:
        return [why + "; the runtime ignores them and runs the stock cache"]
    notes = []
    if dims.n_swa:
        glob = [il for il in range(dims.n_layer) if not dims.swa_layer(il)]
        notes.append(f"sliding window {dims.n_swa} on {dims.n_layer - len(glob)} of {dims.n_layer} layers; "
                     f"budgets apply to the global layers {glob}")
        if windows:
            ignored = sum(1 for il, row in enumerate(windows) if dims.swa_layer(il) for w in row if w > 0)
            if ignored:
                notes.append(f"{ignored} compressed heads sit on sliding layers and are ignored (they keep the "
                             f"model's window)")
    return notes


def _mixed_possible(dims: ModelDims) -> bool:
    from converters.gguf_swa import budget_refusal

    return budget_refusal(dims.arch) is None


def inspect_report(model: str, n_ctx: int, n_ubatch: int, n_seq: int, cache_type: str, flash_attn: bool,
                   gpu_layers=None, mem: Optional[int] = None, swa_full: bool = False) -> dict:
    """``gpu_layers`` (N or "all") adds the device split; ``mem`` is then device memory, else the KV budget."""
    check_cache_type(cache_type)
    check_flash_attn(cache_type, flash_attn)  # llama.cpp would refuse that context: say so instead of predicting it
    dims, b = _load(model)
    windows = b.head_window if b else None
    plan = predict(dims, windows, b.sink if b else 0, n_ctx, n_ubatch, n_seq, cache_type, cache_type, flash_attn,
                   mixed=bool(b and b.enabled) and _mixed_possible(dims), swa_full=swa_full)
    per_layer = [{"layer": i, "full": sum(1 for w in row if w == 0), "compressed": sum(1 for w in row if w > 0)}
                 for i, row in enumerate(windows)] if windows else []
    return {
        "model": model, "arch": dims.arch, "n_layer": dims.n_layer, "n_head_kv": list(dims.n_head_kv),
        "head_dim_k": dims.head_dim_k, "head_dim_v": dims.head_dim_v,
        "budget_source": ("kvtool keys in the GGUF" + ("" if b.enabled else " (disabled)")) if b else "none (stock cache)",
        "method": b.method if b else None, "sparsity": b.sparsity if b else None,
        "scores": bool(b and b.scores is not None),
        "sink": b.sink if b else None, "windows": sorted({w for row in windows for w in row if w > 0}) if windows else [],
        "beacon": {"token_id": b.beacon_token_id, "interval": b.beacon_interval,
                   "intervals": list(b.supported_intervals())} if b and b.beacon_token_id is not None else None,
        "per_layer": per_layer,
        "n_ctx": plan.n_ctx, "n_ubatch": n_ubatch, "n_seq": n_seq, "cache_type": cache_type, "flash_attn": flash_attn,
        "stock_bytes": plan.stock_bytes, "mixed_bytes": plan.mixed_bytes, "full_bytes": plan.full_bytes,
        "ring_bytes": plan.ring_bytes, "ring_cells": plan.ring_cells, "ratio": plan.ratio, "mixed_active": plan.mixed,
        "n_swa": dims.n_swa, "swa_full": swa_full, "swa_bytes": plan.swa_bytes, "swa_cells": plan.swa_cells,
        "notes": budget_notes(dims, windows),
        "offload": offload_report(model, dims, plan, gpu_layers, mem) if gpu_layers else None,
        "mem_bytes": mem, "kv_fits": None if mem is None or gpu_layers else plan.mixed_bytes <= mem,
    }


def kv_budget_report(dims: ModelDims, b, budget: int, n_ctx, n_ubatch: int, swa_full: bool = False) -> dict:
    """What ``--kv-budget`` would choose on chat/generate/serve/eval (f16, flash attention, the file's mixed flag)."""
    from ..runtime.kv_budget import choose

    try:
        c = choose(dims, b, budget, n_ctx, n_ubatch, "f16", True, mixed=bool(b and b.enabled), swa_full=swa_full)
    except KvtoolError as e:
        return {"n_ctx_requested": n_ctx, "error": str(e)}
    return {"n_ctx_requested": n_ctx, "n_ctx": c.n_ctx, "sparsity": c.sparsity, "n_compressed": c.n_compressed,
            "n_heads": c.n_heads, "kv_bytes": c.kv_bytes, "summary": c.summary()}


def plan_report(model: str, budget: int, n_ubatch: int, sparsity: Optional[float], gpu_layers=None,
                n_ctx="auto", swa_full: bool = False) -> dict:
    """``budget`` is the KV budget, or with ``gpu_layers`` (N >= 1 or "all") the device memory: the weights of the
    offloaded layers come off it first, and the KV of their layers must fit in the rest."""
    dims, b = _load(model)
    windows, sink, source = (b.head_window, b.sink, "file") if b else (None, 0, "none")
    if sparsity is not None:
        # what-if: a mask of this sparsity with the file's (or default) sink/window, heads chosen arbitrarily
        from ..heads import DEFAULT_SINK, DEFAULT_WINDOW, check_sparsity, n_compressed

        s = check_sparsity(sparsity)
        w = max((x for row in (windows or []) for x in row), default=DEFAULT_WINDOW) or DEFAULT_WINDOW
        sink = sink if b else DEFAULT_SINK
        # only heads whose budget the runtime uses count: the global layers of a sliding-window model
        slots = [(il, h) for il in range(dims.n_layer) if not dims.swa_layer(il) for h in range(dims.n_head_kv[il])]
        k = n_compressed(s, len(slots))
        windows = [[0] * dims.n_head_kv[il] for il in range(dims.n_layer)]
        for il, h in slots[:k]:
            windows[il][h] = w
        source = f"what-if sparsity {s}"
    dev = device_layers(gpu_layers, dims.n_layer) if gpu_layers else None
    weights = weights_on_device(model, gpu_layers, dims.n_layer) if gpu_layers else 0
    kv_budget = budget - weights
    rows = {}
    for name, wins, cache, mixed in (("full", None, "f16", False), ("mixed", windows, "f16", True),
                                     ("mixed+q8_0", windows, "q8_0", True)):
        if mixed and (not windows or not _mixed_possible(dims)):
            continue
        c = max_ctx(dims, wins, sink, kv_budget, n_ubatch, cache, mixed, device_layers=dev,
                    swa_full=swa_full) if kv_budget >= 0 else 0
        pl = predict(dims, wins, sink, c, n_ubatch, 1, cache, cache, True, mixed=mixed, swa_full=swa_full) if c else None
        rows[name] = {"max_ctx": c, "cache_type": cache, "kv_bytes": pl.mixed_bytes if pl else 0}
        if dev is not None:
            rows[name]["kv_device_bytes"] = pl.device_bytes(dev) if pl else 0
    return {"model": model, "budget_bytes": budget, "n_ubatch": n_ubatch, "mask": source,
            "n_ctx_train": dims.n_ctx_train, "plans": rows, "notes": budget_notes(dims, windows), "swa_full": swa_full,
            "kv_budget": kv_budget_report(dims, b, budget, n_ctx, n_ubatch, swa_full) if dev is None and sparsity is None
            else None,
            "offload": {"gpu_layers": gpu_layers, "device_layers": dev, "weights_device_bytes": weights}
            if dev is not None else None}


PARALLEL_VARIANTS = ("stock", "stock+q8_0", "stock+q4_0", "mixed", "mixed+q8_0", "mixed+q4_0")
LLAMA_MAX_SEQ = 256  # llama.cpp's cap on n_seq_max (src/llama-cparams.h)


def seq_plan(dims: ModelDims, windows, sink: int, n_seq: int, ctx: int, n_ubatch: int, cache_type: str, mixed: bool,
             unified: bool = False) -> KVPlan:
    """The cache of ``n_seq`` parallel sequences of ``ctx`` tokens each, as llama-server -np N -c N*ctx makes it:
    one stream per sequence (unless ``unified``), so n_ctx = n_seq * ctx and each stream holds ctx cells."""
    return predict(dims, windows, sink, n_seq * ctx, n_ubatch, n_seq, cache_type, cache_type, True, unified,
                   mixed=mixed)


def max_seqs(dims: ModelDims, windows, sink: int, budget: int, ctx: int, n_ubatch: int, cache_type: str,
             mixed: bool, unified: bool = False, limit: int = LLAMA_MAX_SEQ) -> int:
    """Most parallel ``ctx``-token sequences whose KV cache fits in ``budget`` bytes (0 if not even one), at most
    ``limit`` (llama.cpp's n_seq_max cap)."""
    def fits(n: int) -> bool:
        return seq_plan(dims, windows, sink, n, ctx, n_ubatch, cache_type, mixed, unified).mixed_bytes <= budget

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:  # bytes grow with the sequence count
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def parallel_report(model: str, budget: int, n_parallel: Optional[int], ctx: int, n_ubatch: int,
                    unified: bool = False) -> dict:
    """How many ``ctx``-token sequences fit in ``budget`` bytes of KV, per variant (stock vs mixed, f16/q8_0/q4_0),
    and what ``n_parallel`` of them would allocate."""
    from ..kv_variants import kv_variant
    from ..validate import N_CTX_MAX, check_int

    ctx = check_int("--ctx", ctx, 1, N_CTX_MAX)
    if n_parallel is not None:
        n_parallel = check_int("--parallel", n_parallel, 1, LLAMA_MAX_SEQ)
    dims, b = _load(model)
    windows, sink = (b.head_window, b.sink) if b else (None, 0)
    rows = {}
    for name in PARALLEL_VARIANTS:
        kv = kv_variant(name)
        if kv.mixed and not windows:
            continue
        cache = kv.cache or "f16"
        n = max_seqs(dims, windows if kv.mixed else None, sink, budget, ctx, n_ubatch, cache, kv.mixed, unified)
        one = seq_plan(dims, windows if kv.mixed else None, sink, 1, ctx, n_ubatch, cache, kv.mixed, unified)
        row = {"cache_type": cache, "max_seqs": n, "kv_bytes_per_seq": one.mixed_bytes,
               "kv_bytes": seq_plan(dims, windows if kv.mixed else None, sink, n, ctx, n_ubatch, cache, kv.mixed,
                                    unified).mixed_bytes if n else 0}
        if n_parallel is not None:
            pl = seq_plan(dims, windows if kv.mixed else None, sink, n_parallel, ctx, n_ubatch, cache, kv.mixed,
                          unified)
            row.update(parallel_kv_bytes=pl.mixed_bytes, fits=pl.mixed_bytes <= budget)
        rows[name] = row
    return {"model": model, "budget_bytes": budget, "ctx": ctx, "n_parallel": n_parallel, "n_ubatch": n_ubatch,
            "unified": unified, "n_ctx_train": dims.n_ctx_train, "max_seq_cap": LLAMA_MAX_SEQ,
            "mask": "file" if windows else "none", "variants": rows}


def _echo_parallel(r: dict) -> None:
    n = r["n_parallel"]
    click.echo(f"KV budget {_mib(r['budget_bytes'])}, {r['ctx']}-token sequences, ubatch {r['n_ubatch']}, "
               f"{'one unified cache' if r['unified'] else 'one stream per sequence'}, flash attention on"
               + (f"; asked: --parallel {n}" if n else ""))
    base = r["variants"]["stock"]["max_seqs"]
    for name, v in r["variants"].items():
        gain = f" ({v['max_seqs'] / base:.2f}x stock)" if base and name != "stock" else ""
        cap = "+ (llama.cpp's cap)" if v["max_seqs"] == r["max_seq_cap"] else ""
        line = (f"  {name:11s} {v['max_seqs']:>6d}{cap} sequences fit{gain:17s} {_mib(v['kv_bytes_per_seq'])} per "
                f"sequence")
        if n:
            line += (f"; {n} need {_mib(v['parallel_kv_bytes'])}: "
                     f"{'fits' if v['fits'] else 'does NOT fit'}")
        click.echo(line)
    if r["n_ctx_train"] and r["ctx"] > r["n_ctx_train"]:
        click.echo(f"  (the model was trained with a {r['n_ctx_train']}-token context)")


@click.command("inspect")
@click.argument("model", type=click.Path())
@click.option("--ctx", "n_ctx", default=4096, show_default=True)
@click.option("--ubatch", "n_ubatch", default=512, show_default=True)
@click.option("--seqs", "n_seq", default=1, show_default=True)
@click.option("--cache-type", default="f16", show_default=True, help="f16 | q8_0 | q4_0 | ...")
@click.option("--no-flash-attn", is_flag=True, help="Predict for flash attention off (V cache padded per layer).")
@gpu_layers_option("Predict for N layers (or 'all') on the GPU: what the device holds (default: none, a CPU run).")
@click.option("--mem", "mem", default=None, help="Device memory with --gpu-layers (does it fit?), else a KV budget.")
@click.option("--swa-full", is_flag=True, help="Sliding-window models: predict for the full-size SWA cache.")
@click.option("--json", "as_json", is_flag=True)
def inspect_cmd(model, n_ctx, n_ubatch, n_seq, cache_type, no_flash_attn, gpu_layers, mem, swa_full, as_json):
    """Architecture, heads, budgets, and predicted KV bytes full vs mixed for a context."""
    r = inspect_report(model, n_ctx, n_ubatch, n_seq, cache_type, not no_flash_attn, gpu_layers,
                       parse_size(mem) if mem is not None else None, swa_full)
    if as_json:
        click.echo(json.dumps(r, indent=1))
        return
    click.echo(f"model       {r['model']}")
    click.echo(f"arch        {r['arch']}: {r['n_layer']} layers x {r['n_head_kv'][0]} KV heads, head dim {r['head_dim_k']}")
    click.echo(f"budgets     {r['budget_source']}" + (f", method {r['method']}, sparsity {r['sparsity']}" if r["method"] else ""))
    if r["windows"]:
        click.echo(f"            sink {r['sink']}, windows {r['windows']}")
    if r["scores"]:
        click.echo("            head scores stored: any sparsity at load time (--kv-budget, kvtool.kv.sparsity)")
        click.echo("layers      " + " ".join(f"{p['full']}F{p['compressed']}c" for p in r["per_layer"]))
    for note in r["notes"]:
        click.echo(f"note        {note}")
    if r["beacon"]:
        cs = r["beacon"]["intervals"]
        click.echo(f"beacon      token {r['beacon']['token_id']}, every {r['beacon']['interval']} tokens"
                   + (f" (trained for {', '.join(map(str, cs))}: --beacon-interval C|auto)" if len(cs) > 1 else ""))
    click.echo(f"KV @ {r['n_ctx']} ctx, ubatch {r['n_ubatch']}, {r['n_seq']} seq, {r['cache_type']}"
               f"{'' if r['flash_attn'] else ', FA off'}:")
    swa = (f" (SWA layers {_mib(r['swa_bytes'])}, {r['swa_cells']} cells{', swa_full' if r['swa_full'] else ''})"
           if r["n_swa"] else "")
    click.echo(f"  full cache  {_mib(r['stock_bytes'])}{swa}")
    if r["mixed_active"]:
        rings = ", ".join(f"W{w}: {c} cells" for w, c in r["ring_cells"].items())
        swa_part = f" + SWA layers {_mib(r['swa_bytes'])}" if r["n_swa"] else ""
        click.echo(f"  mixed       {_mib(r['mixed_bytes'])} = full heads {_mib(r['full_bytes'])} + rings "
                   f"{_mib(r['ring_bytes'] - r['swa_bytes'])} ({rings}){swa_part}")
        click.echo(f"  ratio       {r['ratio']:.3f}")
    kv = r["mixed_bytes"] if r["mixed_active"] else r["stock_bytes"]
    if r["kv_fits"] is not None:
        click.echo(f"  {'fits' if r['kv_fits'] else 'does NOT fit'} in {_mib(r['mem_bytes'])} ({_mib(kv)} of KV)")
    o = r["offload"]
    if o:
        click.echo(f"offload     --gpu-layers {o['gpu_layers']}: {o['device_layers']}/{r['n_layer']} layers' KV on the "
                   f"device")
        click.echo(f"  device      {_mib(o['device_bytes'])} = weights {_mib(o['weights_device_bytes'])} + KV "
                   f"{_mib(o['kv_device_bytes'])} (compute buffers not included)")
        click.echo(f"  host KV     {_mib(o['kv_host_bytes'])}")
        if o["fits"] is not None:
            click.echo(f"  {'fits' if o['fits'] else 'does NOT fit'} in {_mib(o['mem_bytes'])} of device memory")


@click.command("plan")
@click.argument("model", type=click.Path())
@click.option("--mem", "mem", required=True, help="KV memory budget, e.g. 2GiB or 512MiB; with --gpu-layers, "
              "device memory (offloaded weights + their KV).")
@click.option("--sparsity", type=float, default=None, help="What-if: plan for a mask of this sparsity.")
@click.option("--ubatch", "n_ubatch", default=512, show_default=True)
@click.option("--ctx", "n_ctx", default="auto", show_default=True,
              help="The context --kv-budget is chosen for: N tokens, or auto (the largest that fits).")
@gpu_layers_option("Plan for N layers (or 'all') on the GPU: --mem is then device memory (default: none, a CPU run).")
@click.option("--parallel", "n_parallel", type=int, default=None,
              help="Concurrency: how many --ctx-token sequences fit (stock vs mixed, f16/q8_0/q4_0), and do N? "
                   "--ctx is then tokens per sequence (auto: 16384).")
@click.option("--unified", is_flag=True, help="With --parallel: one cache shared by all sequences (--kv-unified).")
@click.option("--swa-full", is_flag=True, help="Sliding-window models: plan for the full-size SWA cache.")
@click.option("--json", "as_json", is_flag=True)
def plan_cmd(model, mem, sparsity, n_ubatch, n_ctx, gpu_layers, n_parallel, unified, swa_full, as_json):
    """Largest context whose KV cache fits in --mem: full vs mixed vs mixed+q8_0, and what --kv-budget picks.
    With --parallel N: how many sequences of --ctx tokens fit."""
    if n_ctx != "auto":
        from ..validate import N_CTX_MAX, check_int

        try:
            n_ctx = check_int("--ctx", int(n_ctx), 1, N_CTX_MAX)
        except ValueError:
            raise KvtoolError(f"--ctx must be an integer or 'auto', got {n_ctx!r}") from None
    if n_parallel is not None or unified:
        if sparsity is not None or gpu_layers:
            raise KvtoolError("--parallel plans KV memory on one device; drop --sparsity and --gpu-layers")
        r = parallel_report(model, parse_size(mem), n_parallel, 16384 if n_ctx == "auto" else n_ctx, n_ubatch,
                            unified)
        if as_json:
            click.echo(json.dumps(r, indent=1))
        else:
            _echo_parallel(r)
        return
    r = plan_report(model, parse_size(mem), n_ubatch, sparsity, gpu_layers, n_ctx, swa_full)
    if as_json:
        click.echo(json.dumps(r, indent=1))
        return
    o = r["offload"]
    if o:
        click.echo(f"device memory {_mib(r['budget_bytes'])}, --gpu-layers {o['gpu_layers']} "
                   f"({o['device_layers']} layers' KV on the device): weights {_mib(o['weights_device_bytes'])}, "
                   f"the rest for KV; mask: {r['mask']}, ubatch {r['n_ubatch']}")
    else:
        click.echo(f"KV budget {_mib(r['budget_bytes'])}, mask: {r['mask']}, ubatch {r['n_ubatch']}")
    for note in r["notes"]:
        click.echo(f"  note: {note}")
    base = r["plans"]["full"]["max_ctx"]
    for name, p in r["plans"].items():
        gain = f"  ({p['max_ctx'] / base:.2f}x)" if base and name != "full" else ""
        dev = f", {_mib(p['kv_device_bytes'])} on the device" if "kv_device_bytes" in p else ""
        click.echo(f"  {name:11s} max ctx {p['max_ctx']:>9d}  ({_mib(p['kv_bytes'])}{dev}){gain}")
    if o and o["weights_device_bytes"] > r["budget_bytes"]:
        click.echo("  the offloaded weights alone do not fit: offload fewer layers (--gpu-layers N)")
    if r["n_ctx_train"]:
        click.echo(f"  (the model was trained with a {r['n_ctx_train']}-token context)")
    kb = r.get("kv_budget")
    if kb:
        click.echo(f"  --kv-budget --n-ctx {kb['n_ctx_requested']}: " +
                   kb.get("error", kb.get("summary")))
