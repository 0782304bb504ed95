"""Progress and notes go to stderr, flushed at once: stdout carries only results (text, JSON), so pipes stay clean.

Why one function in the base layer: the CLI, eval and both trainers report progress the same way, and the trainers
must not need click (nor the CLI torch) for it.
"""
from __future__ import annotations

import sys


def echo_stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
