"""User-facing errors.

A ``KvtoolError`` is printed by the CLI as one line (no traceback unless ``--debug``) and exits with its code.
Code 2 is bad input or a missing prerequisite; code 1 is a failure while doing the work.
"""
from __future__ import annotations


class KvtoolError(Exception):
    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


class RuntimeNotBuilt(KvtoolError):
    def __init__(self) -> None:
        super().__init__("kvtool runtime is not built: run kvtool build-runtime", code=2)
