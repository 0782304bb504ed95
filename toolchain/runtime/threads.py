"""Default thread count for llama.cpp: the number of physical cores.

Why physical and not logical: llama.cpp's matmuls are memory- and FMA-bound, so a second hyperthread per core
adds contention rather than speed; llama.cpp's own default is also the physical core count. This is the
default ``n_threads`` everywhere in kvtool (doctor reports it).

Linux: unique ("physical id", "core id") pairs in /proc/cpuinfo, restricted to the CPUs this process may run
on (``sched_getaffinity``, e.g. under taskset or a container cpuset). macOS: ``sysctl -n hw.physicalcpu``.
Anything else, or anything unreadable: ``os.cpu_count()``.
"""
from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional


def _allowed_cpus() -> Optional[set]:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


def parse_cpuinfo(text: str, allowed: Optional[set] = None) -> Optional[int]:
    """Physical cores in a /proc/cpuinfo text (None when it has no topology lines, e.g. some ARM kernels)."""
    cores = set()
    proc = phys = core = None

    def flush():
        if proc is not None and core is not None and (allowed is None or proc in allowed):
            cores.add((phys or "0", core))

    for line in text.splitlines() + [""]:
        if not line.strip():  # blank line ends one processor block
            flush()
            proc = phys = core = None
            continue
        key, _, val = line.partition(":")
        key, val = key.strip(), val.strip()
        if key == "processor":
            try:
                proc = int(val)
            except ValueError:
                proc = None
        elif key == "physical id":
            phys = val
        elif key == "core id":
            core = val
    return len(cores) or None


def _linux_sysfs(allowed: Optional[set]) -> Optional[int]:
    cores = set()
    for d in Path("/sys/devices/system/cpu").glob("cpu[0-9]*"):
        try:
            n = int(d.name[3:])
            if allowed is not None and n not in allowed:
                continue
            pkg = (d / "topology" / "physical_package_id").read_text().strip()
            core = (d / "topology" / "core_id").read_text().strip()
        except (OSError, ValueError):
            continue
        cores.add((pkg, core))
    return len(cores) or None


def _macos() -> Optional[int]:
    try:
        out = subprocess.run(["sysctl", "-n", "hw.physicalcpu"], capture_output=True, text=True, timeout=5)
        return int(out.stdout.strip()) if out.returncode == 0 else None
    except (OSError, ValueError, subprocess.SubprocessError):
        return None


@functools.lru_cache(maxsize=1)
def physical_cores() -> int:
    """Physical cores this process can use; always >= 1."""
    n: Optional[int] = None
    if sys.platform.startswith("linux"):
        allowed = _allowed_cpus()
        try:
            n = parse_cpuinfo(Path("/proc/cpuinfo").read_text(), allowed)
        except OSError:
            n = None
        if n is None:
            n = _linux_sysfs(allowed)
        if n is None and allowed:
            n = len(allowed)
    elif sys.platform == "darwin":
        n = _macos()
    return max(1, n or os.cpu_count() or 1)
