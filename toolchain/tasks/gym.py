"""reasoning-gym tasks (chain_sum, basic_arithmetic, simple_equations, gsm_symbolic, shortest_path, path_star ...).

``reasoning_gym.create_dataset`` makes the problems and the dataset's own ``score_answer`` is the scorer. Imported
only when a non-local task is asked for: reasoning-gym is a training extra.
"""
from __future__ import annotations

from typing import Any

from ..errors import KvtoolError
from .base import Problem


def gym_dataset(task: str, name: str, kwargs: dict[str, Any], n: int, seed: int) -> list[Problem]:
    """``n`` problems of the reasoning-gym dataset ``name`` (``task`` is the full spec they are tagged with)."""
    try:
        import reasoning_gym
    except ImportError:
        raise KvtoolError("reasoning-gym tasks need reasoning-gym: pip install 'kvtool[train]'") from None
    if n == 0:
        return []
    try:
        ds = reasoning_gym.create_dataset(name, size=n, seed=seed, **kwargs)
    except ValueError as e:
        raise KvtoolError(f"task {task!r}: {e}") from None
    except TypeError as e:  # unknown config key
        raise KvtoolError(f"task {task!r}: bad option ({e})") from None
    out = []
    for i in range(n):
        e = ds[i]
        out.append(Problem(task, i, str(e["question"]), str(e["answer"]), e, ds.score_answer))
    return out
