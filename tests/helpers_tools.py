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


def serve_start(model: Path, log: Path, *args, timeout: float = 180):
    """``python -m toolchain.commands.serve MODEL ARGS`` on a free loopback port, one thread; (process, base_url)."""
    import re
    import subprocess
    import sys
    import time

    f = open(log, "w")
    proc = subprocess.Popen([sys.executable, "-m", "toolchain.commands.serve", str(model), "--port", "0", "-t", "1",
                             *map(str, args)], stdout=f, stderr=subprocess.STDOUT)
    f.close()
    end = time.time() + timeout
    while time.time() < end:
        m = re.search(r"listening on (http://\S+/v1)", log.read_text())
        if m:
            return proc, m.group(1)
        if proc.poll() is not None:
            raise AssertionError(f"serve exited with {proc.returncode}: {log.read_text()}")
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"serve did not start: {log.read_text()}")


def serve_stop(proc) -> None:
    import subprocess

    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
