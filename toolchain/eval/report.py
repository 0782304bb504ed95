"""The eval report: the Markdown result table and the accuracy-vs-memory Pareto plot."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

from ..fmt import fmt_bytes


def _fmt_bytes(x: Optional[float]) -> str:
    return fmt_bytes(x, digits=2, missing="-")


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
    import io

    from ..heads import write_atomic

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return write_atomic(out, buf.getvalue())
