"""The plot of ``bench/smollm2_equal_memory.py``: passkey accuracy against allocated KV bytes, one panel per context,
with the Pareto front and labels placed so they do not overlap.

Why its own placement: the rows crowd at a few memory sizes (a trained and three random masks share each s), so fixed
offsets overlap. Each label tries candidate offsets around its point, nearest first, and takes the first whose box
overlaps no label, marker or the panel edge already placed; random seeds of one s share one label.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

STYLE = {"full": ("*", "tab:red", 12), "quant": ("s", "tab:green", 7), "trained": ("D", "tab:blue", 7),
         "random": ("o", "tab:gray", 6), "streaming": ("v", "tab:brown", 8), "trained+q8_0": ("^", "tab:purple", 8)}
NAMES = {"full": "full f16", "quant": "stock KV quantization", "trained": "trained (Duo) mask",
         "random": "random mask (3 seeds)", "streaming": "all heads compressed (S16+W64)",
         "trained+q8_0": "trained mask + q8_0"}


def pareto(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of points no other point beats (no more memory, no less accuracy, one strictly), by memory."""
    keep = [i for i, (x, y) in enumerate(points)
            if not any(x2 <= x and y2 >= y and (x2 < x or y2 > y) for j, (x2, y2) in enumerate(points) if j != i)]
    return sorted(keep, key=lambda i: points[i][0])


def _seeds(k: int) -> str:
    return f"random mask ({k} seed{'s' if k != 1 else ''})"


def _label(r: dict) -> str:
    if r["kind"] == "random":
        return f"random s={r['s']:g}"
    if r["kind"] == "trained":
        return f"trained s={r['s']:g}"
    return {"full": "full", "streaming": "all compressed", "trained+q8_0": "trained s=0.5+q8_0"}.get(r["kind"], r["name"])


def _place(ax, renderer, items, taken) -> None:
    """items: (x, y, text); taken: display-space boxes to avoid. Greedy, nearest free offset first."""
    offsets = [(dx, dy) for r in (8, 16, 26, 38) for dx, dy in
               ((r, r // 2), (r, -r), (-r, r // 2), (-r, -r), (0, r), (0, -r - 4), (r, 0), (-r, 0))]
    panel = ax.get_window_extent(renderer)
    for x, y, text in items:
        placed = None
        for dx, dy in offsets:
            t = ax.annotate(text, (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=7,
                            ha="left" if dx >= 0 else "right", va="center",
                            arrowprops=dict(arrowstyle="-", color="0.6", lw=0.5) if abs(dx) + abs(dy) > 20 else None)
            bb = t.get_window_extent(renderer).expanded(1.05, 1.15)
            inside = (bb.x0 >= panel.x0 and bb.x1 <= panel.x1 and bb.y0 >= panel.y0 and bb.y1 <= panel.y1)
            if inside and not any(bb.overlaps(o) for o in taken):
                placed = bb
                break
            t.remove()
        if placed is None:  # nowhere free: the last resort is the first offset, still drawn
            t = ax.annotate(text, (x, y), textcoords="offset points", xytext=offsets[0], fontsize=7)
            placed = t.get_window_extent(renderer)
        taken.append(placed)


def plot(table: Sequence[dict], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from toolchain.heads import write_atomic

    ctxs = sorted({int(c) for r in table for c in r["passkey"]})
    if not ctxs:
        raise ValueError("no passkey results to plot")
    fig, axes = plt.subplots(1, len(ctxs), figsize=(8.4 * len(ctxs), 5.0), squeeze=False)
    for ax, ctx in zip(axes[0], ctxs):
        pts = [(r, r["passkey"][str(ctx)]) for r in table if str(ctx) in r["passkey"]]
        xs = [v["allocated_kv_bytes"] / 2**20 for _, v in pts]
        ys = [v["accuracy"] for _, v in pts]
        span = max(xs) - min(xs) or 1.0
        shown, bars = [], []
        for kind in STYLE:
            idx = [i for i, (r, _) in enumerate(pts) if r["kind"] == kind]
            if not idx:
                continue
            marker, color, size = STYLE[kind]
            # random seeds share their x (same bytes): spread them a little so each error bar shows
            jit = [((pts[i][0].get("seed", 1) - 1) * 0.012 * span) if kind == "random" else 0.0 for i in idx]
            name = NAMES[kind] if kind != "random" else _seeds(len({pts[i][0].get("seed") for i in idx}))
            ax.errorbar([xs[i] + j for i, j in zip(idx, jit)], [ys[i] for i in idx],
                        yerr=[[ys[i] - pts[i][1]["ci95"][0] for i in idx], [pts[i][1]["ci95"][1] - ys[i] for i in idx]],
                        fmt=marker, color=color, ms=size, capsize=3, alpha=0.85, label=name, lw=1)
            shown += [(xs[i] + j, ys[i]) for i, j in zip(idx, jit)]
            bars += [(xs[i] + j, pts[i][1]["ci95"][0], pts[i][1]["ci95"][1]) for i, j in zip(idx, jit)]
        front = pareto(list(zip(xs, ys)))
        ax.step([xs[i] for i in front] + [max(xs)], [ys[i] for i in front] + [ys[front[-1]]], where="post", ls="--",
                color="black", lw=1, alpha=0.6)
        ax.plot([xs[i] for i in front], [ys[i] for i in front], "o", ms=15, mfc="none", mec="black", alpha=0.6,
                label="Pareto front (best accuracy for its memory)")
        ax.set_xlim(min(xs) - 0.12 * span, max(xs) + 0.12 * span)
        ax.set_ylim(-0.08, 1.12)
        ax.set_xlabel(f"allocated KV at ctx {ctx} (MiB, measured)")
        ax.set_ylabel("passkey accuracy (95% Wilson CI)")
        n = max(v["n"] for _, v in pts)
        ax.set_title(f"SmolLM2-135M Q4_1, passkey ctx={ctx}, n={n} per point unless labelled", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, framealpha=0.9)  # outside: no label under it
        fig.tight_layout()
        renderer = fig.canvas.get_renderer()
        taken = [ax.get_legend().get_window_extent(renderer)]
        taken += [matplotlib.transforms.Bbox([[px - 11, py - 11], [px + 11, py + 11]])
                  for px, py in (ax.transData.transform((x, y)) for x, y in shown)]
        for x, lo, hi in bars:  # error bars (with their caps) are in the way too
            (px, p0), (_, p1) = ax.transData.transform((x, lo)), ax.transData.transform((x, hi))
            taken.append(matplotlib.transforms.Bbox([[px - 6, p0 - 2], [px + 6, p1 + 2]]))
        items, seen = [], set()
        for (r, v), x, y in zip(pts, xs, ys):
            text = _label(r) + (f" (n={v['n']})" if v["n"] != n and r["kind"] != "random" else "")
            if text in seen:
                continue
            seen.add(text)
            if r["kind"] == "random":  # one label for the seeds, at their mean
                grp = [(x2, y2) for (r2, _), x2, y2 in zip(pts, xs, ys) if _label(r2) == _label(r)]
                x, y = sum(a for a, _ in grp) / len(grp), sum(b for _, b in grp) / len(grp)
            items.append((x, y, text))
        _place(ax, renderer, items, taken)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return write_atomic(out, buf.getvalue())
