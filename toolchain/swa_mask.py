"""Masks on sliding-window hybrids (Gemma 2/3, gpt-oss): compress only the heads of global layers.

Why: the SWA layers already keep only their window (n_swa + n_ubatch cells), and the runtime ignores budgets there
(docs/semantics.md, "Sliding-window models"), so a head compressed on an SWA layer saves nothing and changes nothing.
On such a model the sparsity of ``heads random``/``import``/``train heads`` is read as the fraction of the *global*
heads, the rule is applied to those rows only, and the SWA rows are all full (their scores pinned to 1.0, so they
come last if ``convert --sparsity`` re-derives the mask; convert refuses to write them if it ever picks them).
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from .errors import KvtoolError
from .heads import HeadsMask, mask_from_scores


def restrict_to_global(mask: HeadsMask, swa_layers: Optional[Sequence[bool]]) -> tuple[HeadsMask, Optional[str]]:
    """(mask with compressed heads on global layers only, a line saying what was done or None for no SWA layers)."""
    if not swa_layers or not any(swa_layers):
        return mask, None
    if len(swa_layers) != mask.n_layer:
        raise KvtoolError(f"the model has {len(swa_layers)} layers, the mask {mask.n_layer}")
    glob = [il for il, s in enumerate(swa_layers) if not s]
    if not glob:
        raise KvtoolError("every layer of this model slides: there are no global heads to compress")
    d = mask.to_dict()
    full = [[True] * mask.n_head_kv for _ in range(mask.n_layer)]
    if mask.scores is not None:
        a = np.clip(np.asarray(mask.scores, dtype=np.float64), 0.0, 1.0)
        sub = mask_from_scores(a[glob], mask.sparsity, bool(mask.per_layer))
        for j, il in enumerate(glob):
            full[il] = sub[j]
        a[[il for il in range(mask.n_layer) if swa_layers[il]]] = 1.0
        d["scores"] = a.tolist()
    else:  # no scores to re-rank: keep the global rows as they are
        for il in glob:
            full[il] = list(mask.full[il])
    d["full"] = full
    d["extra"] = {**(mask.extra or {}), "global_layers": glob}
    out = HeadsMask.from_dict(d)
    n_glob = len(glob) * mask.n_head_kv
    note = (f"sliding-window model: {mask.n_layer - len(glob)} of {mask.n_layer} layers keep their window; "
            f"compressed {out.n_compressed()} of the {n_glob} heads of the global layers {glob}"
            + (f" (sparsity {mask.sparsity} of the global heads)" if mask.scores is not None else ""))
    return out, note


def swa_layers_of_config(cfg) -> Optional[list[bool]]:
    """Per-layer "slides" flags from a HF config (dict or object with ``layer_types``/``sliding_window``)."""
    get = cfg.get if isinstance(cfg, dict) else (lambda k, d=None: getattr(cfg, k, d))
    text = get("text_config")
    if text is not None and get("layer_types") is None:
        return swa_layers_of_config(text)
    types = get("layer_types")
    if not isinstance(types, (list, tuple)) or not get("sliding_window"):
        return None
    flags = [t == "sliding_attention" for t in types]
    return flags if any(flags) else None
