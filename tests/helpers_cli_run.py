"""Run the kvtool CLI in a forked child and judge how it failed (issue 16's contract for bad input).

``run_cli`` forks the test process (imports are warm, so a case costs milliseconds) and runs ``toolchain.cli.main``
in the child with its own stdin/stdout/stderr files: a segfault or abort there is a signal death this side sees,
not a dead pytest. Cases that load the llama.cpp runtime use ``fork=False`` (a fresh interpreter), because
OpenMP's thread pool does not survive a fork of a process that already used it.
"""
from __future__ import annotations

import hashlib
import io
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Result:
    rc: Optional[int]
    signal: Optional[int]
    out: str
    err: str

    @property
    def lines(self) -> list[str]:
        return [ln for ln in self.err.splitlines() if ln.strip()]


def _preload() -> None:
    """Import what the commands import, once in this process, so each forked child starts warm."""
    import importlib

    for mod in ("toolchain.cli", "toolchain.runtime.model", "toolchain.runtime.beacons", "toolchain.runtime.memory",
                "converters.gguf_budgets", "converters.gguf_fields", "toolchain.validate", "toolchain.atomic"):
        importlib.import_module(mod)


def run_cli(args: Sequence[str], stdin: bytes = b"", fork: bool = True, timeout: float = 300,
            cwd: Optional[Path] = None) -> Result:
    args = [str(a) for a in args]
    if fork:
        _preload()
    if not fork:
        res = subprocess.run([sys.executable, "-c", "from toolchain.cli import main; main()", *args],
                             input=stdin, capture_output=True, timeout=timeout, cwd=cwd)
        sig = -res.returncode if res.returncode < 0 else None
        return Result(None if sig else res.returncode, sig, res.stdout.decode("utf-8", "replace"),
                      res.stderr.decode("utf-8", "replace"))
    with tempfile.TemporaryDirectory(prefix="kvtool-cli-") as d:
        fin, fout, ferr = (os.path.join(d, n) for n in ("in", "out", "err"))
        Path(fin).write_bytes(stdin)
        pid = os.fork()
        if pid == 0:  # child: never returns into pytest
            code = 99
            try:
                if cwd is not None:
                    os.chdir(cwd)
                for fd, path, flags in ((0, fin, os.O_RDONLY), (1, fout, os.O_WRONLY | os.O_CREAT),
                                        (2, ferr, os.O_WRONLY | os.O_CREAT)):
                    f = os.open(path, flags, 0o600)
                    os.dup2(f, fd)
                    os.close(f)
                sys.stdin = io.TextIOWrapper(io.BufferedReader(io.FileIO(0, "r", closefd=False)))
                sys.stdout = io.TextIOWrapper(io.BufferedWriter(io.FileIO(1, "w", closefd=False)))
                sys.stderr = io.TextIOWrapper(io.BufferedWriter(io.FileIO(2, "w", closefd=False)), line_buffering=True)
                for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
                    signal.signal(s, signal.SIG_DFL if s != signal.SIGINT else signal.default_int_handler)
                from toolchain.cli import main

                try:
                    main(args)
                    code = 0
                except SystemExit as e:
                    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                except BaseException:
                    import traceback

                    traceback.print_exc()
                    code = 98
                for f in (sys.stdout, sys.stderr):
                    try:
                        f.flush()
                    except Exception:
                        pass
            finally:
                os._exit(code)
        end = time.time() + timeout
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.time() > end:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise AssertionError(f"kvtool {' '.join(args)} did not finish in {timeout} s")
            time.sleep(0.002)
        out = Path(fout).read_bytes().decode("utf-8", "replace")
        err = Path(ferr).read_bytes().decode("utf-8", "replace")
    if os.WIFSIGNALED(status):
        return Result(None, os.WTERMSIG(status), out, err)
    return Result(os.WEXITSTATUS(status), None, out, err)


def assert_one_line_error(res: Result, match: Optional[str] = None, what: str = "") -> str:
    """Issue 16's contract: non-zero exit, no signal death, no traceback, exactly one ``kvtool: error:`` line."""
    ctx = f"{what}\nrc={res.rc} signal={res.signal}\nstderr:\n{res.err[-3000:]}"
    assert res.signal is None, "died by signal " + ctx
    assert res.rc not in (0, None), "exit 0 " + ctx
    assert "Traceback" not in res.err, "traceback " + ctx
    errs = [ln for ln in res.lines if ln.startswith("kvtool: error:")]
    assert len(errs) == 1 and errs[0] == res.lines[-1], "not one error line " + ctx
    assert len(errs[0]) < 2000, "error line too long " + ctx
    if match is not None:
        import re

        assert re.search(match, errs[0]), f"{match!r} not in {errs[0]!r}"
    return errs[0]


def digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    return h.hexdigest()


def snapshot(d: Path) -> dict:
    """Every entry under ``d`` (names, kinds and content hashes): 'no output file, untouched input' is equality."""
    out = {}
    for p in sorted(Path(d).rglob("*")):
        if p.is_symlink():
            out[str(p)] = ("link", os.readlink(p))
        elif p.is_file():
            out[str(p)] = ("file", digest(p))
        elif p.is_dir():
            out[str(p)] = ("dir",)
        else:
            out[str(p)] = ("special", p.stat().st_mode)
    return out
