"""``kvtool eval --ppl``: perplexity of the full and the mixed load of one file, and KL(full || mixed).

A long text is cut into windows of ``n_ctx`` tokens, each evaluated from an empty cache with logits for every
position; as in llama.cpp's ``perplexity`` tool the first token of a window is BOS and only the second half of each
window is scored, so every scored token has at least ``n_ctx/2`` tokens of context. Both loads see the same windows.
"""
from __future__ import annotations

import hashlib
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from ..errors import KvtoolError
from ..kv_variants import NAMES, kv_variant
from ..runtime.decode import eval_tokens
from ..runtime.handles import window_bos
from ..runtime.model import Model
from ..runtime.offload import parse_gpu_layers, resolve_gpu_layers
from .run import _budgets, _has_budgets, _progress, check_text, machine_info, resolve_variants

Echo = Callable[[str], None]


def default_ppl_text() -> Path:
    """``reasoning_gym/data/in_the_year_2889.txt`` (Project Gutenberg, 52,851 bytes of English prose)."""
    try:
        import reasoning_gym
    except ImportError:
        raise KvtoolError("the default text ships with reasoning-gym: pip install 'kvtool[train]', "
                          "or pass --ppl FILE.txt") from None
    p = Path(reasoning_gym.__file__).parent / "data" / "in_the_year_2889.txt"
    if not p.is_file():
        raise KvtoolError(f"{p} is missing from this reasoning-gym; pass --ppl FILE.txt")
    return p


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def run_ppl(model_path: str | os.PathLike, text_path: str | os.PathLike, n_ctx: int = 512,
            max_tokens: Optional[int] = None, n_ubatch: int = 512, cache_type: str = "f32",
            threads: Optional[int] = None, mixed: Optional[bool] = None, progress: bool = True,
            echo: Echo = lambda m: None, gpu_layers=None, kv_variants: Sequence[str] = ()) -> dict:
    """Perplexity of the full load and, when the file has budgets (or ``mixed=True``), of the mixed load, with the
    mean KL(full || mixed) per scored token. ``mixed=False`` computes the full perplexity only.
    ``kv_variants`` (``stock+q8_0``, ``mixed+q4_0``, ...; ``toolchain.kv_variants``) are further loads with their
    own cache type; each gets its perplexity and KL against the same full load at ``cache_type`` (the reference),
    under ``result["variants"]``. ``gpu_layers``: N, "all" or None (the runtime's default), resolved once after the
    input checks."""
    p = Path(model_path).expanduser()
    tp = Path(text_path).expanduser() if str(text_path) != "verne" else default_ppl_text()
    if not tp.is_file():
        raise KvtoolError(f"{tp}: no such text file")
    if n_ctx < 8:
        raise KvtoolError(f"--n-ctx must be >= 8 for --ppl, got {n_ctx}")
    [vfull] = resolve_variants([p], ["full"])
    b = _budgets(p)
    if mixed and not _has_budgets(b):
        resolve_variants([p], ["mixed"])  # raises the explained error
    do_mixed = _has_budgets(b) if mixed is None else bool(mixed)
    extras = []
    for name in dict.fromkeys(kv_variants):  # each once, in the order given
        kv = kv_variant(name)
        if kv is None or kv.cache is None:
            raise KvtoolError(f"unknown KV variant {name!r} for --ppl (choose from "
                              f"{', '.join(n for n in NAMES if '+' in n)})")
        if kv.mixed and not _has_budgets(b):
            resolve_variants([p], ["mixed"])  # raises the explained error
        extras.append(kv)
    parse_gpu_layers(gpu_layers)
    raw = tp.read_bytes()
    text = raw.decode("utf-8", errors="replace")
    gpu_layers = resolve_gpu_layers(gpu_layers)
    full = Model.load(p, n_ctx=n_ctx, n_threads=threads, n_ubatch=n_ubatch, cache_type=cache_type,
                      mixed=False if _has_budgets(b) else None, n_gpu_layers=gpu_layers)
    mix = None
    others: list = []  # (KVVariant, Model) of kv_variants
    try:
        if do_mixed:
            mix = Model.load(p, n_ctx=n_ctx, n_threads=threads, n_ubatch=n_ubatch, cache_type=cache_type, mixed=True,
                             n_gpu_layers=gpu_layers)
        for kv in extras:
            others.append((kv, Model.load(p, n_ctx=n_ctx, n_threads=threads, n_ubatch=n_ubatch, cache_type=kv.cache,
                                          mixed=kv.mixed if _has_budgets(b) else None, n_gpu_layers=gpu_layers)))
        check_text(full, text)
        toks = full.tokenize(text, add_bos=False)
        if max_tokens:
            toks = toks[:int(max_tokens)]
        n_chunks = len(toks) // n_ctx
        if n_chunks < 1:
            raise KvtoolError(f"{tp.name} has {len(toks)} tokens, fewer than one window of --n-ctx {n_ctx}")
        llm = full.llama
        bos = window_bos(llm)
        first = n_ctx // 2
        nll_f = nll_m = kl_sum = 0.0
        kl_max = 0.0
        agree = count = 0
        acc = {kv.name: {"nll": 0.0, "kl": 0.0, "kl_max": 0.0, "agree": 0} for kv, _ in others}
        bar = _progress(n_chunks, f"ppl {p.name}", progress)
        t0 = time.perf_counter()
        for c in range(n_chunks):
            w = list(toks[c * n_ctx:(c + 1) * n_ctx])
            if bos is not None:
                w[0] = bos
            tgt = np.asarray(w[first + 1:])
            full.reset()
            lf = _log_softmax(eval_tokens(llm, w, logits_all=True)[first:-1])
            nll_f -= float(lf[np.arange(len(tgt)), tgt].sum())
            if mix is not None:
                mix.reset()
                lm = _log_softmax(eval_tokens(mix.llama, w, logits_all=True)[first:-1])
                nll_m -= float(lm[np.arange(len(tgt)), tgt].sum())
                kl = (np.exp(lf) * (lf - lm)).sum(-1)
                kl_sum += float(kl.sum())
                kl_max = max(kl_max, float(kl.max()))
                agree += int((lf.argmax(-1) == lm.argmax(-1)).sum())
            for kv, om in others:
                om.reset()
                lo = _log_softmax(eval_tokens(om.llama, w, logits_all=True)[first:-1])
                a = acc[kv.name]
                a["nll"] -= float(lo[np.arange(len(tgt)), tgt].sum())
                kl = (np.exp(lf) * (lf - lo)).sum(-1)
                a["kl"] += float(kl.sum())
                a["kl_max"] = max(a["kl_max"], float(kl.max()))
                a["agree"] += int((lf.argmax(-1) == lo.argmax(-1)).sum())
            count += len(tgt)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        el = time.perf_counter() - t0
        res: dict[str, Any] = {
            "kvtool_ppl": 1, "model": str(p), "text": str(tp), "text_bytes": len(raw),
            "text_sha256": hashlib.sha256(raw).hexdigest(), "text_tokens": len(toks), "n_ctx": n_ctx,
            "windows": n_chunks, "scored_per_window": n_ctx - 1 - first, "tokens_scored": count,
            "cache_type": cache_type, "ppl_full": math.exp(nll_f / count), "time_s": round(el, 2),
            "machine": machine_info()}
        if mix is not None:
            st = mix.kv_stats()
            res.update({"ppl_mixed": math.exp(nll_m / count), "kl_full_mixed_mean": kl_sum / count,
                        "kl_full_mixed_max": kl_max, "top1_agreement": agree / count,
                        "allocated_kv_bytes_mixed": st["allocated_bytes"], "stock_kv_bytes": st["stock_bytes"]})
            if b is not None and b.head_window is not None:
                flat = [x for r in b.head_window for x in r]
                res.update({"compressed_heads": sum(1 for x in flat if x > 0), "kv_heads": len(flat), "sink": b.sink})
        if others:
            fs = full.kv_stats()
            rows = [{"variant": "full", "cache_type": cache_type, "ppl": res["ppl_full"], "kl_mean": 0.0,
                     "kl_max": 0.0, "top1_agreement": 1.0, "allocated_kv_bytes": fs["allocated_bytes"]}]
            if mix is not None:
                rows.append({"variant": "mixed", "cache_type": cache_type, "ppl": res["ppl_mixed"],
                             "kl_mean": res["kl_full_mixed_mean"], "kl_max": kl_max,
                             "top1_agreement": res["top1_agreement"], "allocated_kv_bytes": st["allocated_bytes"]})
            for kv, om in others:
                a = acc[kv.name]
                rows.append({"variant": kv.name, "cache_type": kv.cache, "ppl": math.exp(a["nll"] / count),
                             "kl_mean": a["kl"] / count, "kl_max": a["kl_max"], "top1_agreement": a["agree"] / count,
                             "allocated_kv_bytes": om.kv_stats()["allocated_bytes"]})
            res["variants"] = rows
        return res
    finally:
        full.close()
        if mix is not None:
            mix.close()
        for _, om in others:
            om.close()


def ppl_markdown(results: Sequence[dict]) -> str:
    head = ["model", "text", "tokens scored", "n_ctx", "ppl full", "ppl mixed", "KL(full‖mixed) mean", "KL max",
            "top-1 agree"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        m = r.get("ppl_mixed")
        lines.append("| " + " | ".join([
            Path(r["model"]).name, Path(r["text"]).name, str(r["tokens_scored"]), str(r["n_ctx"]),
            f"{r['ppl_full']:.4f}", f"{m:.4f}" if m is not None else "-",
            f"{r['kl_full_mixed_mean']:.3e}" if m is not None else "-",
            f"{r['kl_full_mixed_max']:.3e}" if m is not None else "-",
            f"{r['top1_agreement']:.4f}" if m is not None else "-"]) + " |")
    vrows = [(r, v) for r in results for v in r.get("variants", ())]
    if vrows:
        head = ["model", "variant", "cache", "KV MiB", "ppl", "KL(ref‖variant) mean", "KL max", "top-1 agree"]
        lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r, v in vrows:
            lines.append("| " + " | ".join([
                Path(r["model"]).name, v["variant"], v["cache_type"], f"{v['allocated_kv_bytes'] / 2**20:.2f}",
                f"{v['ppl']:.4f}", f"{v['kl_mean']:.3e}", f"{v['kl_max']:.3e}", f"{v['top1_agreement']:.4f}"]) + " |")
    return "\n".join(lines)
