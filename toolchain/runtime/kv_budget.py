"""``--kv-budget SIZE``: the least compression whose KV cache fits in SIZE, chosen before the model loads.

Why here and by the memory formula: the choice must be the same in chat, generate, serve, eval, ``Model.load`` and
``kvtool plan --mem``, and must not need a trial load. ``memory.predict`` is the rule the runtime allocates by
(tests check measured == predicted), so "fits" is exact for the KV cache (compute buffers and weights are extra).

Rule. The candidates are the masks the file's scores give at each number k of compressed heads (k = 0 is the
full cache), each named by the shortest sparsity that the mask rule maps to k; their bytes fall as k grows.
* a fixed ``n_ctx``: the smallest k (so the smallest sparsity) whose cache fits;
* ``n_ctx="auto"``: the goal is the training context T (``n_ctx_train``; 2^17 when the file gives none). At the
  file's own sparsity if T fits there, else at the smallest higher sparsity where it fits; when T fits nowhere,
  the largest context (a multiple of 256) that fits at the file's own sparsity. Context is never bought with a
  sparsity the file was not made for unless it reaches T: below it, the file's quality is kept.
A file without scores keeps its mask: only the context is chosen. Nothing fitting is one KvtoolError line.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from ..errors import KvtoolError
from ..fmt import fmt_bytes
from .memory import ModelDims, predict

N_CTX_AUTO_CAP = 1 << 17  # when the file states no training context


@dataclass(frozen=True)
class Choice:
    n_ctx: int
    sparsity: Optional[float]  # None: the file's mask as it is (no override)
    n_compressed: int
    n_heads: int
    kv_bytes: int
    budget: int

    def summary(self) -> str:
        s = "the file's mask" if self.sparsity is None else f"sparsity {self.sparsity:g}"
        return (f"{s} ({self.n_compressed} of {self.n_heads} KV heads compressed), n_ctx {self.n_ctx}: "
                f"predicted KV {fmt_bytes(self.kv_bytes)} ({self.kv_bytes} bytes)")

    def line(self) -> str:
        """The one line every command prints for the choice."""
        return f"kvtool: --kv-budget {fmt_bytes(self.budget)}: {self.summary()}"

    def llama_args(self) -> list[str]:
        """The same choice for a llama.cpp app or llama-server: context size and the sparsity override."""
        args = ["--ctx-size", str(self.n_ctx)]
        if self.sparsity is not None:
            args += ["--override-kv", f"kvtool.kv.sparsity=float:{self.sparsity!r}"]
        return args


def sparsity_for(k: int, n: int) -> float:
    """The shortest decimal sparsity whose mask compresses exactly k of n heads (k/n itself always does)."""
    from ..heads import n_compressed

    for digits in range(2, 8):
        s = round(k / n, digits)
        if n_compressed(s, n) == k:
            return s
    return k / n


def _masks(budgets, n: int):
    """(sparsity or None, k, windows) candidates, k (compressed heads) rising, so bytes falling."""
    if budgets is None or budgets.head_window is None:
        return [(None, 0, None)]
    if budgets.scores is None or budgets.heads_window is None:
        return [(None, _k(budgets.head_window), budgets.head_window)]
    from ..heads import mask_from_scores

    L, H = len(budgets.head_window), len(budgets.head_window[0])
    per = H if budgets.per_layer else n  # the rule counts k inside each layer with per_layer
    out = []
    for k in range(per + 1):
        s = sparsity_for(k, per)
        full = mask_from_scores(budgets.scores, s, budgets.per_layer)
        out.append((s, k * (L if budgets.per_layer else 1),
                     [[0 if f else budgets.heads_window for f in row] for row in full]))
    return out


def _k(windows) -> int:
    return sum(1 for row in windows or [] for w in row if w > 0)


def _bytes(dims, windows, sink, n_ctx, n_ubatch, cache_type, flash_attn, swa_full=False) -> int:
    return predict(dims, windows, sink, n_ctx, n_ubatch, 1, cache_type, cache_type, flash_attn,
                   mixed=windows is not None, swa_full=swa_full).mixed_bytes


def max_ctx(dims: ModelDims, windows, sink: int, budget: int, n_ubatch: int, cache_type: str, mixed: bool,
            limit: Optional[int] = None, device_layers: Optional[int] = None, swa_full: bool = False,
            flash_attn: bool = True) -> int:
    """Largest n_ctx (a multiple of 256, at most ``limit``) whose KV cache fits in ``budget`` bytes; 0 if even 256
    does not fit. With ``device_layers`` only the KV of the last that many layers (those on the device) counts."""
    def fits(c: int) -> bool:
        plan = predict(dims, windows, sink, c, n_ubatch, 1, cache_type, cache_type, flash_attn, mixed=mixed,
                       swa_full=swa_full)
        return (plan.mixed_bytes if device_layers is None else plan.device_bytes(device_layers)) <= budget

    if not fits(256):
        return 0
    cap = (limit or (1 << 24)) // 256 * 256 or 256
    lo, hi = 256, 512
    while hi <= cap and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, cap + 256)
    while hi - lo > 256:  # bytes grow with n_ctx, so bisect on multiples of 256
        mid = (lo + hi) // 2 // 256 * 256
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return min(lo, cap)


def choose(dims: ModelDims, budgets, budget: int, n_ctx: Union[int, str], n_ubatch: int = 512,
           cache_type: str = "f16", flash_attn: bool = True, mixed: bool = True, swa_full: bool = False) -> Choice:
    """The choice for ``budget`` bytes of KV; ``mixed=False`` plans a full cache (context only). ``swa_full``: a
    sliding-window hybrid's full-size SWA cache (``--swa-full``) counts as llama.cpp allocates it."""
    from ..validate import N_CTX_MAX

    if budget < 1:
        raise KvtoolError(f"--kv-budget must be a positive size, got {budget} bytes")
    n = dims.n_layer * dims.n_head_kv[0]
    sink = budgets.sink if budgets is not None else 0
    cands = _masks(budgets if mixed else None, n)
    if n_ctx == "auto":
        target = min(dims.n_ctx_train or N_CTX_AUTO_CAP, N_CTX_MAX) // 256 * 256 or 256
        own = (None, _k(budgets.head_window), budgets.head_window) if mixed and budgets and budgets.head_window \
            else (None, 0, None)
        for s, k, wins in [own] + [c for c in cands if c[1] > own[1]]:
            b = _bytes(dims, wins, sink, target, n_ubatch, cache_type, flash_attn, swa_full)
            if b <= budget:
                return Choice(target, s, k, n, b, budget)
        _, k, wins = own
        c = max_ctx(dims, wins, sink, budget, n_ubatch, cache_type, wins is not None, target, swa_full=swa_full,
                    flash_attn=flash_attn)
        if c:
            b = _bytes(dims, wins, sink, c, n_ubatch, cache_type, flash_attn, swa_full)
            return Choice(c, None, k, n, b, budget)
        raise KvtoolError(f"--kv-budget {fmt_bytes(budget)}: not even a 256-token context fits (it takes "
                          f"{fmt_bytes(_bytes(dims, wins, sink, 256, n_ubatch, cache_type, flash_attn, swa_full))})")
    for s, k, wins in cands:
        b = _bytes(dims, wins, sink, n_ctx, n_ubatch, cache_type, flash_attn, swa_full)
        if b <= budget:
            return Choice((n_ctx + 255) // 256 * 256, s, k, n, b, budget)
    least = min(_bytes(dims, w, sink, n_ctx, n_ubatch, cache_type, flash_attn, swa_full) for _, _, w in cands)
    hint = "" if len(cands) > 1 else " (the file has no kvtool.heads.scores, so its mask cannot change)"
    raise KvtoolError(f"--kv-budget {fmt_bytes(budget)}: nothing fits n_ctx {n_ctx}; the smallest cache takes "
                      f"{fmt_bytes(least)}{hint}: lower --n-ctx or use --n-ctx auto")
