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

Generation is a plain greedy loop on ``llama_decode`` (argmax of the last logits, stop at an end-of-generation token,
the chat template's stop strings, or ``max_tokens``), with an empty cache for every problem: the token ids are exact
(the repetition detector needs them) and each problem's live cells are its own. Beacon variants generate with the
same greedy rule through :class:`~toolchain.runtime.beacons.BeaconGenerator` (the beacon id is never chosen); their
peak live KV is the most cells the sequence held at any point (prompt + beacons + the open chunk), not the count at
the end, because eviction makes the cache shrink during a generation.

Resumable: with ``out``, each problem's record is appended to ``<out stem>.jsonl`` as soon as it is done, keyed by a
hash of (model path, size, mtime, variant, task, seed, max_tokens, n_ctx, n_ubatch, cache type) and the problem's
index and question; a rerun skips what is there and only loads a model if it has work left.

Perplexity mode (``run_ppl``): a long text (e.g. ``reasoning_gym/data/in_the_year_2889.txt``, Jules and Michel Verne's
"In the Year 2889", shipped with reasoning-gym) is cut into windows of ``n_ctx`` tokens, each evaluated from an empty
cache with logits for every position; as in llama.cpp's ``perplexity`` tool the first token of a window is BOS and
only the second half of each window is scored, so every scored token has at least ``n_ctx/2`` tokens of context.
The full and the mixed load of the same file see the same windows, giving both perplexities, the mean
KL(full || mixed) per scored token and top-1 agreement.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from .errors import KvtoolError

__all__ = [
    "REPEAT_TAIL", "REPEAT_MAX_PERIOD", "VARIANTS", "wilson", "is_repetitive", "register_metrics", "Variant",
    "resolve_variants", "run_eval", "summarize", "markdown", "plot_pareto", "run_ppl", "ppl_markdown",
    "machine_info", "default_ppl_text", "jsonl_path",
]

Z95 = 1.959963984540054
REPEAT_TAIL = 64
REPEAT_MAX_PERIOD = 16
VARIANTS = ("auto", "full", "mixed", "beacons", "mixed+beacons")
# Modules that register local tasks with toolchain.tasks.register_task when imported (cheap imports).
TASK_PROVIDERS = ("toolchain.train.reasoner",)

Echo = Callable[[str], None]
MetricFn = Callable[[Any, str], dict]
_METRICS: dict[str, MetricFn] = {}


# --- statistics ----------------------------------------------------------------------------------------------------
def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for ``k`` successes in ``n`` trials (95% by default). ``n == 0`` gives (0, 1)."""
    if n < 0 or k < 0 or k > n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = k / n
    z2 = z * z
    den = 1 + z2 / n
    center = (p + z2 / (2 * n)) / den
    half = z / den * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, center - half), min(1.0, center + half)


def is_repetitive(tokens: Sequence[int], tail: int = REPEAT_TAIL, max_period: int = REPEAT_MAX_PERIOD) -> bool:
    """True iff the last ``tail`` tokens are periodic with some period ``p <= max_period`` (``t[i] == t[i+p]`` for
    every pair inside the tail). Fewer than ``tail`` tokens are never called repetitive."""
    if len(tokens) < tail:
        return False
    t = list(tokens[-tail:])
    return any(all(t[i] == t[i + p] for i in range(tail - p)) for p in range(1, max_period + 1))


def register_metrics(task: str, fn: MetricFn) -> None:
    """Extra per-problem metrics for a task name: ``fn(problem, completion) -> {name: float}`` (averaged per row)."""
    _METRICS[task] = fn


def load_task_providers() -> None:
    import importlib

    for mod in TASK_PROVIDERS:
        try:
            importlib.import_module(mod)
        except ImportError:  # pragma: no cover - an optional provider missing its extras
            pass


# --- variants ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Variant:
    path: Path
    name: str                 # "full" | "mixed" | "beacons" | "mixed+beacons" (auto resolved to what the file does)
    mixed: Optional[bool]     # Model.load(mixed=...)
    beacons: bool = False     # generate through the beacon loop

    @property
    def label(self) -> str:
        return f"{self.path.name}:{self.name}"


def _budgets(path: Path):
    from converters.gguf_budgets import read_budgets

    return read_budgets(path)


def _has_budgets(b) -> bool:
    return b is not None and b.head_window is not None


def _has_beacons(b) -> bool:
    return b is not None and getattr(b, "beacon_token_id", None) is not None


def _mixed_active(b) -> bool:
    return _has_budgets(b) and bool(getattr(b, "enabled", True)) and any(w > 0 for row in b.head_window for w in row)


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
                mixed, beacons = _mixed_active(b), _has_beacons(b)
                name = "mixed+beacons" if mixed and beacons else "mixed" if mixed else "beacons" if beacons else "full"
                out.append(Variant(p, name, None, beacons))
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
    try:
        from . import __version__

        info["kvtool"] = __version__
    except ImportError:  # pragma: no cover
        pass
    try:
        from .runtime.library import runtime_info

        ri = runtime_info()
        info["runtime"] = {k: ri.get(k) for k in ("llama_cpp_python", "runtime_patched", "patch_hash", "backend")}
    except Exception:  # pragma: no cover - doctor reports this properly
        pass
    return info


# --- runtime helpers -----------------------------------------------------------------------------------------------
def _decode(llm, tokens: Sequence[int], logits_all: bool = False) -> np.ndarray:
    """Evaluate ``tokens`` after what the context holds; returns the last row of logits, or all rows ``[n, vocab]``.
    Keeps ``llm.n_tokens``/``input_ids`` in step so ``Model.generate`` stays correct afterwards."""
    n_vocab = llm.n_vocab()
    rows = []
    last = None
    for i in range(0, len(tokens), llm.n_batch):
        chunk = list(tokens[i:i + llm.n_batch])
        n_past = llm.n_tokens
        llm._batch.set_batch(batch=chunk, n_past=n_past, logits_all=logits_all)
        llm._ctx.decode(llm._batch)
        llm.input_ids[n_past:n_past + len(chunk)] = chunk
        llm.n_tokens = n_past + len(chunk)
        n_out = len(chunk) if logits_all else 1
        arr = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_out * n_vocab,)).reshape(n_out, n_vocab)
        if logits_all:
            rows.append(arr.copy())
        else:
            last = arr[-1].copy()
    if logits_all:
        return np.concatenate(rows, 0)
    return last


def _bytes_per_cell(model) -> tuple[float, float]:
    """(bytes per cell of the full-head cache, bytes per cell of the rings) for this load's KV settings."""
    from .runtime.library import kv_bytes, kv_groups
    from .runtime.memory import _cache_bytes

    dims, b = model.dims, model.budgets
    ct = model.cache_type
    ctx = model.llama._ctx.ctx
    active, _, ring_b = kv_bytes(ctx)
    if not active:
        return float(_cache_bytes(dims, dims.n_head_kv, 1, 1, ct, ct, model.flash_attn)), 0.0
    groups = kv_groups(ctx)
    windows = {w for w, _ in groups}
    full_pl = [sum(1 for w in row if w == 0 or w not in windows) for row in b.head_window]
    full = float(_cache_bytes(dims, full_pl, 1, 1, ct, ct, model.flash_attn)) if any(full_pl) else 0.0
    ring_cells = sum(c for w, c in groups if w > 0)
    return full, (ring_b / ring_cells if ring_cells else 0.0)


def _retained_bytes(model, n_tokens: int, full_cells: int, mixed_on: bool) -> int:
    """KV bytes a tight cache would need for what attention can still see: the full heads' live cells plus, per
    window ``w``, ``min(n_tokens, sink + w)`` cells of that window's heads. The runtime's rings are larger (sized
    ``pad256(W + S + ubatch)`` and, as llama.cpp's SWA cache, cleared only when overwritten), so for short sequences
    their used cells overstate what a head retains; this is the measure to compare methods at equal memory."""
    from .runtime.memory import _cache_bytes

    dims, b, ct = model.dims, model.budgets, model.cache_type
    full = float(_cache_bytes(dims, dims.n_head_kv, 1, 1, ct, ct, model.flash_attn))
    if not mixed_on or not _mixed_active(b):
        return int(round(full_cells * full))
    total = 0.0
    full_pl = [sum(1 for w in row if w == 0) for row in b.head_window]
    if any(full_pl):
        total += full_cells * _cache_bytes(dims, full_pl, 1, 1, ct, ct, model.flash_attn)
    for w in sorted({w for row in b.head_window for w in row if w > 0}):
        pl = [sum(1 for x in row if x == w) for row in b.head_window]
        total += min(n_tokens, b.sink + w) * _cache_bytes(dims, pl, 1, 1, ct, ct, model.flash_attn)
    return int(round(total))


def _live_bytes(model, bpc: tuple[float, float]) -> tuple[int, int, int]:
    from .runtime.library import kv_used_cells

    full_c, ring_c = kv_used_cells(model.llama._ctx.ctx)
    return int(round(full_c * bpc[0] + ring_c * bpc[1])), full_c, ring_c


_CHARSETS: dict[str, Optional[frozenset]] = {}


def _charset(path: Path) -> Optional[frozenset]:
    """For a SentencePiece ("llama") vocabulary without byte tokens: the characters it has as single pieces.

    llama.cpp's SPM tokenizer falls back to ``<0xXX>`` byte tokens for characters it cannot piece together and
    *aborts the process* (``std::out_of_range``) when those tokens do not exist, as in small hand-made vocabularies
    (the CPU reasoner's). Texts are checked against this set first. None means no check is needed."""
    key = str(path.resolve())
    if key not in _CHARSETS:
        from converters.gguf_budgets import open_gguf

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
    from .tasks import INSTRUCTION, build_prompt

    if problem.prompt is None and model.has_chat_template:
        msgs = [{"role": "system", "content": INSTRUCTION}, {"role": "user", "content": problem.question}]
        try:
            return model.render_chat(msgs)
        except KvtoolError:
            return model.render_chat([{"role": "user", "content": f"{INSTRUCTION}\n\n{problem.question}"}])
    text, _ = build_prompt(problem, None)
    check_text(model, text, "prompt")
    return model.tokenize(text), []


def _cut_at_stop(model, ids: Sequence[int], stops: Sequence[str]) -> Optional[str]:
    """The text of ``ids`` up to the first stop string, or None while no stop string has appeared."""
    if not stops:
        return None
    t = model.detokenize(ids)
    hit = [t.index(s) for s in stops if s in t]
    return t[:min(hit)] if hit else None


def greedy_beacons(model, tokens: Sequence[int], max_tokens: int, stops: Sequence[str] = ()) -> dict:
    """:func:`greedy` through the beacon loop: the same argmax rule with the beacon id banned, a beacon after every
    c visible tokens and the chunk behind it evicted. Adds the loop's counters (``beacon_stats``)."""
    from .runtime.beacons import BeaconGenerator

    b = model.budgets
    gen = BeaconGenerator(model, int(b.beacon_token_id), int(b.beacon_interval))
    model.reset()
    out: list[int] = []
    text = None
    finish = None
    t0 = time.perf_counter()
    t1 = None
    try:
        for tok in gen.generate(tokens, max_tokens=max_tokens, temperature=0.0):
            if t1 is None:
                t1 = time.perf_counter()  # the first token comes right after the prompt's decode
            out.append(tok)
            text = _cut_at_stop(model, out, stops)
            if text is not None:
                finish = "stop"
                break
    finally:
        gen.close()
    t2 = time.perf_counter()
    st = gen.stats
    return {"ids": out, "text": model.detokenize(out) if text is None else text,
            "finish": finish or ("stop" if st.finish_reason == "stop" else "length"),
            "prompt_tokens": len(tokens), "prefill_s": (t1 or t2) - t0, "decode_s": t2 - (t1 or t2),
            "n_decodes": max(0, len(out) - 1) + st.beacons, "beacon_stats": st.as_dict()}


def greedy(model, tokens: Sequence[int], max_tokens: int, stops: Sequence[str] = ()) -> dict:
    """Greedy generation from an empty cache. Returns ids, text, finish ("stop"|"length"), timings."""
    import llama_cpp

    llm = model.llama
    model.reset()
    room = llm.n_ctx() - len(tokens)
    if room < 1:
        raise KvtoolError(f"prompt is {len(tokens)} tokens but the context holds {llm.n_ctx()}: raise --n-ctx")
    limit = min(int(max_tokens), room)
    vocab = llm._model.vocab
    t0 = time.perf_counter()
    logits = _decode(llm, tokens)
    t1 = time.perf_counter()
    out: list[int] = []
    finish = "length"
    n_decodes = 0
    text = None
    while True:
        tok = int(np.argmax(logits))
        if llama_cpp.llama_vocab_is_eog(vocab, tok):
            finish = "stop"
            break
        out.append(tok)
        text = _cut_at_stop(model, out, stops)
        if text is not None:
            finish = "stop"
            break
        if len(out) >= limit:
            break
        logits = _decode(llm, [tok])
        n_decodes += 1
    t2 = time.perf_counter()
    return {"ids": out, "text": model.detokenize(out) if text is None else text, "finish": finish,
            "prompt_tokens": len(tokens), "prefill_s": t1 - t0, "decode_s": t2 - t1, "n_decodes": n_decodes}


# --- resumable records ---------------------------------------------------------------------------------------------
def jsonl_path(out: str | os.PathLike) -> Path:
    """The per-problem log next to ``out``: ``results.json`` -> ``results.jsonl``."""
    p = Path(out)
    return p.with_suffix(".jsonl") if p.suffix.lower() != ".jsonl" else p.with_suffix(".records.jsonl")


def _run_key(v: Variant, task: str, seed: int, max_tokens: int, n_ctx: int, n_ubatch: int, cache_type: str) -> str:
    st = v.path.stat()
    ident = [str(v.path.resolve()), st.st_size, st.st_mtime_ns, v.name, task, seed, max_tokens, n_ctx, n_ubatch,
             cache_type]
    return hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:16]


def _qhash(problem) -> str:
    return hashlib.sha256((problem.prompt if problem.prompt is not None else problem.question).encode()).hexdigest()[:12]


def _read_records(path: Optional[Path]) -> dict[tuple[str, int, str], dict]:
    recs: dict[tuple[str, int, str], dict] = {}
    if path is None or not path.exists():
        return recs
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                r = json.loads(line)
                recs[(r["key"], int(r["index"]), r["qhash"])] = r
            except (ValueError, KeyError, TypeError):
                continue  # a line cut by an interrupt
    return recs


def _check_writable(path: Optional[str | os.PathLike], what: str) -> Optional[Path]:
    if path is None:
        return None
    p = Path(path).expanduser()
    if p.is_dir():
        raise KvtoolError(f"{what} {p} is a directory; give a file path")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise KvtoolError(f"cannot write {what} {p}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise KvtoolError(f"cannot write {what} {p}: permission denied")
    return p


# --- task evaluation -----------------------------------------------------------------------------------------------
def run_eval(models: Sequence[str | os.PathLike], task: str, n: int = 200, seed: int = 0,
             variants: Optional[Sequence[str]] = None, max_tokens: int = 512, n_ctx: Optional[int] = None,
             n_ubatch: int = 512, cache_type: str = "f16", threads: Optional[int] = None,
             out: Optional[str | os.PathLike] = None, plot: Optional[str | os.PathLike] = None,
             progress: bool = True, echo: Echo = lambda m: None, gpu_layers=None) -> dict:
    """Evaluate every (file, variant) on ``n`` problems of ``task``; returns the result dict (also written to
    ``out`` as JSON when given, with the per-problem JSONL next to it). ``gpu_layers``: N, "all" or None (the
    runtime's default), resolved once after the input checks."""
    from .runtime.model import Model
    from .runtime.offload import parse_gpu_layers, resolve_gpu_layers
    from .tasks import make_dataset, score

    if n < 1:
        raise KvtoolError(f"--n must be >= 1, got {n}")
    if max_tokens < 1:
        raise KvtoolError(f"--max-tokens must be >= 1, got {max_tokens}")
    if n_ctx is not None and n_ctx < 16:
        raise KvtoolError(f"--n-ctx must be >= 16, got {n_ctx}")
    out_p = _check_writable(out, "output")
    plot_p = _check_writable(plot, "plot")
    if out_p is not None and plot_p is not None and out_p.resolve() == plot_p.resolve():
        raise KvtoolError("--out and --plot name the same file")
    parse_gpu_layers(gpu_layers)
    vs = resolve_variants(models, variants)
    load_task_providers()
    problems = make_dataset(task, n, seed)
    task_name = task.partition(":")[0].strip()
    metric_fn = _METRICS.get(task_name)
    log_p = jsonl_path(out_p) if out_p is not None else None
    if log_p is not None:
        _check_writable(log_p, "record log")
    done = _read_records(log_p)
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
    try:
        for v in vs:
            ctx_len = n_ctx
            model = None
            try:
                if ctx_len is None:
                    # prompt lengths need the model's tokenizer: load once to measure them
                    model = Model.load(v.path, n_ctx=256, n_threads=threads, n_ubatch=n_ubatch,
                                       cache_type=cache_type, mixed=v.mixed, beacons=v.beacons,
                                       n_gpu_layers=gpu_layers)
                    longest = max(len(_prompt_tokens(model, p)[0]) for p in problems)
                    ctx_len = longest + max_tokens + 1
                    model.close()
                    model = None
                key = _run_key(v, task, seed, max_tokens, ctx_len, n_ubatch, cache_type)
                recs: list[Optional[dict]] = [done.get((key, p.index, _qhash(p))) for p in problems]
                todo = [i for i, r in enumerate(recs) if r is None]
                if todo:
                    model = Model.load(v.path, n_ctx=ctx_len, n_threads=threads, n_ubatch=n_ubatch,
                                       cache_type=cache_type, mixed=v.mixed, beacons=v.beacons,
                                       n_gpu_layers=gpu_layers)
                    stats = model.kv_stats()
                    bpc = _bytes_per_cell(model)
                    bar = _progress(len(todo), f"{v.label}", progress, skipped=n - len(todo))
                    try:
                        for i in todo:
                            p = problems[i]
                            toks, stops = _prompt_tokens(model, p)
                            if v.beacons:
                                g = greedy_beacons(model, toks, max_tokens, stops)
                                _, _, ring_c = _live_bytes(model, bpc)
                                bs = g["beacon_stats"]
                                # the full-head cells peak mid-generation (eviction shrinks them); rings: end count
                                full_c = bs["peak_full_cells"] if bs["peak_full_cells"] is not None else bs["peak_live_cells"]
                                live = int(round(full_c * bpc[0] + ring_c * bpc[1]))
                            else:
                                g = greedy(model, toks, max_tokens, stops)
                                live, full_c, ring_c = _live_bytes(model, bpc)
                            reward = score(p, g["text"])
                            # cells the sequence had at its largest (the beacon loop evicts, so its peak, not its length)
                            n_seen = g["beacon_stats"]["peak_live_cells"] if v.beacons else g["prompt_tokens"] + len(g["ids"])
                            retained = _retained_bytes(model, n_seen, full_c, bool(stats["mixed"]))
                            rec = {"key": key, "index": p.index, "qhash": _qhash(p), "model": str(v.path),
                                   "variant": v.name, "reward": reward, "gen_tokens": len(g["ids"]),
                                   "prompt_tokens": g["prompt_tokens"], "finish": g["finish"],
                                   "repetitive": is_repetitive(g["ids"]), "live_kv_bytes": live,
                                   "live_full_cells": full_c, "live_ring_cells": ring_c, "retained_kv_bytes": retained,
                                   "allocated_kv_bytes": stats["allocated_bytes"], "stock_kv_bytes": stats["stock_bytes"],
                                   "mixed_active": stats["mixed"], "prefill_s": round(g["prefill_s"], 6),
                                   "decode_s": round(g["decode_s"], 6), "n_decodes": g["n_decodes"],
                                   "completion": g["text"]}
                            if v.beacons:
                                rec["beacons"] = {k: g["beacon_stats"][k] for k in
                                                  ("interval", "beacons", "evicted", "peak_live_cells", "next_pos")}
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
    result = {"kvtool_eval": 1, "task": task, "n": n, "seed": seed, "max_tokens": max_tokens, "n_ctx": n_ctx,
              "n_ubatch": n_ubatch, "cache_type": cache_type, "threads": threads, "machine": machine_info(),
              "records": str(log_p) if log_p else None, "rows": rows}
    if out_p is not None:
        from .heads import write_atomic

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
        "model": v.path.name, "path": str(v.path), "variant": v.name, "label": v.label, "n": n, "correct": k,
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


def _fmt_bytes(x: Optional[float]) -> str:
    if x is None:
        return "-"
    for unit, div in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if x >= div:
            return f"{x / div:.2f} {unit}"
    return f"{int(x)} B"


def _pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def markdown(rows: Sequence[dict]) -> str:
    """The result table (one row per file/variant)."""
    extra = sorted({m for r in rows for m in (r.get("metrics") or {})})
    head = (["model", "variant", "compressed", "n", "accuracy [95% CI]"] + extra +
            ["gen len", "capped", "repeat", "peak live cells", "peak live KV", "retained KV", "alloc KV (stock)", "prefill tok/s", "decode tok/s"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        comp = f"{r['compressed_heads']}/{r['kv_heads']}" if r.get("kv_heads") and r.get("mixed_active") else "0"
        acc = "-" if r["accuracy"] is None else f"{r['accuracy']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]"
        cells = [r["model"], r["variant"], comp, str(r["n"]), acc]
        cells += [f"{r['metrics'][m]:.4f}" if m in (r.get("metrics") or {}) else "-" for m in extra]
        cells += [f"{r['mean_gen_tokens']:.1f}" if r["mean_gen_tokens"] is not None else "-",
                  _pct(r["capped_frac"]), _pct(r["repeat_frac"]),
                  str(r["peak_live_cells"]) if r.get("peak_live_cells") is not None else "-",
                  _fmt_bytes(r["peak_live_kv_bytes"]), _fmt_bytes(r.get("peak_retained_kv_bytes")),
                  f"{_fmt_bytes(r['allocated_kv_bytes'])} ({_fmt_bytes(r['stock_kv_bytes'])})",
                  f"{r['prefill_tok_s']:.0f}" if r["prefill_tok_s"] else "-",
                  f"{r['decode_tok_s']:.0f}" if r["decode_tok_s"] else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _pareto(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of points no other point beats (less or equal memory and higher or equal accuracy, one strictly)."""
    keep = []
    for i, (x, y) in enumerate(points):
        if not any((x2 <= x and y2 >= y and (x2 < x or y2 > y)) for j, (x2, y2) in enumerate(points) if j != i):
            keep.append(i)
    return sorted(keep, key=lambda i: points[i][0])


_STYLE = {"full": ("*", "tab:red"), "random": ("o", "tab:gray"), "manual": ("s", "tab:green"),
          "kvtool-rlkv": ("D", "tab:blue"), "rlkv": ("D", "tab:cyan"), "duo": ("^", "tab:purple"),
          "beacons": ("P", "tab:orange"), "streaming": ("v", "tab:brown")}
_METHOD_NAMES = {"full": "full cache", "random": "random mask", "manual": "manual scores",
                 "kvtool-rlkv": "RLKV (kvtool train heads)", "rlkv": "RLKV (imported)", "duo": "DuoAttention",
                 "beacons": "beacons", "streaming": "every head sink + window (S=0: sliding window)"}


def _point_label(row: dict) -> str:
    """What a point is, short: ``c=16`` for beacons, ``S4+W102`` when every head is compressed, else the row label."""
    if row.get("beacon_interval"):
        return f"c={row['beacon_interval']}" + ("" if not row.get("mixed_active") else f" {row['variant']}")
    if row.get("method") == "streaming" and row.get("windows") and len(row["windows"]) == 1:
        return f"S{row.get('sink', 0)}+W{row['windows'][0]}"
    return row["label"]


def plot_pareto(rows: Sequence[dict], out: str | os.PathLike, title: str = "") -> Path:
    """PNG: accuracy (Wilson 95% error bars) against allocated KV bytes and against peak retained KV bytes (what
    attention can still see, :func:`_retained_bytes`; older records fall back to peak live bytes), one marker
    per head-selection method (``kvtool.heads.method``); points are labelled (:func:`_point_label`) when there are at
    most 24."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["accuracy"] is not None]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    methods = list(dict.fromkeys(r.get("method", "full") for r in rows))
    annotate = len(rows) <= 24
    for ax, key, name in ((axes[0], "allocated_kv_bytes", "allocated KV"),
                          (axes[1], "peak_retained_kv_bytes", "peak retained KV")):
        xs = [(r.get(key) or r.get("peak_live_kv_bytes") or 0) / 1024 for r in rows]
        ys = [r["accuracy"] for r in rows]
        for mth in methods:
            idx = [i for i, r in enumerate(rows) if r.get("method", "full") == mth]
            marker, color = _STYLE.get(mth, ("o", "black"))
            ax.errorbar([xs[i] for i in idx], [ys[i] for i in idx],
                        yerr=[[ys[i] - rows[i]["ci95"][0] for i in idx], [rows[i]["ci95"][1] - ys[i] for i in idx]],
                        fmt=marker, color=color, capsize=3, alpha=0.8, label=_METHOD_NAMES.get(mth, mth))
        if annotate:
            for i, r in enumerate(rows):
                ax.annotate(_point_label(r), (xs[i], ys[i]), textcoords="offset points", xytext=(4, 4),
                            fontsize=7 if len(rows) <= 8 else 6)
        front = _pareto(list(zip(xs, ys)))
        if len(front) > 1:
            ax.plot([xs[i] for i in front], [ys[i] for i in front], "--", color="gray", lw=1, label="Pareto front")
        ax.legend(loc="center right", fontsize=8)
        ax.set_xlabel(f"{name} (KiB)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (95% Wilson CI)")
    axes[0].set_ylim(-0.05, 1.05)
    fig.suptitle(title or "accuracy vs KV memory")
    fig.tight_layout()
    from .heads import write_atomic
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return write_atomic(out, buf.getvalue())


# --- perplexity and KL ---------------------------------------------------------------------------------------------
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
            echo: Echo = lambda m: None, gpu_layers=None) -> dict:
    """Perplexity of the full load and, when the file has budgets (or ``mixed=True``), of the mixed load, with the
    mean KL(full || mixed) per scored token. ``mixed=False`` computes the full perplexity only.
    ``gpu_layers``: as ``run_eval``."""
    from .runtime.model import Model
    from .runtime.offload import parse_gpu_layers, resolve_gpu_layers

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
    parse_gpu_layers(gpu_layers)
    raw = tp.read_bytes()
    text = raw.decode("utf-8", errors="replace")
    gpu_layers = resolve_gpu_layers(gpu_layers)
    full = Model.load(p, n_ctx=n_ctx, n_threads=threads, n_ubatch=n_ubatch, cache_type=cache_type,
                      mixed=False if _has_budgets(b) else None, n_gpu_layers=gpu_layers)
    mix = None
    try:
        if do_mixed:
            mix = Model.load(p, n_ctx=n_ctx, n_threads=threads, n_ubatch=n_ubatch, cache_type=cache_type, mixed=True,
                             n_gpu_layers=gpu_layers)
        check_text(full, text)
        toks = full.tokenize(text, add_bos=False)
        if max_tokens:
            toks = toks[:int(max_tokens)]
        n_chunks = len(toks) // n_ctx
        if n_chunks < 1:
            raise KvtoolError(f"{tp.name} has {len(toks)} tokens, fewer than one window of --n-ctx {n_ctx}")
        llm = full.llama
        bos = llm.token_bos() if llm._model.add_bos_token() and llm.token_bos() >= 0 else None
        first = n_ctx // 2
        nll_f = nll_m = kl_sum = 0.0
        kl_max = 0.0
        agree = count = 0
        bar = _progress(n_chunks, f"ppl {p.name}", progress)
        t0 = time.perf_counter()
        for c in range(n_chunks):
            w = list(toks[c * n_ctx:(c + 1) * n_ctx])
            if bos is not None:
                w[0] = bos
            tgt = np.asarray(w[first + 1:])
            full.reset()
            lf = _log_softmax(_decode(llm, w, logits_all=True)[first:-1])
            nll_f -= float(lf[np.arange(len(tgt)), tgt].sum())
            if mix is not None:
                mix.reset()
                lm = _log_softmax(_decode(mix.llama, w, logits_all=True)[first:-1])
                nll_m -= float(lm[np.arange(len(tgt)), tgt].sum())
                kl = (np.exp(lf) * (lf - lm)).sum(-1)
                kl_sum += float(kl.sum())
                kl_max = max(kl_max, float(kl.max()))
                agree += int((lf.argmax(-1) == lm.argmax(-1)).sum())
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
        return res
    finally:
        full.close()
        if mix is not None:
            mix.close()


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
    return "\n".join(lines)
