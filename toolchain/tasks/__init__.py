"""Verifiable reasoning tasks: problems, prompts, answer extraction, 0/1 rewards (``base``), the task registry
(``registry``), reasoning-gym adapters (``gym``) and the CPU reasoner's procedural tasks (``long_addition``,
``cyclic_sum`` over one ``alphabet``) and the long-context retrieval task ``passkey``.

Tasks sit beside the runtime: training and eval import them; the runtime never does.
"""
from .base import INSTRUCTION, Problem, build_prompt, encode_prompt, extract_answer, parse_task, score
from .registry import (
    TASK_SPECS,
    make_dataset,
    make_problems,
    needs_tokenizer,
    register_metrics,
    register_task,
    task_metrics,
    task_spec,
)

__all__ = ["INSTRUCTION", "Problem", "TASK_SPECS", "build_prompt", "encode_prompt", "extract_answer", "make_dataset",
           "make_problems", "needs_tokenizer", "parse_task", "register_metrics", "register_task", "score",
           "task_metrics", "task_spec"]
