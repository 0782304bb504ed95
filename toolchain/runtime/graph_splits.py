"""How many pieces llama.cpp's scheduler cuts a context's graph into (its "splits").

Why: with every layer on a GPU, each extra split is an op the GPU backend could not run, executed on the CPU with
tensors copied across. So "the mixed graph's split count equals stock's" is the test that no kvtool op falls back
to the CPU. The C API does not expose the scheduler; llama.cpp logs the counts of its worst-case prompt and
token graphs once, when the context is created (``graph ...: nodes = ..., splits = PP / TG``), and we read that
line through llama.cpp's log callback while the context is made.
"""
from __future__ import annotations

import contextlib
import ctypes
import re
from typing import Callable, Iterator, TypeVar

from ..errors import KvtoolError

T = TypeVar("T")
_SPLITS = re.compile(r"graph(?: \(pp bs=\d+, tg bs=\d+\))?: nodes = \d+(?: / \d+)?, splits = (\d+)(?: / (\d+))?")


@contextlib.contextmanager
def llama_log() -> Iterator[list[str]]:
    """Collect everything libllama/ggml log (all levels) while the block runs, then restore llama-cpp-python's
    own callback."""
    import llama_cpp
    from llama_cpp import _logger

    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def _collect(level, text, user_data):  # noqa: ARG001 (ctypes signature)
        lines.append(text.decode("utf-8", "replace"))

    llama_cpp.llama_log_set(_collect, ctypes.c_void_p(0))
    try:
        yield lines
    finally:
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


def parse_splits(log: str) -> tuple[int, int]:
    """(prompt-graph splits, token-graph splits) from the last context creation in ``log``."""
    found = list(_SPLITS.finditer(log))
    if not found:
        raise KvtoolError("llama.cpp logged no graph split count (is this llama.cpp older than the pinned one?)")
    m = found[-1]
    pp = int(m.group(1))
    return pp, int(m.group(2)) if m.group(2) else pp


def load_with_splits(load: Callable[[], T]) -> tuple[T, tuple[int, int]]:
    """Run ``load`` (which creates one llama context) and return (its result, (pp splits, tg splits))."""
    with llama_log() as lines:
        obj = load()
    return obj, parse_splits("".join(lines))
