"""Shared fixtures. Test files import helpers from this folder (helpers_models, helpers_runtime)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def patched_runtime():
    """Skip nothing: a stock runtime is a setup error that must fail loudly (make test builds the runtime)."""
    from toolchain.runtime.library import runtime_info

    info = runtime_info()
    if not info["runtime_patched"]:
        pytest.fail("the installed llama-cpp-python is not kvtool's patched build: run kvtool build-runtime")
    return info
