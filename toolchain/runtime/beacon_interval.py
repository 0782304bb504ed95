"""Which beacon interval a generation runs at: one chosen at load (``--beacon-interval C``), or adaptive (``auto``).

Why a choice at all: a beacon trained with several intervals (``kvtool train beacons --interval 8,16,32``) lists
them in ``kvtool.beacon.intervals``, so one file serves a user who wants the most accurate run (small c) and one
who needs the least KV (larger c over long generations). A value the file does not list is refused at load: the
beacon was never trained for it.

Adaptive mode starts at the smallest c and, at chunk boundaries, moves to a larger c when the live KV would
otherwise pass the budget before the generation ends. Live cells after an eviction are ``base`` = prompt + beacons
so far; generating ``R`` more tokens at interval c from there peaks at most at ``base + R // c + c`` (the last full
chunk plus its beacon: ``decode.peak_bound``'s rule from this point on). Staying at c keeps that projection
constant, so a rule that only asks "does c fit the rest?" would decide everything at the first token. The rule here
is lazy instead: at each boundary it keeps the current c for one more chunk as long as, after that chunk, some
interval >= c still fits the rest; otherwise it moves to the smallest larger c for which that holds. Small
intervals (the most accurate ones) thus run as long as the budget allows, and the switch comes when the beacons
have piled up. If nothing fits it takes the c with the smallest projection. The budget is also a hard cap: a
decode that would pass it ends the generation with ``finish_reason = "length"``, as a full ``n_ctx`` does, so the
live KV never exceeds it. Intervals only go up, which keeps the schedule easy to reason about. ``R`` is what is
left of ``max_tokens``, or, without one, of the context (``n_ctx`` minus the prompt), the horizon a plain
generation would have.

A byte budget becomes cells through the per-cell bytes of the full-head cache (``memory.layer_bytes`` with one
cell); compressed heads' rings have a fixed size whatever the beacon loop does, so they are taken off the budget
first.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

from ..errors import KvtoolError

AUTO = "auto"


@dataclass(frozen=True)
class IntervalChoice:
    """What ``Model.load(beacon_interval=...)`` resolved to: a fixed ``interval``, or ``adaptive`` over
    ``intervals`` within ``budget_cells`` live cells (``budget_bytes`` as given)."""

    interval: int
    intervals: tuple = ()
    adaptive: bool = False
    budget_cells: Optional[int] = None
    budget_bytes: Optional[int] = None


def parse_interval(value: Union[None, int, str]) -> Union[None, int, str]:
    """``None``, an int >= 1, or ``"auto"`` from a CLI string or a Python value; one error line otherwise."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise KvtoolError(f"beacon interval must be an integer >= 1 or 'auto', got {value!r}")
    if isinstance(value, int):
        if value < 1:
            raise KvtoolError(f"beacon interval must be an integer >= 1 or 'auto', got {value}")
        return value
    text = str(value).strip().lower()
    if text == AUTO:
        return AUTO
    if text.isdigit() and int(text) >= 1:
        return int(text)
    raise KvtoolError(f"beacon interval must be an integer >= 1 or 'auto', got {value!r}")


def parse_budget(value) -> Optional[int]:
    """Bytes (an int > 0; the CLI turns ``256KiB`` into one with ``commands.inspect.parse_size``)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise KvtoolError(f"KV budget must be a number of bytes > 0, got {value!r}")
    return int(value)


def choose(supported: Sequence[int], requested: Union[None, int, str], default: int, where: str = "",
           budget_bytes: Optional[int] = None, bytes_per_cell: Optional[int] = None,
           fixed_bytes: int = 0) -> IntervalChoice:
    """Resolve ``requested`` against the file's ``supported`` intervals (ascending). ``None``: the file's
    ``default``. An int the file does not list fails, naming it and the supported ones. ``"auto"`` needs
    ``budget_bytes`` and ``bytes_per_cell`` (``fixed_bytes``: the rings, which the budget must also hold)."""
    sup = tuple(int(c) for c in supported)
    req = parse_interval(requested)
    if req is None:
        return IntervalChoice(int(default), sup)
    if req != AUTO:
        if req not in sup:
            raise KvtoolError(f"{where}beacon interval {req} is not supported by this file (its beacon was trained "
                              f"for {', '.join(map(str, sup))}; kvtool.beacon.intervals)")
        return IntervalChoice(req, sup)
    if budget_bytes is None:
        raise KvtoolError(f"{where}beacon interval 'auto' needs a KV budget (--kv-budget SIZE, or "
                          f"Model.load(..., beacon_budget=SIZE))")
    if not bytes_per_cell or bytes_per_cell < 1:
        raise KvtoolError(f"{where}cannot size the KV budget: the model's cache has no full-head cells")
    cells = (int(budget_bytes) - int(fixed_bytes)) // int(bytes_per_cell)
    if cells < 2:
        raise KvtoolError(f"{where}KV budget of {budget_bytes} bytes holds {max(cells, 0)} cells of "
                          f"{bytes_per_cell} bytes (after {fixed_bytes} bytes of rings): too small to generate")
    return IntervalChoice(sup[0], sup, True, int(cells), int(budget_bytes))


def projected_peak(base_cells: int, remaining: int, interval: int) -> int:
    """Most live cells from a chunk boundary with ``base_cells`` live, for ``remaining`` more tokens at ``interval``."""
    return int(base_cells) + max(0, int(remaining)) // int(interval) + int(interval)


def _can_continue(intervals: Sequence[int], c: int, base_cells: int, remaining: int, budget_cells: int) -> bool:
    """One more chunk at ``c`` fits, and after it some interval >= c still fits the rest of the generation."""
    if remaining <= c:  # the last (partial) chunk: no beacon follows it
        return base_cells + max(0, remaining) <= budget_cells
    if base_cells + c + 1 > budget_cells:  # the chunk and its beacon, just before the eviction
        return False
    return any(projected_peak(base_cells + 1, remaining - c, x) <= budget_cells for x in intervals if x >= c)


def next_interval(intervals: Sequence[int], current: int, base_cells: int, remaining: int, budget_cells: int) -> int:
    """The adaptive rule at a chunk boundary: the smallest supported c >= ``current`` such that one more chunk at c
    still leaves an interval whose projected peak fits ``budget_cells`` (so the loop stays at small c as long as
    it can, and moves up only when waiting longer would break the budget); if none does, the c (>= ``current``)
    with the smallest projection (ties: the smaller c)."""
    cand = sorted({int(c) for c in intervals if int(c) >= int(current)} | {int(current)})
    for c in cand:
        if _can_continue(cand, c, int(base_cells), int(remaining), int(budget_cells)):
            return c
    return min(cand, key=lambda c: (projected_peak(base_cells, remaining, c), c))
