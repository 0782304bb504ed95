"""Test helpers around the patched runtime: budgets written into a GGUF, and llama.cpp logits per position."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from converters.gguf_budgets import (K_ENABLED, K_HEAD_WINDOW, K_SINK, K_VERSION, T_ARR, T_BOOL, T_I32, T_U32,
                                     Value, rewrite_gguf)

GGML_TYPE_F32 = 0


def write_windows(src: Path, dst: Path, windows: Sequence[Sequence[int]], sink: int, enabled: Optional[bool] = True,
                  extra: Optional[dict] = None) -> Path:
    """Per-head windows (any mix of values, 0 = full) straight into the GGUF, bypassing heads.json."""
    keys = {K_VERSION: Value(T_U32, 1), K_SINK: Value(T_U32, sink),
            K_HEAD_WINDOW: Value(T_ARR, [int(w) for row in windows for w in row], T_I32)}
    if enabled is not None:
        keys[K_ENABLED] = Value(T_BOOL, bool(enabled))
    keys.update(extra or {})
    return rewrite_gguf(src, dst, keys, drop=lambda k: k.startswith("kvtool."))


def load(path: Path, n_ctx: int = 1024, n_ubatch: int = 512, f32_kv: bool = True, flash_attn: bool = False,
         mixed: Optional[bool] = None, n_seq_max: int = 1, type_kv: Optional[int] = None, **kw):
    from llama_cpp import Llama

    args = dict(n_ctx=n_ctx, n_batch=max(512, n_ubatch), n_ubatch=n_ubatch, n_threads=2, logits_all=True,
                verbose=False, flash_attn=flash_attn, seed=0)
    if f32_kv:
        args.update(type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32)
    if type_kv is not None:
        args.update(type_k=type_kv, type_v=type_kv)
    if mixed is not None:
        args["kv_overrides"] = {"kvtool.kv.enabled": bool(mixed)}
    args.update(kw)
    return Llama(str(path), **args)


def runtime_logits(llm, tokens: Sequence[int], prefill: Optional[int] = None) -> np.ndarray:
    """Logits [T, vocab] for every position. With ``prefill`` the first tokens go in one call and the rest one by one."""
    llm.reset()
    llm._ctx.kv_cache_clear()
    toks = list(tokens)
    if prefill is None:
        llm.eval(toks)
    else:
        llm.eval(toks[:prefill])
        for t in toks[prefill:]:
            llm.eval([t])
    return np.array(llm.scores[: len(toks)], dtype=np.float32)
