"""Verifiable reasoning tasks for RLKV training: prompts, answer extraction, 0/1 rewards.

Problems come from ``reasoning-gym`` (``reasoning_gym.create_dataset``): chain_sum, basic_arithmetic,
simple_equations, gsm_symbolic, shortest_path, path_star ... Every prompt asks for the final answer inside
``<answer>…</answer>``; the reward is the dataset's own ``score_answer`` on the text inside the last such tag,
turned into a raw 0/1 reward (``>= 1.0`` is a solve). RLKV's adaptive L1 weight needs exactly that raw reward.

A task spec is a dataset name with optional config overrides: ``chain_sum`` or ``chain_sum:min_terms=2,max_terms=3``
(values are read as Python literals when they parse, otherwise as strings). Local tasks (tests, procedural examples)
can be added with :func:`register_task`; they take precedence over reasoning-gym names.

Problems are regenerated deterministically from ``(spec, n, seed)``, so a cache on disk only needs
``(task, index)`` plus the question text as a check (see ``toolchain.train.rlkv``).
"""
from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from .errors import KvtoolError

__all__ = [
    "INSTRUCTION",
    "Problem",
    "build_prompt",
    "encode_prompt",
    "extract_answer",
    "make_dataset",
    "make_problems",
    "parse_task",
    "register_task",
    "score",
]

INSTRUCTION = (
    "Solve the problem. You may think step by step first. Then give only the final answer inside "
    "<answer></answer> tags, for example <answer>42</answer>."
)

_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)

Scorer = Callable[[Optional[str], dict], float]


@dataclass
class Problem:
    """One verifiable problem. ``entry`` is the dataset's own record (question, answer, metadata)."""

    task: str  # the task spec it came from
    index: int  # index inside make_dataset(task, n, seed)
    question: str
    answer: str
    entry: dict = field(repr=False)
    scorer: Optional[Scorer] = field(default=None, repr=False, compare=False)
    # Local tasks with their own format (e.g. a procedural model's raw token string): ``prompt`` is used verbatim
    # (no instruction, no chat template) and, with ``extract=False``, the scorer gets the whole completion.
    prompt: Optional[str] = field(default=None, repr=False)
    extract: bool = True


# --- local tasks ---------------------------------------------------------------------------------------------
_LOCAL: dict[str, Callable[[int, int], list[Problem]]] = {}


def register_task(name: str, factory: Callable[[int, int], list[Problem]]) -> None:
    """Add a local task: ``factory(n, seed)`` returns ``n`` Problems (each with a ``scorer``)."""
    _LOCAL[name] = factory


def parse_task(spec: str) -> tuple[str, dict[str, Any]]:
    """``"name:key=value,key=value"`` -> (name, overrides)."""
    name, _, rest = spec.partition(":")
    name = name.strip()
    if not name:
        raise KvtoolError(f"empty task name in {spec!r}")
    kwargs: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, val = part.partition("=")
        if not eq or not key.strip():
            raise KvtoolError(f"task option {part!r} in {spec!r} is not key=value")
        try:
            kwargs[key.strip()] = ast.literal_eval(val.strip())
        except (ValueError, SyntaxError):
            kwargs[key.strip()] = val.strip()
    return name, kwargs


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


# --- prompts ---------------------------------------------------------------------------------------------------
def build_prompt(problem: Problem, tokenizer: Any = None) -> tuple[str, bool]:
    """The prompt text and whether it came from the tokenizer's chat template.

    With a chat template: a system message with :data:`INSTRUCTION` and the question as the user turn (templates that
    reject a system role get the instruction prepended to the user turn), followed by the generation prompt.
    Without one: plain text ending in ``"Solution:"``. A problem with its own ``prompt`` gets it verbatim.
    """
    if problem.prompt is not None:
        return problem.prompt, False
    template = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    if template:
        msgs = [{"role": "system", "content": INSTRUCTION}, {"role": "user", "content": problem.question}]
        try:
            text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        except Exception:  # e.g. "System role not supported"
            msgs = [{"role": "user", "content": f"{INSTRUCTION}\n\n{problem.question}"}]
            text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return str(text), True
    return f"{INSTRUCTION}\n\nProblem: {problem.question}\nSolution:", False


def encode_prompt(problem: Problem, tokenizer: Any) -> list[int]:
    """Prompt token ids. Chat-template text already holds its special tokens, so none are added again."""
    text, chat = build_prompt(problem, tokenizer)
    return list(tokenizer(text, add_special_tokens=not chat)["input_ids"])


# --- answers and rewards ---------------------------------------------------------------------------------------
def extract_answer(text: str) -> Optional[str]:
    """Stripped text inside the last complete ``<answer>…</answer>``, or None."""
    matches = _ANSWER_RE.findall(text or "")
    return matches[-1].strip() if matches else None


def score(problem: Problem, completion: str) -> float:
    """Raw 0/1 reward: 1.0 iff the dataset's ``score_answer`` gives the extracted answer >= 1.0 (with
    ``problem.extract`` False: the whole completion)."""
    ans = extract_answer(completion) if problem.extract else completion
    if ans is None or problem.scorer is None:
        return 0.0
    try:
        s = float(problem.scorer(ans, problem.entry))
    except Exception:  # a scorer choking on odd model output is a wrong answer, not a crash
        return 0.0
    return 1.0 if s >= 1.0 else 0.0
