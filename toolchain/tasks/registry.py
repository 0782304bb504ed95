"""Which tasks exist: the local (procedural) tasks, their extra eval metrics and trainer specs, and reasoning-gym.

Why a static registry: the local tasks are listed here by import, so asking for ``long_addition`` never depends on
some other module having been imported first for its side effects. Tests and examples add their own tasks with
:func:`register_task` / :func:`register_metrics`; local names take precedence over reasoning-gym names.

Problems are regenerated deterministically from ``(spec, n, seed)``, so a cache on disk only needs
``(task, index)`` plus the question text as a check (see ``toolchain.train.rlkv``).

A local task may declare options (``passkey:ctx=2048``: each name with the type its value must have) and may need
the model's tokenizer (``passkey`` sizes its prompts in model tokens). The caller passes ``count_tokens`` then;
tasks never import the runtime to get one (:func:`needs_tokenizer` tells eval to load it first).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence

from ..errors import KvtoolError
from . import cyclic_sum, long_addition, passkey
from .alphabet import TaskSpec, chain_metrics
from .base import Problem, parse_task

Factory = Callable[..., list[Problem]]
MetricFn = Callable[[Problem, str], dict]
CountTokens = Callable[[str], int]


@dataclass(frozen=True)
class LocalTask:
    """``factory(n, seed, **options)`` (plus ``count_tokens=`` when ``needs_tokenizer``); ``options`` maps each
    option name to the type its value must have."""
    factory: Factory
    options: Mapping[str, type] = field(default_factory=dict)
    needs_tokenizer: bool = False


_LOCAL: dict[str, LocalTask] = {long_addition.TASK: LocalTask(long_addition.make_problems),
                                cyclic_sum.TASK: LocalTask(cyclic_sum.make_problems),
                                passkey.TASK: LocalTask(passkey.make_problems, {"ctx": int}, needs_tokenizer=True)}
_METRICS: dict[str, MetricFn] = {long_addition.TASK: chain_metrics, cyclic_sum.TASK: chain_metrics}
# what the CPU reasoner's trainer needs per task (fixed prompt and chain lengths, a vectorised batch maker)
TASK_SPECS: dict[str, TaskSpec] = {long_addition.TASK: long_addition.SPEC, cyclic_sum.TASK: cyclic_sum.SPEC}


def register_task(name: str, factory: Factory, options: Optional[Mapping[str, type]] = None,
                  needs_tokenizer: bool = False) -> None:
    """Add a local task: ``factory(n, seed, **options)`` returns ``n`` Problems (each with a ``scorer``)."""
    _LOCAL[name] = LocalTask(factory, dict(options or {}), needs_tokenizer)


def needs_tokenizer(task: str) -> bool:
    """Whether the task spec's problems depend on the model's tokenizer (``make_dataset(count_tokens=...)``)."""
    t = _LOCAL.get(parse_task(task)[0])
    return bool(t is not None and t.needs_tokenizer)


def _check_options(name: str, t: LocalTask, kwargs: dict) -> None:
    for key, val in kwargs.items():
        if key not in t.options:
            if not t.options:
                raise KvtoolError(f"local task {name!r} takes no options")
            raise KvtoolError(f"task {name!r} has no option {key!r} (options: {', '.join(sorted(t.options))})")
        want = t.options[key]
        if isinstance(val, bool) and want is not bool or not isinstance(val, want):
            raise KvtoolError(f"task {name!r}: option {key} must be {want.__name__}, got {val!r}")


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


def make_dataset(task: str, n: int, seed: int, count_tokens: Optional[CountTokens] = None) -> list[Problem]:
    """``n`` problems of one task spec, deterministic in ``(task, n, seed)`` (and the tokenizer, for a task that
    needs one: ``count_tokens(text)`` is the number of tokens the model's runtime makes of a prompt)."""
    if n < 0:
        raise KvtoolError(f"number of problems must be >= 0, got {n}")
    name, kwargs = parse_task(task)
    if name in _LOCAL:
        t = _LOCAL[name]
        _check_options(name, t, kwargs)
        extra = {"count_tokens": count_tokens} if t.needs_tokenizer else {}
        probs = t.factory(n, seed, **kwargs, **extra)
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
