"""The patched llama.cpp tools for tests: their paths, a tiny mixed model for the server, and log parsing.

A missing tool set fails loudly (``make test`` builds it through ``make tools``), as a stock runtime does.
"""
from __future__ import annotations

from pathlib import Path

import pytest


def tool_paths() -> dict:
    from toolchain.errors import KvtoolError
    from toolchain.runtime.tools import tool_paths as paths

    try:
        return paths()
    except KvtoolError as e:
        pytest.fail(str(e))


# The random tiny model has no chat template; its SentencePiece vocabulary has no newline token, so none here.
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


def tiny_mixed(tiny_gguf: Path, dst: Path) -> Path:
    """The session's tiny F32 llama (3 layers x 2 KV heads) with one full and one windowed head per layer, and a
    plain chat template."""
    from helpers_runtime import write_windows

    from converters.gguf_budgets import T_STR, Value

    return write_windows(tiny_gguf, dst, [[0, 32]] * 3, 4, extra={"tokenizer.chat_template": Value(T_STR, CHAT_TEMPLATE)})
