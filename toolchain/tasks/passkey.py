"""``passkey``: a 5-digit key hidden at a random depth in filler text, asked for at the end (``passkey:ctx=1024``).

Why this task: it is a long-range retrieval test that a 135M model passes with a full cache. The key sits anywhere
from the first to the last filler sentence, so a compressed head (S sink tokens plus a window of W) sees it directly
only when it falls in the last W tokens; whether a mask keeps the heads that *retrieve* is what the score shows.

Prompt (raw completion, no chat template)::

    There is a pass key hidden in the text below. Read it, remember it, and give it when asked.

    <filler> ... The pass key is 48213. Remember it. 48213 is the pass key. ... <filler>

    What is the pass key? The pass key is

Why raw completion: both formats retrieve on SmolLM2-135M-Instruct (Q4_1, full f16 cache, the 5 problems of seed 0
at 1K): raw 5/5, each answered as its first tokens (" 54877."); chat template 5/5, each answered as "The pass key is
54877." and once rambling on (probe in docs/benchmarks.md, SmolLM2 passkey section). Raw wins on the rest: the prompt
the model sees is exactly the text that was sized (the template adds 26 tokens around it), the key comes in the
first 6 generated tokens so ``--max-tokens 8`` is enough, and eval's chat path would add the ``<answer>`` instruction
of the reasoning tasks, which this task does not use. The answer is the first run of digits in the completion,
exactly the five digits of the key (``score_completion``).

Length is in *model tokens*: ``ctx`` is the context the prompt must fill. The filler is the sentences cycled word by
word, and the word count is searched (bisection on the real token count) so the prompt is the longest that leaves
``RESERVE`` tokens for the answer: between ``(ctx - RESERVE) * (1 - TOLERANCE)`` and ``ctx - RESERVE`` tokens (at 1K:
978 to 1008). The needle goes at the sentence start nearest to the drawn depth. That needs the model's tokenizer,
which tasks cannot import (they sit beside the runtime): the caller passes ``count_tokens(text) -> int`` (the prompt
as the runtime encodes it, BOS included); ``kvtool eval`` passes the loaded model's. Each problem records in
``Problem.info`` (which eval writes into every record) its depth (drawn uniform in [0, 1); the needle lands at the
nearest sentence start, ``words_before`` of ``filler_words``), the needle's token offset and the prompt's token count.
"""
from __future__ import annotations

import re
from typing import Callable, Optional

import numpy as np

from ..errors import KvtoolError
from .base import Problem

TASK = "passkey"
KEY_DIGITS = 5
RESERVE = 16          # tokens left after the prompt for the answer (a 5-digit key is at most ~6 tokens)
TOLERANCE = 0.03      # the prompt is at least (ctx - RESERVE) * (1 - TOLERANCE) tokens
CTX_MIN, CTX_MAX = 128, 1 << 20
DEFAULT_CTX = 1024

HEADER = "There is a pass key hidden in the text below. Read it, remember it, and give it when asked.\n\n"
QUESTION = "\n\nWhat is the pass key? The pass key is"
# our own filler: plain, repetitive prose with no digits in it, cycled sentence by sentence
FILLER = (
    "The river runs slowly past the old mill.",
    "Children play in the field behind the school.",
    "A baker opens his shop before the sun comes up.",
    "The wind moves the tall grass on the hill.",
    "Clouds drift over the quiet town all afternoon.",
    "An old dog sleeps in the shade of the barn.",
    "The road bends and climbs toward the forest.",
    "Evening comes, and the lamps in the houses are lit.",
)

CountTokens = Callable[[str], int]
_DIGITS_RE = re.compile(r"\d+")


def needle(key: str) -> str:
    return f"The pass key is {key}. Remember it. {key} is the pass key."


def _filler_words(n: int) -> tuple[list[str], list[int]]:
    """The first ``n`` words of the cycled filler and the word indices where a sentence starts (0 included)."""
    out: list[str] = []
    starts: list[int] = []
    i = 0
    while len(out) < n:
        starts.append(len(out))
        out.extend(FILLER[i % len(FILLER)].split())
        i += 1
    return out[:n], [b for b in starts if b <= n] or [0]


def _text(key: str, n_words: int, depth: float) -> tuple[str, str, int]:
    """(prompt, the part before the needle, filler words before it) with ``n_words`` filler words; the needle goes
    at the sentence start nearest to ``depth * n_words`` (only the last filler sentence may be cut short)."""
    w, starts = _filler_words(n_words)
    b = min(starts, key=lambda x: (abs(x - depth * n_words), x))
    head = HEADER + "".join(x + " " for x in w[:b])
    tail = "".join(" " + x for x in w[b:])
    return head + needle(key) + tail + QUESTION, head, b


def build(key: str, depth: float, ctx: int, count_tokens: CountTokens) -> tuple[str, int, int, int, int]:
    """The longest prompt with at most ``ctx - RESERVE`` tokens: (text, its token count, filler words, filler words
    before the needle, the needle's token offset). The count grows with the filler, so bisection finds it; the
    result is checked against both bounds, so a tokenizer that is not monotone fails loudly, not silently."""
    limit = ctx - RESERVE
    if count_tokens(_text(key, 0, depth)[0]) > limit:
        raise KvtoolError(f"task passkey: ctx={ctx} is too short for the header, needle and question")
    lo, hi = 0, 64
    while count_tokens(_text(key, hi, depth)[0]) <= limit:  # grow until over the limit
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if count_tokens(_text(key, mid, depth)[0]) <= limit:
            lo = mid
        else:
            hi = mid
    text, head, before = _text(key, lo, depth)
    n_tok = count_tokens(text)
    if not limit * (1 - TOLERANCE) <= n_tok <= limit:
        raise KvtoolError(f"task passkey: the prompt came to {n_tok} tokens, outside [{limit * (1 - TOLERANCE):.0f}, "
                          f"{limit}] for ctx={ctx} (one filler word is too many tokens); use a larger ctx")
    return text, n_tok, lo, before, count_tokens(head)


def first_digits(completion: Optional[str]) -> Optional[str]:
    """The first run of digits in the completion (what the model gave as the key), or None."""
    m = _DIGITS_RE.search(completion or "")
    return m.group(0) if m else None


def score_completion(completion: Optional[str], entry: dict) -> float:
    """1.0 iff the first run of digits in the completion is exactly the key (``" 48213."`` is right; ``" 482130"``,
    ``" 4821"`` and no digits are wrong)."""
    return 1.0 if first_digits(completion) == entry["answer"] else 0.0


def check_ctx(ctx) -> int:
    if isinstance(ctx, bool) or not isinstance(ctx, int):
        raise KvtoolError(f"task passkey: ctx must be an integer number of tokens, got {ctx!r}")
    if not CTX_MIN <= ctx <= CTX_MAX:
        raise KvtoolError(f"task passkey: ctx must be in [{CTX_MIN}, {CTX_MAX}], got {ctx}")
    return ctx


def make_problems(n: int, seed: int, ctx: int = DEFAULT_CTX, count_tokens: Optional[CountTokens] = None) -> list[Problem]:
    """``n`` problems, deterministic in ``(n, seed, ctx)`` and the tokenizer: problem i's key and depth depend only on
    ``(seed, i)``, its filler length on ``ctx`` and the tokenizer."""
    ctx = check_ctx(ctx)
    if n == 0:
        return []
    if count_tokens is None:
        raise KvtoolError("task passkey sizes its prompts in model tokens and needs the model's tokenizer "
                          "(kvtool eval passes it)")
    out = []
    for i in range(n):
        rng = np.random.Generator(np.random.PCG64([int(seed), i, 0x9A55]))
        key = "".join(str(d) for d in [int(rng.integers(1, 10))] + rng.integers(0, 10, KEY_DIGITS - 1).tolist())
        depth = float(rng.random())
        text, n_tok, n_words, before, at = build(key, depth, ctx, count_tokens)
        entry = {"question": text, "answer": key, "depth": depth, "ctx": ctx}
        info = {"depth": round(depth, 6), "needle_token": at, "prompt_tokens": n_tok, "filler_words": n_words,
                "words_before": before, "key": key}
        out.append(Problem(TASK, i, text, key, entry, score_completion, prompt=text, extract=False, info=info))
    return out
