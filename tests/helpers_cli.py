"""Shared by the CLI-level tests: run the real console script, and check kvtool's one-line error contract."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from toolchain.sdist import SDIST_FILE

REPO = Path(__file__).resolve().parent.parent
SDIST = Path.home() / ".cache" / "kvtool" / "sdist" / SDIST_FILE


def kvtool(*args, env=None, **kw) -> subprocess.CompletedProcess:
    """The real console script when installed (it is in .venv), else the module."""
    script = Path(sys.executable).parent / "kvtool"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "toolchain.cli"]
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run(cmd + list(args), capture_output=True, text=True, cwd=str(REPO), env=full_env,
                          timeout=120, **kw)


def assert_one_line_error(res, code=None, contains=None):
    assert res.returncode != 0, res
    if code is not None:
        assert res.returncode == code, (res.returncode, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("kvtool: error: "), lines[0]
    assert "Traceback" not in res.stderr
    if contains:
        assert contains in lines[0], lines[0]
    return lines[0]


def no_subprocess(*a, **k):
    raise AssertionError(f"unexpected subprocess (a download?): {a}")
