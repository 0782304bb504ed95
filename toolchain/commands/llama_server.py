"""The patched ``llama-server`` as ``kvtool serve --parallel N``'s engine: its command line, start, and KV report.

Why llama-server and not more of our own server: parallel slots, continuous batching over one cache, prompt
caching, cancellation and the OpenAI wire format are upstream's and maintained there. Built from the patched tree
(``runtime/tools.py``) it reads the file's budgets at load, so N sequences share one *mixed* cache with no extra flag.

kvtool's defaults on top of llama-server's: flash attention on (mixed rings keep V untransposed; without it V rows are
padded and the V savings are lost), ``--n-ctx`` tokens *per sequence* (so ``-c`` is N times that, caches not unified:
each slot gets its own stream, which is also what makes one request's floats independent of the others), loopback
only (the upstream listens on a Unix socket in a private directory; kvtool's validating front binds the port), no
web UI (the sdist has none built). The beacon loop runs in kvtool's Python decode loop, which llama-server does not
have, so a file with beacon keys needs ``--no-beacons`` here.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..errors import KvtoolError

# llama_kv_cache's allocation line; a mixed cache logs one per window group
_KV_LINE = re.compile(r"llama_kv_cache: size =\s*([\d.]+) MiB \(\s*(\d+) cells,\s*(\d+) layers,\s*(\d+)/(\d+) seqs\)")
_MIXED_LINE = re.compile(r"kvtool budgets: (\d+) of (\d+) KV heads compressed, sink = \d+, mixed KV (\w+)")


@dataclass
class ServerKV:
    """What llama-server's log says it allocated (MiB with two decimals, so bytes are +- 0.005 MiB per buffer)."""

    buffers: list = field(default_factory=list)  # {"mib", "cells", "layers", "seqs"}
    compressed_heads: Optional[int] = None
    total_heads: Optional[int] = None
    budgets_enabled: Optional[bool] = None  # None: the file has no kvtool budgets

    @property
    def mixed(self) -> bool:
        return len(self.buffers) > 1

    @property
    def allocated_bytes(self) -> int:
        return int(round(sum(b["mib"] for b in self.buffers) * 2**20))


def parse_kv_log(text: str) -> ServerKV:
    kv = ServerKV()
    for m in _KV_LINE.finditer(text):
        kv.buffers.append({"mib": float(m.group(1)), "cells": int(m.group(2)), "layers": int(m.group(3)),
                           "seqs": int(m.group(5))})
    m = _MIXED_LINE.search(text)
    if m:
        kv.compressed_heads, kv.total_heads = int(m.group(1)), int(m.group(2))
        kv.budgets_enabled = m.group(3) == "enabled"
    return kv


def server_args(exe: str, model: str, sock: str, parallel: int, n_ctx: int, n_ubatch: int, threads: Optional[int],
                cache_type: str, no_mixed: bool, flash_attn: Optional[bool], gpu_layers: str, seed: int,
                model_id: str) -> list[str]:
    """The llama-server command line for kvtool's defaults (``gpu_layers`` already resolved: a count or "all").

    Prompt reuse stays on, as in llama-server, for mixed files too: when a slot's window rings can no longer back
    the cut a reused prefix needs, the patched server re-processes the prompt instead (patch 0007)."""
    args = [exe, "-m", model, "--host", sock, "--parallel", str(parallel), "--ctx-size", str(n_ctx * parallel),
            "--no-kv-unified", "--cont-batching", "--flash-attn", "off" if flash_attn is False else "on",
            "--ubatch-size", str(n_ubatch), "--batch-size", str(max(n_ubatch, 2048)),
            "-ctk", cache_type, "-ctv", cache_type, "--gpu-layers", gpu_layers, "--seed", str(seed),
            "--alias", model_id, "--no-webui", "--metrics", "--slots", "--fit", "off", "--no-warmup",
            "--log-verbosity", "4"]  # libllama's INFO lines (the KV allocation) are level 4 in common's log
    if threads:
        args += ["--threads", str(threads), "--threads-batch", str(threads)]
    if no_mixed:
        args += ["--override-kv", "kvtool.kv.enabled=bool:false"]
    return args


def _die_with_parent() -> None:
    """In the child before exec: on Linux, SIGTERM when kvtool dies (even by SIGKILL), so no server is orphaned."""
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


class LlamaServer:
    """One llama-server child on a Unix socket in a private temp dir; ``stop`` ends it and removes the dir."""

    def __init__(self, args_without_host: list[str], log_path: Optional[Path] = None):
        self.dir = Path(tempfile.mkdtemp(prefix="kvtool-serve-"))
        self.sock = str(self.dir / "llama.sock")
        self.log_path = log_path or self.dir / "llama-server.log"
        self.args = [self.sock if a == "{sock}" else a for a in args_without_host]
        self.proc: Optional[subprocess.Popen] = None

    def start(self, timeout: float = 600.0) -> None:
        """Start and wait until /health answers 200 (the model is loaded); a one-line error when it exits first."""
        import httpx

        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         preexec_fn=_die_with_parent)
        transport = httpx.HTTPTransport(uds=self.sock)
        end = time.time() + timeout
        with httpx.Client(transport=transport, base_url="http://llama", timeout=5) as c:
            while time.time() < end:
                if self.proc.poll() is not None:
                    raise KvtoolError(f"llama-server exited with {self.proc.returncode} while loading: "
                                      f"{self.last_error()} (log: {self.log_path})", code=1)
                if os.path.exists(self.sock):
                    try:
                        if c.get("/health").status_code == 200:
                            return
                    except httpx.HTTPError:
                        pass
                time.sleep(0.1)
        self.stop()
        raise KvtoolError(f"llama-server did not become ready in {timeout:.0f} s (log: {self.log_path})", code=1)

    def log_text(self) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")
        except OSError:
            return ""

    def last_error(self) -> str:
        lines = [ln.strip() for ln in self.log_text().splitlines() if ln.strip()]
        for ln in reversed(lines):
            if "error" in ln.lower() or "failed" in ln.lower():
                return ln[-300:]
        return lines[-1][-300:] if lines else "no output"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)  # the socket, and the log unless --server-log moved it
