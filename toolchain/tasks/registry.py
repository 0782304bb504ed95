"""Which tasks exist: the local (procedural) tasks, their extra eval metrics and trainer specs, and reasoning-gym.

Why a static registry: the local tasks are listed here by import, so asking for ``long_addition`` never depends on
some other module having been imported first for its side effects. Tests and examples add their own tasks with
:func:`register_task` / :func:`register_metrics`; local names take precedence over reasoning-gym names.

Problems are regenerated deterministically from ``(spec, n, seed)``, so a cache on disk only needs
``(task, index)`` plus the question text as a check (see ``toolchain.train.rlkv``).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

from ..errors import KvtoolError
from . import cyclic_sum, long_addition
from .alphabet import TaskSpec, chain_metrics
from .base import Problem, parse_task

Factory = Callable[[int, int], list[Problem]]
MetricFn = Callable[[Problem, str], dict]

_LOCAL: dict[str, Factory] = {long_addition.TASK: long_addition.make_problems,
                              cyclic_sum.TASK: cyclic_sum.make_problems}
_METRICS: dict[str, MetricFn] = {long_addition.TASK: chain_metrics, cyclic_sum.TASK: chain_metrics}
# what the CPU reasoner's trainer needs per task (fixed prompt and chain lengths, a vectorised batch maker)
TASK_SPECS: dict[str, TaskSpec] = {long_addition.TASK: long_addition.SPEC, cyclic_sum.TASK: cyclic_sum.SPEC}


def register_task(name: str, factory: Factory) -> None:
    """Add a local task: ``factory(n, seed)`` returns ``n`` Problems (each with a ``scorer``)."""
    _LOCAL[name] = factory


def register_metrics(task: str, fn: MetricFn) -> None:
    """Extra per-record metrics for ``task``: ``fn(problem, completion) -> {name: float}`` (``kvtool eval``)."""
    _METRICS[task] = fn


def task_metrics(task: str) -> Optional[MetricFn]:
    """The extra metrics of a task spec (by its name, options ignored), or None."""
    return _METRICS.get(parse_task(task)[0])


def task_spec(task: str = long_addition.TASK, n_digits: int = long_addition.N_DIGITS) -> TaskSpec:
    """The trainer spec of a CPU-reasoner task; ``n_digits`` resizes ``long_addition`` (tests use short ones)."""
    if task == long_addition.TASK and n_digits != long_addition.N_DIGITS:
        return long_addition.spec(n_digits)
    if task not in TASK_SPECS:
        raise ValueError(f"unknown reasoner task {task!r} (known: {', '.join(sorted(TASK_SPECS))})")
    return TASK_SPECS[task]


def make_dataset(task: str, n: int, seed: int) -> list[Problem]:
    """``n`` problems of one task spec, deterministic in ``(task, n, seed)``."""
    if n < 0:
        raise KvtoolError(f"number of problems must be >= 0, got {n}")
    name, kwargs = parse_task(task)
    if name in _LOCAL:
        if kwargs:
            raise KvtoolError(f"local task {name!r} takes no options")
        probs = _LOCAL[name](n, seed)
        for i, p in enumerate(probs):
            p.task, p.index = task, i
        return probs
    from .gym import gym_dataset

    return gym_dataset(task, name, kwargs, n, seed)


def make_problems(tasks: Sequence[str], n: int, seed: int) -> list[Problem]:
    """``n`` problems spread round-robin over ``tasks`` (task i gets seed ``seed + i``)."""
    if not tasks:
        raise KvtoolError("give at least one --task")
    counts = [n // len(tasks) + (1 if i < n % len(tasks) else 0) for i in range(len(tasks))]
    per = [make_dataset(t, c, seed + i) for i, (t, c) in enumerate(zip(tasks, counts))]
    out: list[Problem] = []
    for j in range(max(counts, default=0)):
        out.extend(p[j] for p in per if j < len(p))
    return out
