"""Human-readable numbers shared by every report (CLI status lines, eval tables)."""
from __future__ import annotations

from typing import Optional


def fmt_bytes(n: Optional[float], digits: int = 1, missing: str = "?") -> str:
    """``1536`` -> ``"1.5 KiB"``; ``missing`` for None."""
    if n is None:
        return missing
    for unit, k in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= k:
            return f"{n / k:.{digits}f} {unit}"
    return f"{int(n)} B"
