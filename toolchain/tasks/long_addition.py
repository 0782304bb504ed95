"""``long_addition``: two N = 25 digit numbers added digit by digit, least significant first, each step labelled.

Character tokens, one id per character (:mod:`toolchain.tasks.alphabet`)::

    prompt (77 tokens)            ^A65B67C08D41E85...Y15=
    chain of thought (201 tokens) A65+0=11B67+1=14C08+1=09D41+0=05E85+0=13...Y15+0=06$

Every step ``L a b + c = t u`` copies the label and both operand digits from the prompt (76 or more tokens back) and
adds the carry ``c`` of the previous step; ``t u`` are the tens and units of ``a + b + c`` (so ``t`` is the next
carry). A compressed head with a small window cannot see the operands, so compression must keep the heads that copy
them. The CPU reasoner (:mod:`toolchain.train.reasoner`) is trained on it.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .alphabet import BOS, DIGIT0, EOS, EQ, LABEL0, LABELS, PLUS, VOCAB, TaskSpec, score_completion
from .base import Problem

TASK = "long_addition"
N_DIGITS = 25


def prompt_len(n: int = N_DIGITS) -> int:
    return 1 + 3 * n + 1


def cot_len(n: int = N_DIGITS) -> int:
    return 8 * n + 1


PROMPT_LEN = prompt_len()  # 77
COT_LEN = cot_len()        # 201
SEQ_LEN = PROMPT_LEN + COT_LEN  # 278


def _texts(a: Sequence[int], b: Sequence[int]) -> tuple[str, str]:
    """Digits (LSB first) -> (question without ``^``, chain without ``$``)."""
    n = len(a)
    if n > len(LABELS):
        raise ValueError(f"at most {len(LABELS)} digits (one label letter each), got {n}")
    q = "".join(f"{LABELS[i]}{a[i]}{b[i]}" for i in range(n)) + "="
    steps, c = [], 0
    for i in range(n):
        s = a[i] + b[i] + c
        steps.append(f"{LABELS[i]}{a[i]}{b[i]}+{c}={s // 10}{s % 10}")
        c = s // 10
    return q, "".join(steps)


def make_example(rng: np.random.Generator, n: int = N_DIGITS) -> dict:
    """One problem: ``{"question", "answer", "a", "b"}`` (digits least significant first)."""
    a = rng.integers(0, 10, n).tolist()
    b = rng.integers(0, 10, n).tolist()
    q, ans = _texts(a, b)
    return {"question": q, "answer": ans, "a": a, "b": b}


def make_batch(rng: np.random.Generator, batch: int, n: int = N_DIGITS) -> np.ndarray:
    """``[batch, prompt_len + cot_len]`` int64 ids of fresh problems, ``^`` first and ``$`` last (vectorised)."""
    a = rng.integers(0, 10, (batch, n))
    b = rng.integers(0, 10, (batch, n))
    P = prompt_len(n)
    out = np.empty((batch, P + cot_len(n)), dtype=np.int64)
    out[:, 0] = BOS
    lab = LABEL0 + np.arange(n)
    out[:, 1:1 + 3 * n:3] = lab
    out[:, 2:2 + 3 * n:3] = DIGIT0 + a
    out[:, 3:3 + 3 * n:3] = DIGIT0 + b
    out[:, P - 1] = EQ
    c = np.zeros(batch, dtype=np.int64)
    for i in range(n):
        s = a[:, i] + b[:, i] + c
        base = P + 8 * i
        out[:, base] = lab[i]
        out[:, base + 1] = DIGIT0 + a[:, i]
        out[:, base + 2] = DIGIT0 + b[:, i]
        out[:, base + 3] = PLUS
        out[:, base + 4] = DIGIT0 + c
        out[:, base + 5] = EQ
        out[:, base + 6] = DIGIT0 + s // 10
        out[:, base + 7] = DIGIT0 + s % 10
        c = s // 10
    out[:, -1] = EOS
    return out


def make_problems(n: int, seed: int, n_digits: int = N_DIGITS) -> list[Problem]:
    """``n`` problems, deterministic in ``seed``; the prompt is the question verbatim (the runtime adds ``^``)."""
    rng = np.random.Generator(np.random.PCG64([int(seed), 0x5EA50]))
    out = []
    for i in range(n):
        e = make_example(rng, n_digits)
        out.append(Problem(TASK, i, e["question"], e["answer"], e, score_completion, prompt=e["question"],
                           extract=False))
    return out


def sequences_text(n: int, seed: int = 2_000_000, n_digits: int = N_DIGITS) -> str:
    """``n`` whole sequences ``^question=chain$`` back to back: a text in the reasoner's alphabet for
    ``kvtool eval --ppl`` (``^``/``$`` are parsed as the begin/end tokens)."""
    rng = np.random.Generator(np.random.PCG64([int(seed), 0x7E47]))
    return "".join("".join(VOCAB[i] for i in row) for row in make_batch(rng, n, n_digits))


def spec(n_digits: int = N_DIGITS) -> TaskSpec:
    """The trainer spec for ``n_digits``-digit problems."""
    return TaskSpec(prompt_len(n_digits), cot_len(n_digits), lambda rng, batch: make_batch(rng, batch, n_digits))


SPEC = spec()
