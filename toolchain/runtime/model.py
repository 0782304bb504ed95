"""``Model``: the Python API local apps import (``from toolchain import Model``).

Built on llama-cpp-python's ``Llama`` (loading, tokenizer, chat templates); every generation runs through kvtool's
decode core (``toolchain.runtime.decode``: sampling, stop strings, UTF-8 safe streaming, timings), with what kvtool
needs on top:

* budgets apply by themselves: the patched libllama reads them from the GGUF. ``mixed=True/False`` overrides the
  file's ``kvtool.kv.enabled`` through ``kv_overrides``, so one file A/B-tests a full cache against a mixed one;
* flash attention defaults to ON for files with budgets. Without it llama.cpp stores V transposed and pads every
  layer's V rows to the largest per-layer head count ([TAG_V_CACHE_VARIABLE]), so per-layer masks would lose
  their V savings (docs/architecture.md §4);
* threads default to the physical core count: oversubscribing hyperthreads was measured to collapse throughput;
* prefix reuse is guarded: the cache of the previous call is kept and only the new suffix evaluated, but a mixed
  cache can refuse a tail truncation (``llama_memory_seq_rm`` returns false once a ring has dropped cells that a
  token at the cut would need); the core then clears the cache and evaluates the whole prompt: reuse never runs on
  stale cells;
* files with ``kvtool.beacon.*`` keys generate through the core's beacon path: every c tokens a beacon is decoded
  and the chunk behind it leaves the cache, so generation can run past ``n_ctx`` while the live cells fit
  (``Model.load(..., beacons=False)`` opts out). ``beacon_interval=C`` picks one of the intervals the file lists,
  ``"auto"`` adapts it to ``beacon_budget`` bytes of live KV (``runtime/beacon_interval.py``);
* ``kv_stats()`` measures the allocated KV bytes (``kvtool_kv_bytes``) and compares them with what a full cache
  of the same settings would take (``memory.predict``); ``last_stats`` times every generation.

Thread safety: a ``Model`` is for use from ONE thread at a time (llama.cpp contexts are not reentrant). Servers
serialize requests (``kvtool serve`` queues them behind one lock). The one exception is ``stop()``, which only sets
a flag and may be called from a signal handler or another thread to end the current generation early.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

from ..errors import KvtoolError
from .decode import BeaconSchedule, Control, stream_generate
from .handles import clear_kv
from .sampling import SamplerSettings
from .stats import BeaconStats, GenStats

Messages = Sequence[dict]


def _default_threads() -> int:
    try:
        from .threads import physical_cores
    except ImportError:  # pragma: no cover - threads.py is part of the package
        return max(1, os.cpu_count() or 1)
    return physical_cores()


def _llama_class():
    """llama-cpp-python's ``Llama``, imported on first use (importing llama_cpp loads libllama). Its ``generate`` is
    never called: generation runs through the decode core (``runtime/decode.py``)."""
    from llama_cpp import Llama

    return Llama


class _Closed:
    """Stands in for the ``Llama`` after ``Model.close()``: any use is one KvtoolError, never a freed pointer."""

    def __getattr__(self, name):
        raise KvtoolError("model is closed")

    def __setattr__(self, name, value):
        raise KvtoolError("model is closed")

    def __bool__(self) -> bool:
        return False


_CLOSED = _Closed()
_LLAMA_CLS = None


def _cls():
    global _LLAMA_CLS
    if _LLAMA_CLS is None:
        _LLAMA_CLS = _llama_class()
    return _LLAMA_CLS


def _note(msg: str) -> None:
    import sys

    print(msg, file=sys.stderr)


def _check_memory(dims, budgets, n_ctx: int, n_ubatch: int, cache_type: str, flash_attn: bool,
                  swa_full: bool = False) -> None:
    """Refuse a context whose KV cache alone exceeds this machine's memory (before llama.cpp tries for minutes)."""
    from .memory import predict

    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return
    try:
        plan = predict(dims, budgets.head_window if budgets else None, budgets.sink if budgets else 0, n_ctx,
                       n_ubatch, 1, cache_type, cache_type, flash_attn, mixed=budgets is not None, swa_full=swa_full)
    except KvtoolError:
        return  # llama.cpp judges layouts the formula does not cover
    need = plan.mixed_bytes if budgets is not None else plan.stock_bytes
    if total > 0 and need > total:
        raise KvtoolError(f"n_ctx {n_ctx} needs {need / 2**30:.1f} GiB of KV cache, more than this machine's "
                          f"{total / 2**30:.1f} GiB of memory: lower --n-ctx")


def _beacon_choice(m, requested, budget_bytes):
    """The loaded model's beacon interval (``beacon_interval.choose``); ``auto`` sizes its budget in cells from this
    load's KV layout (per-cell bytes of the full heads, the rings as a fixed part)."""
    from .beacon_interval import choose
    from .kv_usage import bytes_per_cell
    from .library import kv_bytes

    b = m.budgets
    bpc = fixed = None
    if requested == "auto":
        bpc = int(round(bytes_per_cell(m)[0]))
        fixed = int(kv_bytes(m.llama._ctx.ctx)[2])
    return choose(b.supported_intervals(), requested, int(b.beacon_interval), f"{m.path}: ", budget_bytes,
                  bpc, fixed or 0)


def _check_path(path: Union[str, os.PathLike]) -> Path:
    from ..validate import check_input_path

    p = check_input_path(path)  # missing, or a name the system refuses (too long): one line
    if p.is_dir():
        raise KvtoolError(f"{p}: is a directory, expected a .gguf file")
    return p


def _content_text(content: Any, i: int) -> str:
    """A message's content: a string, or OpenAI-style parts of which only text is supported."""
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list):
        out = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                out.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise KvtoolError(f"message {i}: only text content is supported, got a {kind!r} part")
        return "".join(out)
    raise KvtoolError(f"message {i}: content must be a string, got {type(content).__name__}")


class Model:
    """A GGUF loaded with the patched runtime. Single-thread use only (``stop()`` excepted): see the module doc.

    >>> m = Model.load("model.gguf")
    >>> m.generate("The capital of France is", max_tokens=8)
    >>> for piece in m.chat([{"role": "user", "content": "Hi"}], stream=True): print(piece, end="")
    >>> m.kv_stats()["allocated_bytes"], m.last_stats.decode_tok_s
    """

    def __init__(self, llm, path: Path, budgets, dims, mixed_requested: Optional[bool], flash_attn: bool,
                 cache_type: str, n_ctx_requested: int, swa_full: bool = False):
        self._llm = llm
        self.path = path
        self.name = path.name
        self.budgets = budgets
        self.dims = dims
        self.mixed_requested = mixed_requested
        self.flash_attn = flash_attn
        self.cache_type = cache_type
        self._n_ctx_requested = n_ctx_requested
        self.swa_full = swa_full
        self.n_threads = llm.n_threads
        self.last_stats: Optional[GenStats] = None
        self.beacons = False  # route generation through the beacon loop (set by load)
        self.beacon_choice = None  # beacon_interval.IntervalChoice (set by load for files with beacon keys)
        self.n_gpu_layers: Union[int, str] = 0  # resolved layers offloaded: an int or "all" (set by load)
        self._formatter = None
        self._control = Control(self)  # stop(), close() and newer calls, as the core sees them

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, path: Union[str, os.PathLike], n_ctx: int = 4096, n_threads: Optional[int] = None,
             n_ubatch: int = 512, cache_type: str = "f16", mixed: Optional[bool] = None,
             flash_attn: Optional[bool] = None, seed: int = 0, verbose: bool = False,
             beacons: Optional[bool] = None, n_gpu_layers: Union[None, int, str] = None,
             sparsity: Optional[float] = None, window: Optional[int] = None, sink: Optional[int] = None,
             kv_budget: Union[None, int, str] = None, swa_full: bool = False,
             beacon_interval: Union[None, int, str] = None, beacon_budget: Optional[int] = None) -> "Model":
        """Load a GGUF.

        ``mixed``: None follows the file's ``kvtool.kv.enabled``; True/False override it for this load only.
        ``flash_attn``: None means ON when the file has budgets (mixed V savings need it), else off as in
        llama-cpp-python. ``n_threads``: None means the physical core count. ``n_ubatch`` also sizes the rings
        (ring cells = pad256(window + sink + n_ubatch)), so small machines want a small ``n_ubatch``.
        ``beacons``: None runs the beacon loop (``toolchain.runtime.beacons``) when the file has
        ``kvtool.beacon.*`` keys; False ignores them; True requires them.
        ``beacon_interval``: None runs the file's ``kvtool.beacon.interval``; an int must be one the file lists
        (``kvtool.beacon.intervals``); ``"auto"`` starts at the smallest and moves up when the live KV would pass
        ``beacon_budget`` bytes (a hard cap as well). Both need a file with beacon keys.
        ``n_gpu_layers``: an int >= 0 or "all"; None means all when the runtime has a GPU device, else 0. GPU layers
        asked of a CPU-only runtime give one warning line and a CPU run (``toolchain.runtime.offload``).
        ``swa_full``: sliding-window hybrids only (Gemma-2/3, gpt-oss). False (llama-cli's default) sizes the SWA
        layers' cache to about n_swa + n_ubatch cells; True keeps every position there too, which costs memory but
        lets a new prompt reuse a long cached prefix (docs/memory.md, "Sliding-window models").
        ``sparsity``/``window``/``sink``: rebuild the file's budgets at load time from its ``kvtool.heads.scores``
        (the ``kvtool.kv.sparsity``/``.window`` and ``kvtool.kv.sink`` overrides; ``toolchain.runtime.budget_overrides``).
        ``kv_budget``: bytes or a size such as "2GiB": the smallest sparsity whose KV cache fits for ``n_ctx``, or with
        ``n_ctx="auto"`` the largest context that fits (``toolchain.runtime.kv_budget``); the choice is one line on
        stderr.
        """
        from converters.gguf_budgets import read_budgets

        from ..gguf_keys import K_ENABLED
        from ..gguf_keys import cache_type as check_cache_type
        from ..kv_variants import check_flash_attn
        from ..validate import I32_MAX, N_CTX_MAX, U32_MAX, cap_threads, check_int
        from .library import require_patched
        from .memory import dims_from_gguf
        from .offload import llama_value, parse_gpu_layers, resolve_gpu_layers

        p = _check_path(path)
        budgets = read_budgets(p)  # KvtoolError for a non-GGUF or truncated file, or bad kvtool keys
        dims = dims_from_gguf(p)  # the header fields every file must have sound (block_count >= 1, ...)
        from .budget_overrides import apply_overrides, check_overrides

        ov = check_overrides(sparsity, window, sink)
        file_budgets, budgets = budgets, apply_overrides(budgets, ov, f"{p}: ")
        if kv_budget is not None:
            from ..gguf_keys import K_KV_SPARSITY
            from ..validate import parse_size
            from .kv_budget import choose

            if sparsity is not None:
                raise KvtoolError("give kv_budget or sparsity, not both")
            if n_ctx != "auto":
                n_ctx = check_int("n_ctx", n_ctx, 1, N_CTX_MAX)
            nub = check_int("n_ubatch", n_ubatch, 1, I32_MAX)
            with_budgets = budgets is not None and budgets.head_window is not None
            mixed_on = with_budgets and (budgets.enabled if mixed is None else bool(mixed))
            fa_on = with_budgets if flash_attn is None else bool(flash_attn)
            choice = choose(dims, budgets, parse_size(kv_budget), n_ctx,
                            min(nub, n_ctx) if n_ctx != "auto" else nub, cache_type, fa_on, mixed_on,
                            swa_full=swa_full)
            _note(choice.line())
            n_ctx = choice.n_ctx
            if choice.sparsity is not None:
                ov[K_KV_SPARSITY] = choice.sparsity
                budgets = apply_overrides(file_budgets, ov, f"{p}: ")
        elif n_ctx == "auto":
            raise KvtoolError("n_ctx 'auto' needs a KV budget (--kv-budget SIZE)")
        n_ctx = check_int("n_ctx", n_ctx, 1, N_CTX_MAX)
        # llama.cpp pads the context to 256 cells; asking for the padded size keeps Llama's token buffer and
        # the context the same length, so every prompt check below holds for both
        n_ctx = (n_ctx + 255) // 256 * 256
        # llama.cpp clamps the micro-batch to the context; doing it here keeps the ring sizes bounded too
        n_ubatch = min(check_int("n_ubatch", n_ubatch, 1, I32_MAX), n_ctx)
        seed = check_int("seed", seed, 0, U32_MAX)
        if n_threads is not None:
            n_threads = cap_threads(n_threads, echo=_note)
        parse_gpu_layers(n_gpu_layers, "n_gpu_layers")  # a bad value fails here, before anything loads
        tid = check_cache_type(cache_type).ggml_id
        has_budgets = budgets is not None and budgets.head_window is not None
        overrides = dict(ov) or None
        if mixed is not None:
            if mixed and not has_budgets:
                raise KvtoolError(f"{p}: mixed=True but the file has no kvtool budgets "
                                  f"(write them with: kvtool convert {p.name} --mask heads.json)")
            if has_budgets:
                overrides = {**(overrides or {}), K_ENABLED: bool(mixed)}
        has_beacons = budgets is not None and budgets.beacon_token_id is not None
        if beacons and not has_beacons:
            raise KvtoolError(f"{p}: beacons=True but the file has no kvtool.beacon keys")
        from .beacon_interval import choose, parse_budget, parse_interval

        want_c, want_budget = parse_interval(beacon_interval), parse_budget(beacon_budget)
        if want_c is not None and not has_beacons:
            raise KvtoolError(f"{p}: beacon interval {want_c} asked for, but the file has no kvtool.beacon keys")
        if want_c is not None and beacons is False:
            raise KvtoolError("a beacon interval needs the beacon loop: drop beacons=False (--no-beacons)")
        if has_beacons:  # a bad interval, or auto without a budget, fails before anything loads
            choose(budgets.supported_intervals(), want_c, int(budgets.beacon_interval), f"{p}: ", want_budget,
                   1 if want_c == "auto" else None)
        quantized = cache_type not in ("f16", "f32", "bf16")
        # default ON with budgets (mixed V savings need it) and for a quantized cache (llama.cpp needs it for V)
        fa = (has_budgets or quantized) if flash_attn is None else bool(flash_attn)
        check_flash_attn(cache_type, fa)
        swa_full = bool(swa_full)
        _check_memory(dims, budgets if has_budgets and mixed is not False else None, n_ctx, n_ubatch, cache_type, fa,
                      swa_full)
        require_patched()
        gpu_layers = resolve_gpu_layers(n_gpu_layers, what="n_gpu_layers")
        threads = int(n_threads) if n_threads is not None else _default_threads()
        try:
            llm = _cls()(str(p), n_ctx=int(n_ctx), n_batch=max(512, int(n_ubatch)), n_ubatch=int(n_ubatch),
                         n_threads=threads, n_threads_batch=threads, flash_attn=fa, type_k=tid, type_v=tid,
                         seed=int(seed), kv_overrides=overrides, n_gpu_layers=llama_value(gpu_layers),
                         swa_full=swa_full, verbose=verbose)
        except (ValueError, RuntimeError, OSError) as e:
            raise KvtoolError(f"{p}: llama.cpp could not load it ({e})", code=1) from e
        m = cls(llm, p, budgets, dims, mixed, fa, cache_type, int(n_ctx), swa_full)
        m.beacons = has_beacons if beacons is None else bool(beacons)
        m.n_gpu_layers = gpu_layers
        if has_beacons:
            try:
                m.beacon_choice = _beacon_choice(m, want_c, want_budget)
            except KvtoolError:
                m.close()
                raise
        return m

    def close(self) -> None:
        """Free the model. Every later call, and every live stream's next step, raises "model is closed"."""
        if not self.closed:
            llm, self._llm = self._llm, _CLOSED
            llm.close()

    @property
    def closed(self) -> bool:
        return isinstance(self._llm, _Closed)

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ info
    @property
    def llama(self):
        """The underlying ``llama_cpp.Llama`` (for what this wrapper does not cover)."""
        return self._llm

    @property
    def n_ctx(self) -> int:
        return self._llm.n_ctx()

    @property
    def n_ubatch(self) -> int:
        return int(self._llm.context_params.n_ubatch)

    @property
    def has_chat_template(self) -> bool:
        return bool(self._llm.metadata.get("tokenizer.chat_template"))

    def tokenize(self, text: str, add_bos: bool = True, special: bool = True) -> list[int]:
        bos = [self._llm.token_bos()] if add_bos and self._llm._model.add_bos_token() and self._llm.token_bos() >= 0 else []
        body = self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=special) if text else []
        return bos + body

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self._llm.detokenize(list(tokens)).decode("utf-8", errors="replace")

    def kv_stats(self) -> dict:
        """Measured KV allocation and live cells, next to the bytes a full cache with the same settings takes."""
        from .library import kv_buffers, kv_bytes, kv_groups, kv_used_cells
        from .memory import predict

        ctx = self._llm._ctx.ctx
        active, full_b, ring_b = kv_bytes(ctx)
        full_c, ring_c = kv_used_cells(ctx)
        windows = self.budgets.head_window if self.budgets is not None else None
        plan = predict(self.dims, windows, self.budgets.sink if self.budgets else 0, self._n_ctx_requested,
                       n_ubatch=self.n_ubatch, n_seq=1, type_k=self.cache_type, type_v=self.cache_type,
                       flash_attn=self.flash_attn, mixed=active, swa_full=self.swa_full)
        alloc = full_b + ring_b
        return {"mixed": bool(active), "full_bytes": full_b, "ring_bytes": ring_b, "allocated_bytes": alloc,
                "stock_bytes": plan.stock_bytes, "predicted_bytes": plan.mixed_bytes,
                "ratio": round(alloc / plan.stock_bytes, 4) if plan.stock_bytes else None,
                "live_full_cells": full_c, "live_ring_cells": ring_c,
                "groups": [{"window": w, "cells": c} for w, c in kv_groups(ctx)],
                "buffers": kv_buffers(ctx), "gpu_layers": self.n_gpu_layers,
                "context_tokens": int(self._llm.n_tokens) or max(full_c, ring_c), "n_ctx": self.n_ctx, "n_ubatch": self.n_ubatch, "flash_attn": self.flash_attn,
                "cache_type": self.cache_type, "n_threads": self.n_threads, "beacons": self._beacon_kv()}

    def _beacon_kv(self) -> Optional[dict]:
        """The beacon loop's view of the last generation (None when beacons are off): the cells this sequence holds
        now, the most it held, and how many positions it spanned (prompt + visible tokens + beacons)."""
        if not self.beacons:
            return None
        sched = self.beacon_schedule()
        token_id, interval = sched.token_id, sched.interval
        extra = {"adaptive": True, "intervals": list(sched.intervals), "budget_cells": sched.budget_cells} \
            if sched.adaptive else {}
        bs = getattr(self, "beacon_stats", None)
        if bs is None:
            return {"token_id": token_id, "interval": interval, "live_cells": 0, "peak_live_cells": 0,
                    "positions": 0, "beacons": 0, "evicted": 0, **extra}
        if sched.adaptive:
            extra["switches"] = list(bs.switches)
        return {"token_id": token_id, "interval": bs.interval, "live_cells": bs.live_cells,
                "peak_live_cells": bs.peak_live_cells, "positions": bs.next_pos, "beacons": bs.beacons,
                "evicted": bs.evicted, **extra}

    def beacon_schedule(self):
        """The beacon schedule generation runs with (``decode.BeaconSchedule``): the file's token, the interval
        chosen at load, and for ``beacon_interval="auto"`` the supported intervals and the budget in cells.
        None when the file has no beacon keys."""
        b = self.budgets
        if b is None or b.beacon_token_id is None:
            return None
        ch = self.beacon_choice
        if ch is None:
            return BeaconSchedule(int(b.beacon_token_id), int(b.beacon_interval))
        return BeaconSchedule(int(b.beacon_token_id), int(ch.interval), tuple(ch.intervals) if ch.adaptive else (),
                              ch.budget_cells if ch.adaptive else None)

    # ------------------------------------------------------------------ generation
    def stop(self) -> None:
        """End the current generation after the token being computed (safe from a signal handler/other thread)."""
        if self.closed:
            raise KvtoolError("model is closed")
        self._control.stop_requested = True

    def reset(self) -> None:
        """Forget the cached prompt: the next call evaluates its prompt from scratch."""
        clear_kv(self._llm)

    def generate(self, prompt: str, max_tokens: Optional[int] = 256, temperature: float = 0.0,
                 top_p: float = 0.95, top_k: int = 40, min_p: float = 0.05, repeat_penalty: float = 1.0,
                 seed: Optional[int] = None, stop: Union[str, Sequence[str], None] = None,
                 stream: bool = False) -> Union[str, Iterator[str]]:
        """Complete a raw prompt (no chat template). ``stream=True`` returns an iterator of text pieces.

        ``temperature=0`` is greedy. ``max_tokens`` None or <= 0 means up to the end of the context; a larger value
        is capped there too (``last_stats.finish_reason`` is then "length"). The prompt's BOS is added as the model
        says, special tokens in the text are parsed.
        """
        if not isinstance(prompt, str):
            raise KvtoolError(f"prompt must be a string, got {type(prompt).__name__}")
        tokens = self.tokenize(prompt)
        return self._complete(tokens, [], max_tokens, temperature, top_p, top_k, min_p, repeat_penalty, seed,
                              stop, stream)

    def chat(self, messages: Messages, max_tokens: Optional[int] = 256, temperature: float = 0.0,
             top_p: float = 0.95, top_k: int = 40, min_p: float = 0.05, repeat_penalty: float = 1.0,
             seed: Optional[int] = None, stop: Union[str, Sequence[str], None] = None,
             stream: bool = False) -> Union[str, Iterator[str]]:
        """Reply to ``[{"role": ..., "content": ...}, ...]`` using the GGUF's chat template.

        Stateless: pass the whole conversation each time. The KV cache of the previous call is reused for the
        common prefix, so a growing conversation only evaluates its new turn.
        """
        tokens, template_stop = self.render_chat(messages)
        return self._complete(tokens, template_stop, max_tokens, temperature, top_p, top_k, min_p, repeat_penalty,
                              seed, stop, stream)

    def render_chat(self, messages: Messages) -> tuple[list[int], list[str]]:
        """Prompt tokens and stop strings for ``messages`` under the file's chat template."""
        res = self._render(messages)
        body = self._llm.tokenize(res.prompt.encode("utf-8"), add_bos=not res.added_special, special=True)
        stops = res.stop if isinstance(res.stop, list) else ([res.stop] if res.stop else [])
        return body, [s for s in stops if s]

    def chat_prompt(self, messages: Messages) -> str:
        """The text the chat template makes of ``messages`` (with the assistant's generation prompt)."""
        return self._render(messages).prompt

    def _render(self, messages: Messages):
        if not isinstance(messages, (list, tuple)) or not messages:
            raise KvtoolError("messages must be a non-empty list of {'role': ..., 'content': ...}")
        norm = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise KvtoolError(f"message {i}: expected {{'role': str, 'content': str}}")
            norm.append({**m, "content": _content_text(m.get("content"), i)})
        fmt = self._chat_formatter()
        try:
            return fmt(messages=norm)
        except KvtoolError:
            raise
        except Exception as e:  # jinja2 errors, raise_exception() in the template
            raise KvtoolError(f"{self.name}: the chat template failed on these messages: {e}") from e

    def _chat_formatter(self):
        if self._formatter is None:
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            tmpl = self._llm.metadata.get("tokenizer.chat_template")
            if not tmpl:
                raise KvtoolError(f"{self.name}: unknown chat template (the GGUF has no tokenizer.chat_template); "
                                  f"use generate with a raw prompt")
            llm = self._llm
            eos_id, bos_id = llm.token_eos(), llm.token_bos()
            eos = llm._model.token_get_text(eos_id) if eos_id != -1 else ""
            bos = llm._model.token_get_text(bos_id) if bos_id != -1 else ""
            try:
                self._formatter = Jinja2ChatFormatter(template=tmpl, eos_token=eos, bos_token=bos,
                                                      stop_token_ids=[eos_id])
            except Exception as e:  # a template jinja2 cannot parse
                raise KvtoolError(f"{self.name}: unknown chat template (jinja2 cannot parse it: {e})") from e
        return self._formatter

    def _complete(self, tokens: list, template_stop: list, max_tokens, temperature, top_p, top_k, min_p,
                  repeat_penalty, seed, stop, stream):
        from ..validate import check_sampling

        v = check_sampling(temperature, top_p, top_k, min_p, repeat_penalty, seed, max_tokens)
        temperature, top_p, top_k, min_p = v["temperature"], v["top_p"], v["top_k"], v["min_p"]
        repeat_penalty, seed, max_tokens = v["repeat_penalty"], v["seed"], v["max_tokens"]
        n_ctx = self.n_ctx
        if not tokens:
            raise KvtoolError("empty prompt (and the model adds no BOS token)")
        if len(tokens) >= n_ctx:
            raise KvtoolError(f"prompt is {len(tokens)} tokens but the context holds {n_ctx} "
                              f"(at least 1 must be left to generate): raise n_ctx (--n-ctx) or shorten the prompt")
        stops = list(template_stop)
        if isinstance(stop, str):
            stops.append(stop)
        elif stop:
            stops.extend(s for s in stop if s)
        if temperature < 0:
            raise KvtoolError(f"temperature must be >= 0, got {temperature}")
        settings = SamplerSettings(float(temperature), int(top_k), float(top_p), float(min_p), float(repeat_penalty),
                                   seed)
        rec = GenStats()
        self.last_stats = rec
        beacon, bs = None, None
        if self.beacons:  # evicts each chunk behind its beacon, may run past n_ctx while the live cells fit
            beacon = self.beacon_schedule()
            bs = self.beacon_stats = BeaconStats(beacon.token_id, beacon.interval)
        it = stream_generate(self._llm, tokens, max_tokens, settings, stops, beacon, rec, bs, self._control)
        return it if stream else "".join(it)
