"""KV bytes a generation actually used, per live cell: what ``kvtool eval`` reports next to what was allocated.

Why in the runtime: the numbers come from the loaded context (``kvtool_kv_bytes``, ``kvtool_kv_groups``,
``kvtool_kv_used_cells``) and the allocation model of :mod:`toolchain.runtime.memory`; callers pass a ``Model``.
"""
from __future__ import annotations

from .library import kv_bytes, kv_groups, kv_used_cells
from .memory import cache_bytes


def mixed_active(b) -> bool:
    """Whether budgets ``b`` (``read_budgets``; None for a file without) compress at least one head."""
    return (b is not None and b.head_window is not None and bool(getattr(b, "enabled", True))
            and any(w > 0 for row in b.head_window for w in row))


def bytes_per_cell(model) -> tuple[float, float]:
    """(bytes per cell of the full-head cache, bytes per cell of the rings) for this load's KV settings."""
    dims, b = model.dims, model.budgets
    ct = model.cache_type
    ctx = model.llama._ctx.ctx
    active, _, ring_b = kv_bytes(ctx)
    if not active:
        return float(cache_bytes(dims, dims.n_head_kv, 1, 1, ct, ct, model.flash_attn)), 0.0
    groups = kv_groups(ctx)
    windows = {w for w, _ in groups}
    full_pl = [sum(1 for w in row if w == 0 or w not in windows) for row in b.head_window]
    full = float(cache_bytes(dims, full_pl, 1, 1, ct, ct, model.flash_attn)) if any(full_pl) else 0.0
    ring_cells = sum(c for w, c in groups if w > 0)
    return full, (ring_b / ring_cells if ring_cells else 0.0)


def retained_bytes(model, n_tokens: int, full_cells: int, mixed_on: bool) -> int:
    """KV bytes a tight cache would need for what attention can still see: the full heads' live cells plus, per
    window ``w``, ``min(n_tokens, sink + w)`` cells of that window's heads. The runtime's rings are larger (sized
    ``pad256(W + S + ubatch)`` and, as llama.cpp's SWA cache, cleared only when overwritten), so for short sequences
    their used cells overstate what a head retains; this is the measure to compare methods at equal memory."""
    dims, b, ct = model.dims, model.budgets, model.cache_type
    full = float(cache_bytes(dims, dims.n_head_kv, 1, 1, ct, ct, model.flash_attn))
    if not mixed_on or not mixed_active(b):
        return int(round(full_cells * full))
    total = 0.0
    full_pl = [sum(1 for w in row if w == 0) for row in b.head_window]
    if any(full_pl):
        total += full_cells * cache_bytes(dims, full_pl, 1, 1, ct, ct, model.flash_attn)
    for w in sorted({w for row in b.head_window for w in row if w > 0}):
        pl = [sum(1 for x in row if x == w) for row in b.head_window]
        total += min(n_tokens, b.sink + w) * cache_bytes(dims, pl, 1, 1, ct, ct, model.flash_attn)
    return int(round(total))


def live_bytes(model, bpc: tuple[float, float]) -> tuple[int, int, int]:
    full_c, ring_c = kv_used_cells(model.llama._ctx.ctx)
    return int(round(full_c * bpc[0] + ring_c * bpc[1])), full_c, ring_c
