"""Start and stop ``kvtool serve`` in a subprocess, for the tests that talk to it with real HTTP clients.

Why a subprocess: the server must be a separate process for a client disconnect, a port clash or a signal to mean
what they mean for users. It binds port 0 and the URL is read from its "listening on" line, so tests never race
for a port. One thread (``-t 1``): see test_cli_run.
"""
from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path


def start_server(model: Path, log: Path, *args, timeout: float = 180):
    """Start ``serve`` on a free loopback port; returns (process, base_url). Stop it with ``stop_server``.

    ``timeout`` bounds only the wait for a server that never starts (llama-server behind ``--parallel`` loads
    more slowly on a busy machine); a server that exits early fails at once with its log."""
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


def stop_server(proc) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
