"""Load-time sparsity, window and sink: the ``kv_overrides`` that make the runtime rebuild a file's budgets, and the
budgets it will then run with.

Why both halves here: the patched libllama rebuilds the mask itself (cpp/kvtool-rederive.cpp), so C apps and
llama-server get the same choice through ``--override-kv``; but Python must know the resulting windows before the
load, to predict memory (``_check_memory``, ``--kv-budget``, ``kv_stats``), and must name a bad key in one line
(llama.cpp's own load error only says "failed to load"). The mask comes from ``heads.mask_from_scores`` on the
scores as stored in the file, the very values the runtime reads, so both sides choose the same heads.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

from ..errors import KvtoolError
from ..gguf_keys import K_HEAD_WINDOW, K_KV_SPARSITY, K_KV_WINDOW, K_SCORES, K_SINK

I32_MAX = 0x7FFFFFFF


def _num(key: str, v: Any, lo: float, hi: float, integer: bool):
    import math

    bad = isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int))
    if bad or not math.isfinite(float(v)) or not lo <= v <= hi:
        what = "an integer" if integer else "a number"
        raise KvtoolError(f"{key}: must be {what} in [{lo:g}, {hi:g}], got {v!r}")
    return int(v) if integer else float(v)


def check_overrides(sparsity: Any = None, window: Any = None, sink: Any = None) -> dict:
    """The three values checked (None = keep the file's), as ``{key: value}`` for ``kv_overrides``."""
    out: dict = {}
    if sparsity is not None:
        out[K_KV_SPARSITY] = _num(K_KV_SPARSITY, sparsity, 0.0, 1.0, False)
    if window is not None:
        out[K_KV_WINDOW] = _num(K_KV_WINDOW, window, 1, I32_MAX, True)
    if sink is not None:
        out[K_SINK] = _num(K_SINK, sink, 0, I32_MAX, True)
    return out


def apply_overrides(budgets, overrides: dict, where: str = ""):
    """The ``Budgets`` the runtime will load with these overrides; one KvtoolError naming the key when the file
    cannot take them (no budgets, or no scores for a sparsity or window)."""
    if not overrides:
        return budgets
    key = next(iter(overrides))
    if budgets is None or budgets.head_window is None:
        raise KvtoolError(f"{where}{key}: the file has no kvtool budgets ({K_HEAD_WINDOW}); convert it with "
                          f"kvtool convert --mask heads.json first")
    b = budgets
    if K_SINK in overrides:
        b = dataclasses.replace(b, sink=overrides[K_SINK])
    if K_KV_SPARSITY not in overrides and K_KV_WINDOW not in overrides:
        return b
    key = K_KV_SPARSITY if K_KV_SPARSITY in overrides else K_KV_WINDOW
    if b.scores is None:
        raise KvtoolError(f"{where}{key}: the file has no {K_SCORES} to rebuild its mask from (convert it again "
                          f"from a heads.json that has scores)")
    window = overrides.get(K_KV_WINDOW, b.heads_window)
    if window is None:
        raise KvtoolError(f"{where}{key}: the file has no kvtool.heads.window; give {K_KV_WINDOW} too")
    if K_KV_SPARSITY in overrides:
        from ..heads import mask_from_scores

        full = mask_from_scores(b.scores, overrides[K_KV_SPARSITY], b.per_layer)
    else:  # a window alone keeps the file's choice of heads
        full = [[w == 0 for w in row] for row in b.head_window]
    head_window = [[0 if f else int(window) for f in row] for row in full]
    sparsity = overrides.get(K_KV_SPARSITY, b.sparsity)
    return dataclasses.replace(b, head_window=head_window, sparsity=sparsity, heads_window=int(window))


def resolve(budgets, sparsity: Any = None, window: Any = None, sink: Any = None,
            where: str = "") -> tuple[Optional[dict], Any]:
    """(kv_overrides entries or None, the budgets the load will run with)."""
    ov = check_overrides(sparsity, window, sink)
    return (ov or None), apply_overrides(budgets, ov, where)
