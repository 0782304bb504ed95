"""A ``kvtool train beacons`` checkpoint -> a GGUF with ``kvtool.beacon.*`` keys (torch-free, for ``kvtool convert``).

The checkpoint declares its beacon in ``kvtool.json`` (written by :mod:`toolchain.train.beacons`); the GGUF gets
``kvtool.beacon.token_id`` / ``kvtool.beacon.interval`` (and ``kvtool.beacon.intervals`` for a beacon trained at
several intervals), which the runtime's beacon loop reads back. The beacon
token must be in the GGUF vocabulary, so a tokenizer saved without it fails here, not at generation time.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

from toolchain.errors import KvtoolError
from toolchain.gguf_keys import BEACON_PREFIX, K_BEACON_TOKEN, K_VERSION, KVTOOL_VERSION

from .convert import convert_model, via_hf_gguf
from .gguf_budgets import T_U32, Value, beacon_interval_values, check_beacon_intervals, open_gguf, rewrite_gguf
from .hf_to_gguf import inspect_hf_dir

KVTOOL_JSON = "kvtool.json"  # the checkpoint's own metadata file


@dataclass(frozen=True)
class CheckpointBeacon:
    token_id: int
    interval: int
    token: Optional[str]  # the token's text, when the checkpoint added one (None: unknown)
    intervals: Optional[tuple] = None  # every c it was trained for (None: only ``interval``)


def beacon_from_checkpoint(ckpt_dir: Union[str, os.PathLike]) -> Optional[CheckpointBeacon]:
    """The beacon a ``kvtool train beacons`` checkpoint declares in ``kvtool.json``; None when the directory has none."""
    path = Path(ckpt_dir) / KVTOOL_JSON
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise KvtoolError(f"{path}: unreadable ({e.__class__.__name__})") from None
    b = info.get("beacon") if isinstance(info, dict) else None
    if not isinstance(b, dict):
        raise KvtoolError(f"{path}: no 'beacon' object")
    tok, c = b.get("token_id"), b.get("interval")
    if not isinstance(tok, int) or isinstance(tok, bool) or not 0 <= tok <= 0xFFFFFFFF:
        raise KvtoolError(f"{path}: beacon.token_id must be an integer >= 0, got {tok!r}")
    if not isinstance(c, int) or isinstance(c, bool) or not 1 <= c <= 0xFFFFFFFF:
        raise KvtoolError(f"{path}: beacon.interval must be an integer >= 1, got {c!r}")
    text = b.get("token")
    cs = b.get("intervals")
    if cs is not None:
        if not isinstance(cs, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in cs):
            raise KvtoolError(f"{path}: beacon.intervals must be a list of integers, got {cs!r}")
        check_beacon_intervals(c, cs, f"{path}: ")
        cs = tuple(cs) if len(cs) > 1 else None
    return CheckpointBeacon(tok, c, text if isinstance(text, str) and not b.get("reused") else None, cs)


def check_beacon_token(gguf: Union[str, os.PathLike], token_id: int, token: Optional[str] = None) -> None:
    """KvtoolError unless the GGUF's vocabulary has ``token_id`` (spelled ``token`` when given)."""
    with open_gguf(gguf) as h:
        toks = h.value("tokenizer.ggml.tokens")
    n = len(toks) if isinstance(toks, list) else 0
    if not 0 <= int(token_id) < n:
        raise KvtoolError(f"{gguf}: the vocabulary ({n} tokens) lacks the beacon token id {token_id}; "
                          f"was the checkpoint's tokenizer saved with the beacon token?")
    if token is not None and toks[int(token_id)] != token:
        raise KvtoolError(f"{gguf}: token {token_id} is {toks[int(token_id)]!r}, not the beacon {token!r}; "
                          f"the vocabulary lacks the beacon token")


def write_beacon_keys(src: Union[str, os.PathLike], dst: Union[str, os.PathLike], token_id: int, interval: int,
                      token: Optional[str] = None, intervals=None) -> Path:
    """``dst`` = ``src`` + ``kvtool.beacon.token_id/interval`` (+ ``intervals`` when there are several; other
    kvtool keys kept; tensors byte for byte)."""
    if int(interval) < 1:
        raise KvtoolError(f"beacon interval must be >= 1, got {interval}")
    check_beacon_token(src, token_id, token)
    keys = {K_VERSION: Value(T_U32, KVTOOL_VERSION), K_BEACON_TOKEN: Value(T_U32, int(token_id)),
            **beacon_interval_values(interval, intervals)}
    return rewrite_gguf(src, dst, keys, drop=lambda k: k.startswith(BEACON_PREFIX))


def convert_checkpoint(ckpt_dir: Union[str, os.PathLike], out: Union[str, os.PathLike], mask=None,
                       outtype: Optional[str] = None, echo: Callable[[str], None] = lambda m: None) -> Path:
    """``kvtool convert CKPT_DIR [--mask heads.json] -o m.gguf`` for a beacon checkpoint: HF -> GGUF with the
    beacon keys from ``kvtool.json`` (and the mask's budgets when given). The beacon must be in the GGUF vocabulary."""
    src, dst = Path(ckpt_dir), Path(out)
    bc = beacon_from_checkpoint(src)
    if bc is None:
        raise KvtoolError(f"{src}: no {KVTOOL_JSON} (not a `kvtool train beacons` checkpoint)")
    if mask is not None:
        with tempfile.TemporaryDirectory(prefix=".kvtool-beacon.", dir=dst.parent) as tmp:
            mid = convert_model(src, mask, Path(tmp) / "masked.gguf", outtype, bc.token_id, bc.interval, echo,
                                beacon_intervals=bc.intervals)
            check_beacon_token(mid, bc.token_id, bc.token)
            os.replace(mid, dst)
        return dst
    inspect_hf_dir(src)
    return via_hf_gguf(src, dst, outtype, echo, lambda base, d: write_beacon_keys(base, d, bc.token_id, bc.interval,
                                                                                 bc.token, bc.intervals),
                       prefix=".kvtool-beacon.")
