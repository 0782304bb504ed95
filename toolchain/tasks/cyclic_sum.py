"""The CPU reasoner's long-chain task: a running sum over a short list of digits, cycled many times.

Why a second task: beacons evict generated tokens only, never the prompt, so the peak-KV saving is bounded by
(prompt + chain) / (prompt + chain / c + c). ``long_addition`` has a 77-token prompt behind a 201-token chain, which
caps beacons at c=16 near 2.6x. Here the prompt is 14 tokens and the chain 513, so c=16 can reach 8.5x::

    prompt (14 tokens)   ^A3B7C1D9E0F5=
    chain (513 tokens)   A3+00=03B7+03=10C1+10=11D9+11=20E0+20=20F5+20=25A3+25=28...$

Step ``k`` (``R = 64`` steps of 8 tokens) reads the digit labelled ``L = "ABCDEF"[k % 6]`` from the prompt, adds it to
the running sum ``s`` (two digits, mod 100, starting at 00) and writes ``L d + s1 s0 = n1 n0``. What a step needs is the
prompt digit (a look-up by label, up to 500 tokens back) and the previous step's result (local). With c=16 each chunk
holds exactly two steps, so a beacon must carry the last label and the two-digit sum across the eviction.

Same alphabet (:mod:`toolchain.tasks.alphabet`), tokenizer and model as ``long_addition`` (one vocabulary, so one
tokenizer file set); ``python -m toolchain.train.reasoner train --task cyclic_sum`` trains it.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .alphabet import BOS, DIGIT0, EOS, EQ, LABEL0, LABELS, PLUS, TaskSpec, score_completion
from .base import Problem

TASK = "cyclic_sum"
N_DIGITS = 6   # prompt digits, labelled A..F
N_STEPS = 64   # chain steps
STEP_LEN = 8

def prompt_len(n: int = N_DIGITS) -> int:
    return 1 + 2 * n + 1


def cot_len(steps: int = N_STEPS) -> int:
    return STEP_LEN * steps + 1


PROMPT_LEN = prompt_len()  # 14
COT_LEN = cot_len()        # 513


def _texts(d: Sequence[int], steps: int = N_STEPS) -> tuple[str, str]:
    """Digits -> (question without ``^``, chain without ``$``)."""
    n = len(d)
    if not 1 <= n <= len(LABELS):
        raise ValueError(f"1 to {len(LABELS)} digits (one label letter each), got {n}")
    q = "".join(f"{LABELS[i]}{d[i]}" for i in range(n)) + "="
    out, s = [], 0
    for k in range(steps):
        i = k % n
        t = (s + d[i]) % 100
        out.append(f"{LABELS[i]}{d[i]}+{s:02d}={t:02d}")
        s = t
    return q, "".join(out)


def make_example(rng: np.random.Generator, n: int = N_DIGITS, steps: int = N_STEPS) -> dict:
    d = rng.integers(0, 10, n).tolist()
    q, ans = _texts(d, steps)
    return {"question": q, "answer": ans, "digits": d}


def make_batch(rng: np.random.Generator, batch: int, n: int = N_DIGITS, steps: int = N_STEPS) -> np.ndarray:
    """``[batch, prompt_len + cot_len]`` int64 ids of fresh problems, ``^`` first and ``$`` last (vectorised)."""
    d = rng.integers(0, 10, (batch, n))
    P = prompt_len(n)
    out = np.empty((batch, P + cot_len(steps)), dtype=np.int64)
    out[:, 0] = BOS
    lab = LABEL0 + np.arange(n)
    out[:, 1:1 + 2 * n:2] = lab
    out[:, 2:2 + 2 * n:2] = DIGIT0 + d
    out[:, P - 1] = EQ
    s = np.zeros(batch, dtype=np.int64)
    for k in range(steps):
        i = k % n
        t = (s + d[:, i]) % 100
        base = P + STEP_LEN * k
        out[:, base] = lab[i]
        out[:, base + 1] = DIGIT0 + d[:, i]
        out[:, base + 2] = PLUS
        out[:, base + 3] = DIGIT0 + s // 10
        out[:, base + 4] = DIGIT0 + s % 10
        out[:, base + 5] = EQ
        out[:, base + 6] = DIGIT0 + t // 10
        out[:, base + 7] = DIGIT0 + t % 10
        s = t
    out[:, -1] = EOS
    return out


def make_problems(n: int, seed: int) -> list[Problem]:
    """``n`` problems, deterministic in ``seed``; the prompt is the question verbatim (the runtime adds ``^``)."""
    rng = np.random.Generator(np.random.PCG64([int(seed), 0xC5C5]))
    out = []
    for i in range(n):
        e = make_example(rng)
        out.append(Problem(TASK, i, e["question"], e["answer"], e, score_completion, prompt=e["question"],
                           extract=False))
    return out


SPEC = TaskSpec(PROMPT_LEN, COT_LEN, lambda rng, batch: make_batch(rng, batch))
