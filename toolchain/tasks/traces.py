"""Worked solutions (chain-of-thought traces) in exactly the format ``score`` rewards, for supervised warm-up.

Why: a small instruct model (SmolLM2-135M) answers "The answer is 1." and never writes ``<answer>…</answer>``, so
RLKV's self-distillation filter keeps nothing. A few hundred supervised examples of "work, then the tag" fix the
format. Sources, in order:

* the dataset's own ``answer_cot`` (reasoning-gym 0.1.25 ships one only for ``gsm_symbolic``, in ``metadata``): its
  closing ``#### N`` line is replaced by ``<answer>N</answer>``;
* a left-to-right running sum for chains of integer ``+``/``-`` (``chain_sum``, and ``basic_arithmetic`` problems that
  happen to be such a chain), built from ``metadata["expression"]``: ``4 - 1 = 3`` / ``3 - 7 = -4`` /
  ``<answer>-4</answer>``.

Every trace is checked with the task's own verifier (:func:`toolchain.tasks.score`) before use; a problem without a
trace gets ``None``.
"""
from __future__ import annotations

import re
from typing import Optional

from .base import Problem, score

_FINAL = re.compile(r"\n?####\s*(\S.*?)\s*$", re.S)
_INT = re.compile(r"[+-]?\d+$")


def running_sum_trace(expression: str) -> Optional[str]:
    """``"4 - 1 - 7"`` -> ``"4 - 1 = 3\\n3 - 7 = -4\\n<answer>-4</answer>"``; None unless it is ``int (op int)+``."""
    parts = expression.split()
    if len(parts) < 3 or len(parts) % 2 == 0 or not all(_INT.match(p) for p in parts[::2]):
        return None
    ops = parts[1::2]
    if any(op not in ("+", "-") for op in ops):
        return None
    acc = int(parts[0])
    lines = []
    for op, term in zip(ops, parts[2::2]):
        nxt = acc + int(term) if op == "+" else acc - int(term)
        lines.append(f"{acc} {op} {term} = {nxt}")
        acc = nxt
    return "\n".join(lines) + f"\n<answer>{acc}</answer>"


def dataset_cot_trace(cot: str, answer: str) -> str:
    """The dataset's ``answer_cot`` with its ``#### N`` line turned into the answer tag."""
    body = _FINAL.sub("", cot.strip()).rstrip()
    return (body + "\n" if body else "") + f"<answer>{answer}</answer>"


def cot_trace(problem: Problem) -> Optional[str]:
    """A worked solution that ``score`` gives 1.0, or None when this problem has no trace source."""
    entry = problem.entry if isinstance(problem.entry, dict) else {}
    meta = entry.get("metadata") if isinstance(entry.get("metadata"), dict) else {}
    cot = entry.get("answer_cot") or meta.get("answer_cot")
    trace = None
    if isinstance(cot, str) and cot.strip():
        trace = dataset_cot_trace(cot, problem.answer)
    elif isinstance(meta.get("expression"), str):
        trace = running_sum_trace(meta["expression"])
    if trace is None or score(problem, trace) < 1.0:
        return None
    return trace
