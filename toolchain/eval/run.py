"""``kvtool eval``: task accuracy against KV memory through the runtime, and perplexity/KL fidelity.

Task mode (``run_eval``): for every model file and variant, ``n`` problems of a task (``toolchain.tasks``) are
generated greedily through the patched runtime and scored by the task's verifier. A variant is one load of a file:

* ``full``: ``kvtool.kv.enabled`` overridden to false (every head keeps its whole cache; same file, same weights);
* ``mixed``: overridden to true (the file's per-head budgets); a file without budgets cannot be run mixed;
* ``beacons``: the beacon loop (``toolchain.runtime.beacons``: every c tokens a beacon is decoded and the chunk
  behind it leaves the cache) with every head full; needs ``kvtool.beacon.*`` keys;
* ``mixed+beacons``: both, the file's per-head budgets and the beacon loop;
* ``auto`` (the default): the file as its metadata says; the row is labelled ``mixed``, ``beacons``,
  ``mixed+beacons`` or ``full`` accordingly. ``full`` and ``mixed`` never run the beacon loop.

Per variant it reports accuracy with a 95% Wilson interval, mean generated length, the fraction of generations that
hit the length cap, the fraction that degenerated into repetition (:func:`is_repetitive`: the last 64 tokens repeat
with a period <= 16), peak live KV bytes (cells in use at the end of a generation x bytes per cell of their head
group, measured with ``kvtool_kv_used_cells``; the cache only grows during one generation, so the end is the peak),
allocated KV bytes (``kvtool_kv_bytes``) next to what a stock cache would allocate, and prefill/decode tok/s. Tasks
may register extra per-problem metrics (:func:`register_metrics`; the CPU reasoner adds token accuracy).

Generation is greedy through the runtime's decode core (``runtime.decode.greedy``: argmax of the last logits, stop at
an end-of-generation token, the chat template's stop strings, or ``max_tokens``), with an empty cache for every
problem: the token ids are exact (the repetition detector needs them) and each problem's live cells are its own.
Beacon variants run the same greedy rule on the core's beacon path (``greedy_beacons``; the beacon id is never
chosen); their peak live KV is the most cells the sequence held at any point (prompt + beacons + the open chunk), not
the count at the end, because eviction makes the cache shrink during a generation.

Resumable: with ``out``, each problem's record is appended to ``<out stem>.jsonl`` as soon as it is done, keyed by a
hash of (model path, size, mtime, variant, task, seed, max_tokens, n_ctx, n_ubatch, cache type) and the problem's
index and question; a rerun skips what is there and only loads a model if it has work left.

Perplexity mode is :mod:`toolchain.eval.ppl`.
"""
from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from converters.gguf_budgets import open_gguf, read_budgets

from .. import __version__
from ..errors import KvtoolError
from ..heads import write_atomic
from ..kv_variants import kv_variant
from ..runtime.decode import greedy, greedy_beacons
from ..runtime.kv_usage import bytes_per_cell, live_bytes, mixed_active, retained_bytes
from ..runtime.library import runtime_info
from ..runtime.model import Model
from ..runtime.offload import parse_gpu_layers, resolve_gpu_layers
from ..tasks import INSTRUCTION, build_prompt, make_dataset, needs_tokenizer, score, task_metrics
from .records import check_writable, jsonl_path, qhash, read_records, run_key
from .report import plot_pareto
from .stats import is_repetitive, wilson

# plus the KV-quantization variants of toolchain.kv_variants: stock+q8_0, stock+q4_0, mixed+q8_0, mixed+q4_0
VARIANTS = ("auto", "full", "mixed", "beacons", "mixed+beacons", "stock+q8_0", "stock+q4_0", "mixed+q8_0",
            "mixed+q4_0")

Echo = Callable[[str], None]


# --- variants ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Variant:
    path: Path
    name: str                 # "full" | "mixed" | "beacons" | "mixed+beacons" (auto resolved to what the file does)
    mixed: Optional[bool]     # Model.load(mixed=...)
    beacons: bool = False     # generate through the beacon loop
    cache: Optional[str] = None  # KV cache type of this variant (stock+q8_0 ...); None: the run's --cache-type

    def cache_type(self, default: str) -> str:
        return self.cache or default

    @property
    def label(self) -> str:
        return f"{self.path.name}:{self.name}"


def _budgets(path: Path):
    return read_budgets(path)


def _has_budgets(b) -> bool:
    return b is not None and b.head_window is not None


def _has_beacons(b) -> bool:
    return b is not None and getattr(b, "beacon_token_id", None) is not None


def resolve_variants(models: Sequence[str | os.PathLike], variants: Optional[Sequence[str]] = None) -> list[Variant]:
    """One :class:`Variant` per (file, variant). Errors name the file and say how to fix it."""
    if not models:
        raise KvtoolError("give at least one MODEL.gguf")
    names = list(variants) if variants else ["auto"]
    for v in names:
        if v not in VARIANTS:
            raise KvtoolError(f"unknown variant {v!r} (choose from {', '.join(VARIANTS)})")
    out: list[Variant] = []
    for m in models:
        p = Path(m).expanduser()
        if not p.exists():
            raise KvtoolError(f"{p}: no such file")
        if p.is_dir():
            raise KvtoolError(f"{p}: is a directory; kvtool eval runs GGUF files (kvtool convert makes one)")
        b = _budgets(p)
        for v in names:
            if "mixed" in v and not _has_budgets(b):
                raise KvtoolError(f"{p.name} has no kvtool head budgets, so it has no {v} variant: write a mask "
                                  f"into it with `kvtool convert {p.name} --mask heads.json` (or drop {v!r} "
                                  f"from --variants)")
            if "beacons" in v and not _has_beacons(b):
                raise KvtoolError(f"{p.name} has no kvtool.beacon keys, so it has no {v} variant: convert a beacon "
                                  f"checkpoint (`kvtool train beacons`, then `kvtool convert CKPT_DIR`) or drop "
                                  f"{v!r} from --variants")
            if v == "auto":
                mixed, beacons = mixed_active(b), _has_beacons(b)
                name = "mixed+beacons" if mixed and beacons else "mixed" if mixed else "beacons" if beacons else "full"
                out.append(Variant(p, name, None, beacons))
            elif v.endswith(("+q8_0", "+q4_0")):
                kv = kv_variant(v)
                out.append(Variant(p, v, kv.mixed, False, kv.cache))
            else:
                out.append(Variant(p, v, "mixed" in v, "beacons" in v))
    seen, uniq = set(), []
    for v in out:
        key = (str(v.path.resolve()), v.name)
        if key not in seen:
            seen.add(key)
            uniq.append(v)
    return uniq


# --- machine -------------------------------------------------------------------------------------------------------
def machine_info() -> dict:
    """nproc, CPU model and SIMD flags, OS, date: what every benchmark table names."""
    info: dict[str, Any] = {"nproc": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
                            "platform": platform.platform(), "python": platform.python_version(),
                            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        model = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), None)
        if model:
            info["cpu"] = model
        flags = next((set(ln.split(":", 1)[1].split()) for ln in lines if ln.startswith("flags")), set())
        keep = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16",
                "amx_tile", "amx_bf16", "amx_int8")
        info["cpu_flags"] = [f for f in keep if f in flags]
    except OSError:
        pass
    info["kvtool"] = __version__
    try:
        ri = runtime_info()
        info["runtime"] = {k: ri.get(k) for k in ("llama_cpp_python", "runtime_patched", "patch_hash", "backend")}
    except Exception:  # pragma: no cover - doctor reports this properly
        pass
    return info


_CHARSETS: dict[str, Optional[frozenset]] = {}


def _charset(path: Path) -> Optional[frozenset]:
    """For a SentencePiece ("llama") vocabulary without byte tokens: the characters it has as single pieces.

    llama.cpp's SPM tokenizer falls back to ``<0xXX>`` byte tokens for characters it cannot piece together and
    *aborts the process* (``std::out_of_range``) when those tokens do not exist, as in small hand-made vocabularies
    (the CPU reasoner's). Texts are checked against this set first. None means no check is needed."""
    key = str(path.resolve())
    if key not in _CHARSETS:
        with open_gguf(path) as h:
            kind = h.value("tokenizer.ggml.model", None)
            toks = h.value("tokenizer.ggml.tokens", None)
            types = h.value("tokenizer.ggml.token_type", None)
        cs = None
        if kind == "llama" and toks is not None and types is not None and 6 not in set(types):
            cs = frozenset(t.replace("\u2581", " ") for t in toks if len(t) == 1)
        _CHARSETS[key] = cs
    return _CHARSETS[key]


def check_text(model, text: str, what: str = "text") -> None:
    """KvtoolError instead of a llama.cpp abort for characters the vocabulary cannot encode."""
    cs = _charset(Path(model.path))
    if cs is None:
        return
    missing = sorted({c for c in text if c not in cs})
    if missing:
        shown = "".join(missing[:20])
        raise KvtoolError(f"{model.name}: the {what} has characters its vocabulary cannot encode (no byte fallback, "
                          f"llama.cpp would abort): {shown!r}{' ...' if len(missing) > 20 else ''}")


def _prompt_tokens(model, problem) -> tuple[list[int], list[str]]:
    """Prompt ids and stop strings: a verbatim prompt as is (BOS as the model says), else the GGUF's chat template
    (system instruction + question; user-only if the template rejects a system role), else plain text."""
    if problem.prompt is None and model.has_chat_template:
        msgs = [{"role": "system", "content": INSTRUCTION}, {"role": "user", "content": problem.question}]
        try:
            return model.render_chat(msgs)
        except KvtoolError:
            return model.render_chat([{"role": "user", "content": f"{INSTRUCTION}\n\n{problem.question}"}])
    text, _ = build_prompt(problem, None)
    check_text(model, text, "prompt")
    return model.tokenize(text), []


def _token_counter(model) -> Callable[[str], int]:
    """``count_tokens`` for a task sized in model tokens: the prompt as :func:`_prompt_tokens` encodes a verbatim
    prompt, checked first so a vocabulary without byte fallback gives an error, not a llama.cpp abort."""
    def count(text: str) -> int:
        check_text(model, text, "prompt")
        return len(model.tokenize(text))
    return count


# --- task evaluation -----------------------------------------------------------------------------------------------
def run_eval(models: Sequence[str | os.PathLike], task: str, n: int = 200, seed: int = 0,
             variants: Optional[Sequence[str]] = None, max_tokens: int = 512, n_ctx: Optional[int] = None,
             n_ubatch: int = 512, cache_type: str = "f16", threads: Optional[int] = None,
             out: Optional[str | os.PathLike] = None, plot: Optional[str | os.PathLike] = None,
             progress: bool = True, echo: Echo = lambda m: None, gpu_layers=None,
             kv_budget: Optional[str] = None, beacon_interval=None, beacon_budget: Optional[int] = None) -> dict:
    """Evaluate every (file, variant) on ``n`` problems of ``task``; returns the result dict (also written to
    ``out`` as JSON when given, with the per-problem JSONL next to it). ``gpu_layers``: N, "all" or None (the
    runtime's default), resolved once after the input checks. ``beacon_interval``/``beacon_budget``: what the beacon
    variants load with (``Model.load``; C, or "auto" within the budget in bytes)."""
    if n < 1:
        raise KvtoolError(f"--n must be >= 1, got {n}")
    if max_tokens < 1:
        raise KvtoolError(f"--max-tokens must be >= 1, got {max_tokens}")
    if kv_budget is not None:
        from ..validate import parse_size

        kv_budget = parse_size(kv_budget)  # bytes: a bad size fails before anything loads
    if n_ctx is not None and n_ctx < 16:
        raise KvtoolError(f"--n-ctx must be >= 16, got {n_ctx}")
    out_p = check_writable(out, "output")
    plot_p = check_writable(plot, "plot")
    if out_p is not None and plot_p is not None and out_p.resolve() == plot_p.resolve():
        raise KvtoolError("--out and --plot name the same file")
    parse_gpu_layers(gpu_layers)
    vs = resolve_variants(models, variants)
    per_file = needs_tokenizer(task)
    # a task sized in model tokens (passkey) gets its problems per file, from that file's tokenizer, in the loop
    problems = make_dataset(task, 0 if per_file else n, seed)  # bad task options fail here, before any load
    file_problems: dict[str, list] = {}
    metric_fn = task_metrics(task)
    log_p = jsonl_path(out_p) if out_p is not None else None
    if log_p is not None:
        check_writable(log_p, "record log")
    done = read_records(log_p)
    log_f = None
    if log_p is not None:
        log_f = open(log_p, "a+b")
        if log_f.tell() > 0:  # a line torn by an interrupt must not swallow the next record
            log_f.seek(-1, os.SEEK_END)
            if log_f.read(1) != b"\n":
                log_f.write(b"\n")
        log_f.close()
        log_f = open(log_p, "a", encoding="utf-8")
    all_recs: dict[str, list[dict]] = {}
    gpu_layers = resolve_gpu_layers(gpu_layers)

    def bkw(v: Variant) -> dict:
        return {"beacon_interval": beacon_interval, "beacon_budget": beacon_budget} if v.beacons else {}

    try:
        for v in vs:
            ctx_len = n_ctx
            model = None
            vcache = v.cache_type(cache_type)
            try:
                fkey = str(v.path.resolve())
                size_here = per_file and fkey not in file_problems
                if size_here or ctx_len is None:
                    # the model's tokenizer sizes the problems (per_file) and measures the prompts (no --n-ctx):
                    # one small load serves both
                    model = Model.load(v.path, n_ctx=256, n_threads=threads, n_ubatch=n_ubatch,
                                       cache_type=vcache, mixed=v.mixed, beacons=v.beacons,
                                       n_gpu_layers=gpu_layers, **bkw(v))
                    if size_here:
                        file_problems[fkey] = make_dataset(task, n, seed, count_tokens=_token_counter(model))
                    problems = file_problems[fkey] if per_file else problems
                    if ctx_len is None:
                        longest = max(len(_prompt_tokens(model, p)[0]) for p in problems)
                        ctx_len = longest + max_tokens + 1
                    model.close()
                    model = None
                elif per_file:
                    problems = file_problems[fkey]
                key = run_key(v, task, seed, max_tokens, ctx_len, n_ubatch, vcache, kv_budget)
                if v.beacons and (beacon_interval is not None or beacon_budget is not None):
                    key = key + f":c={beacon_interval}:b={beacon_budget}"  # other records of the same file stay valid
                recs: list[Optional[dict]] = [done.get((key, p.index, qhash(p))) for p in problems]
                todo = [i for i, r in enumerate(recs) if r is None]
                if todo:
                    model = Model.load(v.path, n_ctx=ctx_len, n_threads=threads, n_ubatch=n_ubatch,
                                       cache_type=vcache, mixed=v.mixed, beacons=v.beacons, n_gpu_layers=gpu_layers,
                                       kv_budget=None if v.beacons and beacon_interval == "auto" else kv_budget,
                                       **bkw(v))
                    stats = model.kv_stats()
                    bpc = bytes_per_cell(model)
                    bar = _progress(len(todo), f"{v.label}", progress, skipped=n - len(todo))
                    try:
                        for i in todo:
                            p = problems[i]
                            toks, stops = _prompt_tokens(model, p)
                            if v.beacons:
                                g = greedy_beacons(model, toks, max_tokens, stops)
                                _, _, ring_c = live_bytes(model, bpc)
                                bs = g["beacon_stats"]
                                # the full-head cells peak mid-generation (eviction shrinks them); rings: end count
                                full_c = bs["peak_full_cells"] if bs["peak_full_cells"] is not None else bs["peak_live_cells"]
                                live = int(round(full_c * bpc[0] + ring_c * bpc[1]))
                            else:
                                g = greedy(model, toks, max_tokens, stops)
                                live, full_c, ring_c = live_bytes(model, bpc)
                            reward = score(p, g["text"])
                            # cells the sequence had at its largest (the beacon loop evicts, so its peak, not its length)
                            n_seen = g["beacon_stats"]["peak_live_cells"] if v.beacons else g["prompt_tokens"] + len(g["ids"])
                            retained = retained_bytes(model, n_seen, full_c, bool(stats["mixed"]))
                            rec = {"key": key, "index": p.index, "qhash": qhash(p), "model": str(v.path),
                                   "variant": v.name, "cache_type": vcache, "reward": reward, "gen_tokens": len(g["ids"]),
                                   "prompt_tokens": g["prompt_tokens"], "finish": g["finish"],
                                   "repetitive": is_repetitive(g["ids"]), "live_kv_bytes": live,
                                   "live_full_cells": full_c, "live_ring_cells": ring_c, "retained_kv_bytes": retained,
                                   "allocated_kv_bytes": stats["allocated_bytes"], "stock_kv_bytes": stats["stock_bytes"],
                                   "mixed_active": stats["mixed"], "prefill_s": round(g["prefill_s"], 6),
                                   "decode_s": round(g["decode_s"], 6), "n_decodes": g["n_decodes"],
                                   "completion": g["text"]}
                            if p.info:
                                rec["problem"] = p.info
                            if v.beacons:
                                rec["beacons"] = {k: g["beacon_stats"][k] for k in
                                                  ("interval", "beacons", "evicted", "peak_live_cells", "next_pos",
                                                   "budget_cells", "switches")}
                            if metric_fn is not None:
                                try:
                                    rec["metrics"] = {k: float(x) for k, x in metric_fn(p, g["text"]).items()}
                                except Exception:  # a metric choking on odd output is not a crash
                                    rec["metrics"] = {}
                            recs[i] = rec
                            if log_f is not None:
                                log_f.write(json.dumps(rec) + "\n")
                                log_f.flush()
                            if bar is not None:
                                bar.update(1)
                                k = sum(1 for r in recs if r is not None and r["reward"] >= 1.0)
                                m = sum(1 for r in recs if r is not None)
                                bar.set_postfix_str(f"acc {k}/{m}")
                    finally:
                        if bar is not None:
                            bar.close()
                else:
                    echo(f"[kvtool] {v.label}: all {n} problems already in {log_p}")
            finally:
                if model is not None:
                    model.close()
            all_recs[v.label] = [r for r in recs if r is not None]
    finally:
        if log_f is not None:
            log_f.close()
    rows = [summarize(v, all_recs[v.label]) for v in vs]
    for v, row in zip(vs, rows):
        if v.beacons and beacon_interval is not None:
            row["beacon_interval"] = beacon_interval  # asked for; "auto" rows also report the switches
        if v.beacons and beacon_interval == "auto":
            recs = all_recs[v.label]
            row["kv_budget_bytes"] = beacon_budget
            row["budget_cells"] = recs[0]["beacons"].get("budget_cells") if recs else None
            row["switched_frac"] = (sum(1 for r in recs if r["beacons"].get("switches")) / len(recs)) if recs else None
            row["final_intervals"] = sorted({r["beacons"]["interval"] for r in recs})
    result = {"kvtool_eval": 1, "task": task, "n": n, "seed": seed, "max_tokens": max_tokens, "n_ctx": n_ctx,
              "kv_budget": kv_budget,
              "n_ubatch": n_ubatch, "cache_type": cache_type, "threads": threads, "machine": machine_info(),
              "records": str(log_p) if log_p else None, "rows": rows}
    if out_p is not None:
        write_atomic(out_p, (json.dumps(result, indent=1) + "\n").encode())
    if plot_p is not None:
        plot_pareto(rows, plot_p, title=f"{task} (n={n}, seed={seed})")
    return result


def _progress(total: int, desc: str, enabled: bool, skipped: int = 0):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm ships with the core deps
        return None
    return tqdm(total=total, desc=desc + (f" (+{skipped} resumed)" if skipped else ""), unit="problem", leave=True,
                dynamic_ncols=True)


def summarize(v: Variant, recs: Sequence[dict]) -> dict:
    """One table row from a variant's per-problem records."""
    n = len(recs)
    k = sum(1 for r in recs if r["reward"] >= 1.0)
    lo, hi = wilson(k, n)
    gen = [r["gen_tokens"] for r in recs]
    capped = sum(1 for r in recs if r["finish"] == "length")
    rep = sum(1 for r in recs if r["repetitive"])
    degen = sum(1 for r in recs if r["finish"] == "length" or r["repetitive"])
    pre_t = sum(r["prompt_tokens"] for r in recs)
    pre_s = sum(r["prefill_s"] for r in recs)
    dec_n = sum(r["n_decodes"] for r in recs)
    dec_s = sum(r["decode_s"] for r in recs)
    b = None
    try:
        b = _budgets(v.path)
    except KvtoolError:
        pass
    row: dict[str, Any] = {
        "model": v.path.name, "path": str(v.path), "variant": v.name, "label": v.label,
        "cache_type": recs[-1].get("cache_type", v.cache) if recs else v.cache, "n": n, "correct": k,
        "accuracy": k / n if n else None, "ci95": [lo, hi],
        "mean_gen_tokens": float(np.mean(gen)) if gen else None,
        "capped_frac": capped / n if n else None, "repeat_frac": rep / n if n else None,
        "degenerate_frac": degen / n if n else None,
        "peak_live_kv_bytes": max((r["live_kv_bytes"] for r in recs), default=None),
        "peak_live_cells": max((r["live_full_cells"] + r["live_ring_cells"] for r in recs), default=None),
        "peak_retained_kv_bytes": max((r.get("retained_kv_bytes", r["live_kv_bytes"]) for r in recs), default=None),
        "mean_live_kv_bytes": float(np.mean([r["live_kv_bytes"] for r in recs])) if recs else None,
        "allocated_kv_bytes": recs[-1]["allocated_kv_bytes"] if recs else None,
        "stock_kv_bytes": recs[-1]["stock_kv_bytes"] if recs else None,
        "mixed_active": bool(recs[-1]["mixed_active"]) if recs else None,
        "prefill_tok_s": pre_t / pre_s if pre_s > 0 else None,
        "decode_tok_s": dec_n / dec_s if dec_s > 0 else None,
    }
    row["method"] = (b.method or "unknown") if (b is not None and row["mixed_active"]) else "full"
    if (row["mixed_active"] and b is not None and b.head_window is not None
            and all(w > 0 for r_ in b.head_window for w in r_)):
        row["method"] = "streaming"  # every head compressed: which heads were "chosen" no longer matters
    if v.beacons:
        row["method"] = "beacons" if not row["mixed_active"] else "beacons+" + row["method"]
        row["beacon_interval"] = int(b.beacon_interval) if b is not None else None
        row["mean_beacons"] = float(np.mean([r.get("beacons", {}).get("beacons", 0) for r in recs])) if recs else None
    if b is not None and b.head_window is not None:
        flat = [w for r in b.head_window for w in r]
        row["compressed_heads"] = sum(1 for w in flat if w > 0)
        row["kv_heads"] = len(flat)
        row["sink"] = b.sink
        row["windows"] = sorted({w for w in flat if w > 0})
    metrics: dict[str, list[float]] = {}
    for r in recs:
        for name, x in (r.get("metrics") or {}).items():
            metrics.setdefault(name, []).append(x)
    if metrics:
        row["metrics"] = {name: float(np.mean(xs)) for name, xs in metrics.items()}
    return row


