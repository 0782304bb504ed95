"""The CPU reasoner's alphabet: one character per token, shared by ``long_addition`` and ``cyclic_sum``.

Why shared: both tasks train the same small model with the same tokenizer files, so they must agree on every id.
Digit positions are labelled by letters; ``^`` is the begin token (BOS), ``$`` the end token (EOS), ``#`` the
beacon token. A completion is right only when its whole chain of thought is (``score_completion``); token accuracy
is the finer-grained metric ``kvtool eval`` reports next to it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np

LABELS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

# id -> character. Order: pad, begin, end, beacon, digits, operators, labels, unknown, padding to 48 entries.
VOCAB: list[str] = (["<pad>", "^", "$", "#"] + list("0123456789") + list("+=;|") + list(LABELS) + ["<unk>"]
                    + [f"<x{i}>" for i in range(3)])
STOI = {c: i for i, c in enumerate(VOCAB)}
PAD, BOS, EOS, BEACON, UNK = STOI["<pad>"], STOI["^"], STOI["$"], STOI["#"], STOI["<unk>"]
DIGIT0, LABEL0, PLUS, EQ = STOI["0"], STOI["A"], STOI["+"], STOI["="]


def encode(text: str) -> list[int]:
    """Characters -> ids (no BOS added). Unknown characters map to ``<unk>``."""
    return [STOI.get(c, UNK) for c in text]


def decode(ids: Sequence[int]) -> str:
    """Ids -> characters; pad/begin/end/unknown ids are dropped."""
    skip = {PAD, BOS, EOS, UNK}
    return "".join(VOCAB[i] for i in ids if 0 <= i < len(VOCAB) and i not in skip and not VOCAB[i].startswith("<"))


def _normalize(completion: str) -> str:
    """What is compared: beacons and whitespace removed, a trailing ``$`` (if the decoder kept it) dropped."""
    s = "".join(completion.split()).replace("#", "")
    return s[:-1] if s.endswith("$") else s


def score_completion(completion: Optional[str], entry: dict) -> float:
    """1.0 iff the whole chain of thought is exactly right (the scorer of both reasoner tasks)."""
    if completion is None:
        return 0.0
    return 1.0 if _normalize(completion) == entry["answer"] else 0.0


def token_accuracy(completion: str, answer: str) -> float:
    """Fraction of the ``len(answer) + 1`` chain-of-thought tokens that are right, position by position; the last
    one is the end token, right iff the completion stops exactly after the chain."""
    c = _normalize(completion)
    hits = sum(1 for x, y in zip(c, answer) if x == y) + (1 if len(c) == len(answer) else 0)
    return hits / (len(answer) + 1)


def chain_metrics(problem, completion: str) -> dict:
    """The extra ``kvtool eval`` metric of both reasoner tasks: token accuracy."""
    return {"token_acc": token_accuracy(completion, problem.answer)}


@dataclass(frozen=True)
class TaskSpec:
    """What the trainer needs from a task: its fixed prompt and chain lengths and a vectorised batch maker
    (``rng, batch -> [batch, prompt_len + cot_len]`` ids, ``^`` first and ``$`` last)."""
    prompt_len: int
    cot_len: int
    make_batch: Callable[[np.random.Generator, int], np.ndarray]
