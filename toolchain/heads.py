"""heads.json: which KV heads keep a full cache and which keep only sink + window.

Why one module: the mask rule must be identical for importers, random baselines, training and ``convert``
(docs/architecture.md §1), so it lives here once. The rule is deterministic on purpose: RLKV's own rule is a global
quantile with random tie noise, which would make two conversions of the same scores differ.

The rule (``mask_from_scores``): clip scores to [0, 1]; compress the k = floor(s·N + 1/2) lowest-scored heads,
ties broken by (score, layer, head) ascending. N = L·H globally, or H inside each layer with ``per_layer``.
s·N is computed on the decimal the user wrote (0.35 is 35/100, not the nearest binary float), so 0.35 × 10 = 3.5
rounds to 4 everywhere instead of to 3 on a float-rounding accident.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from .errors import KvtoolError

FORMAT = "kvtool.heads/1"
METHODS = ("rlkv", "duo", "kvtool-rlkv", "random", "manual")
DEFAULT_SINK = 16
DEFAULT_WINDOW = 64
_KEYS = {"format", "method", "n_layer", "n_head_kv", "scores", "full", "sink", "window", "sparsity",
         "per_layer", "model", "extra"}


def read_text(p: Path) -> str:
    """A UTF-8 input file, or one KvtoolError line saying why not."""
    try:
        return p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise KvtoolError(f"{p}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise KvtoolError(f"{p}: cannot read ({e.__class__.__name__})") from None


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_))


def check_sparsity(s: Any) -> float:
    if not _is_num(s) or not math.isfinite(float(s)) or not 0.0 <= float(s) <= 1.0:
        raise KvtoolError(f"sparsity must be a number in [0, 1], got {s!r}")
    return float(s)


# the runtime stores sink and windows as i32 (cpp/kvtool-config.cpp): larger values are refused here, where a
# heads.json is made, not first by convert
_I32_MAX = 0x7FFFFFFF


def check_sink(S: Any) -> int:
    if not _is_int(S) or not 0 <= S <= _I32_MAX:
        raise KvtoolError(f"sink must be an integer in [0, {_I32_MAX}], got {S!r}")
    return int(S)


def check_window(W: Any) -> int:
    if not _is_int(W) or not 1 <= W <= _I32_MAX:
        raise KvtoolError(f"window must be an integer in [1, {_I32_MAX}], got {W!r}")
    return int(W)


def n_compressed(sparsity: float, n: int) -> int:
    """k = floor(s·n + 1/2), with s read as the shortest decimal that prints as it (see module doc)."""
    s = Fraction(repr(float(check_sparsity(sparsity))))
    return math.floor(s * n + Fraction(1, 2))


def _score_array(scores: Any) -> np.ndarray:
    try:
        a = np.asarray(scores, dtype=np.float64)
    except (TypeError, ValueError):
        raise KvtoolError("scores must be an L x H table of numbers (ragged or non-numeric rows)") from None
    if a.ndim != 2 or a.shape[0] < 1 or a.shape[1] < 1:
        raise KvtoolError(f"scores must be a non-empty L x H table, got shape {a.shape}")
    if not np.isfinite(a).all():
        li, hi = map(int, np.argwhere(~np.isfinite(a))[0])
        raise KvtoolError(f"scores contain a non-finite value at layer {li}, head {hi}")
    return a


def mask_from_scores(scores: Any, sparsity: float, per_layer: bool = False) -> list[list[bool]]:
    """The one mask rule: returns full[l][h] (True = full head, False = compressed)."""
    a = np.clip(_score_array(scores), 0.0, 1.0)
    L, H = a.shape
    full = np.ones((L, H), dtype=bool)
    layer, head = np.meshgrid(np.arange(L), np.arange(H), indexing="ij")
    if per_layer:
        k = n_compressed(sparsity, H)
        for li in range(L):
            order = np.lexsort((np.arange(H), a[li]))  # last key is primary: score, then head
            full[li, order[:k]] = False
    else:
        k = n_compressed(sparsity, L * H)
        order = np.lexsort((head.ravel(), layer.ravel(), a.ravel()))
        full.ravel()[order[:k]] = False
    return full.tolist()


@dataclass
class HeadsMask:
    """A validated heads.json. ``full[l][h]`` is True for a full head; compressed heads keep sink + window."""

    method: str
    n_layer: int
    n_head_kv: int
    full: list[list[bool]]
    sink: int = DEFAULT_SINK
    window: int = DEFAULT_WINDOW
    sparsity: float = 0.0
    scores: Optional[list[list[float]]] = None
    per_layer: Optional[bool] = None
    model: Optional[dict[str, Any]] = None
    extra: Optional[dict[str, Any]] = None
    format: str = FORMAT

    # --- construction ---------------------------------------------------------------------------------------
    @classmethod
    def from_scores(cls, scores: Any, sparsity: float, method: str, per_layer: bool = False,
                    sink: int = DEFAULT_SINK, window: int = DEFAULT_WINDOW,
                    model: Optional[dict[str, Any]] = None) -> "HeadsMask":
        a = _score_array(scores)
        m = cls(method=method, n_layer=a.shape[0], n_head_kv=a.shape[1],
                full=mask_from_scores(a, sparsity, per_layer), sink=sink, window=window,
                sparsity=check_sparsity(sparsity), scores=a.tolist(), per_layer=bool(per_layer), model=model)
        m.validate()
        return m

    @classmethod
    def from_dict(cls, d: Any) -> "HeadsMask":
        if not isinstance(d, dict):
            raise KvtoolError("heads.json must hold a JSON object")
        unknown = sorted(set(d) - _KEYS)
        if unknown:
            raise KvtoolError(f"heads.json has unknown key(s): {', '.join(unknown)}")
        missing = [k for k in ("format", "method", "n_layer", "n_head_kv", "full", "sink", "window", "sparsity")
                   if k not in d]
        if missing:
            raise KvtoolError(f"heads.json lacks key(s): {', '.join(missing)}")
        m = cls(**{k: d[k] for k in d})
        m.validate()
        return m

    @classmethod
    def load(cls, path: str | os.PathLike) -> "HeadsMask":
        p = Path(path)
        text = read_text(p)
        if not text.strip():
            raise KvtoolError(f"{p}: empty file")

        def no_constants(c: str) -> float:
            raise KvtoolError(f"{p}: {c} is not allowed in heads.json")

        try:
            d = json.loads(text, parse_constant=no_constants)
        except json.JSONDecodeError as e:
            raise KvtoolError(f"{p}: not valid JSON (line {e.lineno}: {e.msg})") from None
        except RecursionError:
            raise KvtoolError(f"{p}: JSON nested too deeply for a heads.json") from None
        try:
            return cls.from_dict(d)
        except KvtoolError as e:
            msg = str(e)
            raise KvtoolError(msg if msg.startswith(str(p)) else f"{p}: {msg}") from None

    # --- checks ---------------------------------------------------------------------------------------------
    def validate(self) -> "HeadsMask":
        if self.format != FORMAT:
            raise KvtoolError(f"format must be {FORMAT!r}, got {self.format!r}")
        if self.method not in METHODS:
            raise KvtoolError(f"method must be one of {'|'.join(METHODS)}, got {self.method!r}")
        for name in ("n_layer", "n_head_kv"):
            v = getattr(self, name)
            if not _is_int(v) or v < 1:
                raise KvtoolError(f"{name} must be an integer >= 1, got {v!r}")
        self.sink, self.window = check_sink(self.sink), check_window(self.window)
        self.sparsity = check_sparsity(self.sparsity)
        shape = f"{self.n_layer}x{self.n_head_kv}"
        if not isinstance(self.full, list) or len(self.full) != self.n_layer \
                or any(not isinstance(r, list) or len(r) != self.n_head_kv for r in self.full):
            raise KvtoolError(f"full must be {shape} (n_layer x n_head_kv) lists of booleans")
        if any(not isinstance(x, bool) for r in self.full for x in r):
            raise KvtoolError("full must hold only true/false")
        if self.scores is not None:
            if not isinstance(self.scores, list) or len(self.scores) != self.n_layer \
                    or any(not isinstance(r, list) or len(r) != self.n_head_kv for r in self.scores):
                raise KvtoolError(f"scores must be {shape} (n_layer x n_head_kv), the shape of full")
            if any(not _is_num(x) for r in self.scores for x in r):
                raise KvtoolError("scores must hold only numbers")
            _score_array(self.scores)
        if self.per_layer is not None and not isinstance(self.per_layer, bool):
            raise KvtoolError(f"per_layer must be true/false, got {self.per_layer!r}")
        if self.model is not None:
            if not isinstance(self.model, dict) or set(self.model) - {"arch", "name"} \
                    or any(not isinstance(v, str) for v in self.model.values()):
                raise KvtoolError('model must be {"arch": str, "name": str} (both optional)')
        if self.extra is not None and not isinstance(self.extra, dict):
            raise KvtoolError("extra must be a JSON object")
        return self

    # --- derived --------------------------------------------------------------------------------------------
    def with_sparsity(self, sparsity: float, per_layer: Optional[bool] = None) -> "HeadsMask":
        """Re-derive ``full`` from the stored scores at another sparsity (convert's --sparsity)."""
        if self.scores is None:
            raise KvtoolError("this heads.json has no scores, so --sparsity cannot re-derive its mask")
        pl = self.per_layer if per_layer is None else per_layer
        d = self.to_dict()
        d.update(full=mask_from_scores(self.scores, sparsity, bool(pl)), sparsity=check_sparsity(sparsity),
                 per_layer=bool(pl))
        return HeadsMask.from_dict(d)

    def head_window(self) -> list[int]:
        """Layer-major window per KV head as stored in GGUF: 0 = full, W = compressed."""
        return [0 if f else self.window for row in self.full for f in row]

    def layer_counts(self) -> list[tuple[int, int]]:
        """(full, compressed) per layer."""
        return [(sum(r), len(r) - sum(r)) for r in self.full]

    def n_compressed(self) -> int:
        return sum(c for _, c in self.layer_counts())

    # --- output ---------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"format": self.format, "method": self.method, "n_layer": self.n_layer,
                             "n_head_kv": self.n_head_kv, "sink": self.sink, "window": self.window,
                             "sparsity": self.sparsity}
        for k in ("per_layer", "model", "extra"):
            if getattr(self, k) is not None:
                d[k] = getattr(self, k)
        if self.scores is not None:
            d["scores"] = [[float(x) for x in r] for r in self.scores]
        d["full"] = [list(r) for r in self.full]
        return d

    def to_json(self) -> str:
        # One row per line keeps a 32x8 file readable and diffable.
        d = self.to_dict()
        tables = {k: d.pop(k) for k in ("scores", "full") if k in d}
        head = json.dumps(d, indent=2)[:-2]
        parts = [head]
        for k, rows in tables.items():
            body = ",\n".join("    " + json.dumps(r) for r in rows)
            parts.append(f',\n  "{k}": [\n{body}\n  ]')
        return "".join(parts) + "\n}\n"

    def save(self, path: str | os.PathLike) -> Path:
        self.validate()
        return write_atomic(path, self.to_json().encode("utf-8"))


def default_file_mode() -> int:
    """mkstemp makes 0600 files; a finished output should get the usual umask-derived mode."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def write_atomic(path: str | os.PathLike, data: bytes, inputs: Sequence[str | os.PathLike] = ()) -> Path:
    """Write to a locked temp file in the same directory, then rename: a reader never sees a half file, a full
    disk or a signal leaves no temp file, and ``path`` may not be one of ``inputs`` or a device (``validate``)."""
    from .atomic import atomic_output, write_all
    from .validate import check_output_path

    p = check_output_path(path, inputs)
    with atomic_output(p, default_file_mode()) as fd:
        write_all(fd, data)
    return p


# --- importers and generators ------------------------------------------------------------------------------
_NUMBER = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|[+-]?(?:nan|inf)", re.I)


def read_score_tsv(path: str | os.PathLike) -> list[list[float]]:
    """An L x H table of floats, one layer per line, columns separated by tabs (or spaces).

    Both RLKV's ``adapter_weights.tsv`` and DuoAttention's ``full_attention_heads.tsv`` are this layout
    (``numpy.savetxt`` of the per-layer, per-KV-head gate values).
    """
    p = Path(path)
    text = read_text(p)
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise KvtoolError(f"{p}: empty file (expected rows = layers, columns = KV heads)")
    rows: list[list[float]] = []
    for i, line in enumerate(lines, 1):
        cells = line.split()
        if not cells:
            raise KvtoolError(f"{p}: line {i} is empty")
        row = []
        for j, c in enumerate(cells, 1):
            # float() also takes "1_0" (= 10.0) and "infinity"; a score cell is a plain decimal number
            if not _NUMBER.fullmatch(c):
                raise KvtoolError(f"{p}: line {i}, column {j}: {c[:40]!r} is not a number")
            v = float(c)
            if not math.isfinite(v):
                raise KvtoolError(f"{p}: line {i}, column {j}: {c!r} is not a finite number")
            row.append(v)
        if rows and len(row) != len(rows[0]):
            raise KvtoolError(f"{p}: ragged rows: line {i} has {len(row)} columns, line 1 has {len(rows[0])}")
        rows.append(row)
    return rows


def import_scores(kind: str, path: str | os.PathLike, sparsity: float, per_layer: bool = False,
                  sink: int = DEFAULT_SINK, window: int = DEFAULT_WINDOW) -> HeadsMask:
    """RLKV (``rlkv``) or DuoAttention (``duo``) per-head scores -> HeadsMask under the one rule."""
    if kind not in ("rlkv", "duo"):
        raise KvtoolError(f"unknown score format {kind!r} (rlkv|duo)")
    check_sparsity(sparsity), check_sink(sink), check_window(window)
    return HeadsMask.from_scores(read_score_tsv(path), sparsity, kind, per_layer, sink, window)


def random_mask(n_layer: int, n_head_kv: int, sparsity: float, seed: int, per_layer: bool = False,
                sink: int = DEFAULT_SINK, window: int = DEFAULT_WINDOW,
                model: Optional[dict[str, Any]] = None) -> HeadsMask:
    """The baseline: uniform random scores (PCG64 seeded) under the same rule, so exactly k heads compressed."""
    for name, v in (("n_layer", n_layer), ("n_head_kv", n_head_kv)):
        if not _is_int(v) or v < 1:
            raise KvtoolError(f"{name} must be an integer >= 1, got {v!r}")
    if not _is_int(seed) or seed < 0:
        raise KvtoolError(f"seed must be an integer >= 0, got {seed!r}")
    scores = np.random.Generator(np.random.PCG64(seed)).random((n_layer, n_head_kv))
    m = HeadsMask.from_scores(scores, sparsity, "random", per_layer, sink, window, model)
    m.extra = {"seed": int(seed)}
    return m


def format_map(mask: HeadsMask) -> str:
    """Per-layer counts and an L x H map: F = full, c = compressed."""
    w = len(str(mask.n_layer - 1))
    lines = [f"method {mask.method}  {mask.n_layer}x{mask.n_head_kv} (layers x kv heads)  "
             f"sparsity {mask.sparsity:g}{' per layer' if mask.per_layer else ''}  sink {mask.sink}  "
             f"window {mask.window}",
             f"compressed {mask.n_compressed()} of {mask.n_layer * mask.n_head_kv} heads"]
    if mask.model:
        lines.append("model " + " ".join(f"{k}={v}" for k, v in mask.model.items()))
    for li, (row, (nf, nc)) in enumerate(zip(mask.full, mask.layer_counts())):
        cells = "".join("F" if f else "c" for f in row)
        lines.append(f"layer {li:>{w}}  full {nf:>{len(str(mask.n_head_kv))}}  compressed "
                     f"{nc:>{len(str(mask.n_head_kv))}}  {cells}")
    return "\n".join(lines)


def plot_mask(mask: HeadsMask, out: str | os.PathLike) -> Path:
    """Heatmap PNG: scores if present (else the mask), compressed heads marked with a dot."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise KvtoolError("--plot needs matplotlib: pip install matplotlib (or kvtool[train])") from None
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise KvtoolError(f"--plot writes a PNG; give a .png path, got {out.name}")
    data = np.clip(np.asarray(mask.scores, float), 0, 1) if mask.scores is not None \
        else np.asarray(mask.full, float)
    fig, ax = plt.subplots(figsize=(max(3.0, 0.35 * mask.n_head_kv + 2), max(3.0, 0.22 * mask.n_layer + 1.5)))
    im = ax.imshow(data, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    comp = np.argwhere(~np.asarray(mask.full, bool))
    if len(comp):
        ax.scatter(comp[:, 1], comp[:, 0], s=8, c="white", marker="o", label="compressed")
        ax.legend(loc="upper right", fontsize=7, framealpha=0.6)
    ax.set_xlabel("KV head")
    ax.set_ylabel("layer")
    ax.set_title(f"{mask.method}  s={mask.sparsity:g}  S={mask.sink} W={mask.window}", fontsize=9)
    fig.colorbar(im, ax=ax, label="score" if mask.scores is not None else "full")
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return write_atomic(out, buf.getvalue())


def shape_error(mask_shape: Sequence[int], model_shape: Sequence[int]) -> KvtoolError:
    return KvtoolError(f"mask is {mask_shape[0]}x{mask_shape[1]} but model has {model_shape[0]}x{model_shape[1]} "
                       f"(block_count x head_count_kv)")
