"""The statistics of ``kvtool eval``: Wilson intervals for accuracy and the repetition detector."""
from __future__ import annotations

import math
from typing import Sequence

Z95 = 1.959963984540054
REPEAT_TAIL = 64
REPEAT_MAX_PERIOD = 16


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for ``k`` successes in ``n`` trials (95% by default). ``n == 0`` gives (0, 1)."""
    if n < 0 or k < 0 or k > n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = k / n
    z2 = z * z
    den = 1 + z2 / n
    center = (p + z2 / (2 * n)) / den
    half = z / den * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, center - half), min(1.0, center + half)


def is_repetitive(tokens: Sequence[int], tail: int = REPEAT_TAIL, max_period: int = REPEAT_MAX_PERIOD) -> bool:
    """True iff the last ``tail`` tokens are periodic with some period ``p <= max_period`` (``t[i] == t[i+p]`` for
    every pair inside the tail). Fewer than ``tail`` tokens are never called repetitive."""
    if len(tokens) < tail:
        return False
    t = list(tokens[-tail:])
    return any(all(t[i] == t[i + p] for i in range(tail - p)) for p in range(1, max_period + 1))
