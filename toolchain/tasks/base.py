"""What every task shares: the ``Problem`` record, task specs, prompts, answer extraction and the 0/1 reward.

Every prompt asks for the final answer inside ``<answer>…</answer>``; the reward is the problem's own scorer on the
text inside the last such tag, turned into a raw 0/1 reward (``>= 1.0`` is a solve). RLKV's adaptive L1 weight needs
exactly that raw reward. Local tasks with their own format (the CPU reasoner's) set ``prompt`` and ``extract=False``.

A task spec is a name with optional config overrides: ``chain_sum`` or ``chain_sum:min_terms=2,max_terms=3``
(values are read as Python literals when they parse, otherwise as strings).
"""
from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from ..errors import KvtoolError

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
    # What eval writes into each record next to the result (e.g. passkey's depth and prompt token count).
    info: Optional[dict] = field(default=None, repr=False, compare=False)


# --- task specs ------------------------------------------------------------------------------------------------
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
