"""Resumable eval records: one JSON line per finished problem, keyed by what would change its result.

Why: a long eval on a shared machine gets interrupted; a rerun skips every (run key, index, question hash) already
in the log and only loads a model that has work left.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional

from ..errors import KvtoolError


def jsonl_path(out: str | os.PathLike) -> Path:
    """The per-problem log next to ``out``: ``results.json`` -> ``results.jsonl``."""
    p = Path(out)
    return p.with_suffix(".jsonl") if p.suffix.lower() != ".jsonl" else p.with_suffix(".records.jsonl")


def run_key(v, task: str, seed: int, max_tokens: int, n_ctx: int, n_ubatch: int, cache_type: str,
            kv_budget: Optional[int] = None) -> str:
    st = v.path.stat()
    ident = [str(v.path.resolve()), st.st_size, st.st_mtime_ns, v.name, task, seed, max_tokens, n_ctx, n_ubatch,
             cache_type] + ([] if kv_budget is None else [kv_budget])  # runs without a budget keep their old keys
    return hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:16]


def qhash(problem) -> str:
    return hashlib.sha256((problem.prompt if problem.prompt is not None else problem.question).encode()).hexdigest()[:12]


def read_records(path: Optional[Path]) -> dict[tuple[str, int, str], dict]:
    recs: dict[tuple[str, int, str], dict] = {}
    if path is None or not path.exists():
        return recs
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                r = json.loads(line)
                recs[(r["key"], int(r["index"]), r["qhash"])] = r
            except (ValueError, KeyError, TypeError):
                continue  # a line cut by an interrupt
    return recs


def check_writable(path: Optional[str | os.PathLike], what: str) -> Optional[Path]:
    if path is None:
        return None
    p = Path(path).expanduser()
    if p.is_dir():
        raise KvtoolError(f"{what} {p} is a directory; give a file path")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise KvtoolError(f"cannot write {what} {p}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise KvtoolError(f"cannot write {what} {p}: permission denied")
    return p
