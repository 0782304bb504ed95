"""heads.json -> the per-head tables other runtimes load: RLKV's ``adapter_weights.tsv``, DuoAttention's
``full_attention_heads.tsv``.

Why this exists: a mask found or chosen with kvtool should serve unchanged on a datacenter runtime that speaks one
of these formats (docs/running.md). Both are the same layout, the one the importer reads
(:func:`toolchain.heads.read_score_tsv`): an L x H table of floats, one line per layer, one tab-separated column per
KV head, numbers in numpy ``savetxt``'s default ``%.18e``.

What is written by default is the *mask*, not the scores: 1.0 for a full head, 0.0 for a compressed one. Each
consumer turns the table into a mask with its own rule (a threshold, or a quantile at a sparsity, with its own tie
handling), so soft scores could give another mask there than here. A 0/1 table gives the same mask under any
threshold strictly between 0 and 1, and under any "compress the k lowest" rule with k = the number of compressed
heads, whatever its tie order, because every 0 lies below every 1. ``scores=True`` writes the stored scores instead
(for a consumer that should re-threshold them), clipped to [0, 1] as kvtool's own rule clips them.

Sink and window are not part of either format: they are settings of the consuming runtime.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import KvtoolError
from .heads import HeadsMask, write_atomic

KINDS = {"rlkv": "adapter_weights.tsv", "duo": "full_attention_heads.tsv"}


def table(mask: HeadsMask, scores: bool = False) -> list[list[float]]:
    """The L x H values to write: the 0/1 mask, or with ``scores`` the clipped stored scores."""
    if scores:
        if mask.scores is None:
            raise KvtoolError("this heads.json has no scores to export; drop --scores to export its mask")
        return np.clip(np.asarray(mask.scores, dtype=np.float64), 0.0, 1.0).tolist()
    return [[1.0 if f else 0.0 for f in row] for row in mask.full]


def format_tsv(rows: Sequence[Sequence[float]]) -> str:
    """numpy.savetxt's default text (``%.18e``, tab-separated, ``\\n``), written without numpy's file handling."""
    return "".join("\t".join(f"{float(x):.18e}" for x in row) + "\n" for row in rows)


def export_heads(kind: str, heads_json: str | os.PathLike, out: str | os.PathLike, scores: bool = False) -> Path:
    """Write ``heads_json`` as a ``kind`` ("rlkv" | "duo") table to ``out``, atomically."""
    if kind not in KINDS:
        raise KvtoolError(f"unknown export format {kind!r} (rlkv|duo)")
    mask = HeadsMask.load(heads_json)
    text = format_tsv(table(mask, scores))
    return write_atomic(out, text.encode("ascii"), inputs=(heads_json,))
