"""kvtool doctor: versions, the patched-runtime check, thread count; no torch import."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
from helpers_cli import REPO, kvtool

from toolchain.errors import KvtoolError
from toolchain.runtime import build
from toolchain.runtime.threads import parse_cpuinfo, physical_cores
from toolchain.sdist import SDIST_VERSION

# ------------------------------------------------------------------------------------------- doctor


def test_doctor_json(patched_runtime):
    res = kvtool("doctor", "--json")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    for key in ("kvtool", "python", "platform", "llama_cpp_python", "runtime_patched", "runtime_version",
                "patch_hash", "expected_patch_hash", "runtime_up_to_date", "backend", "torch", "transformers",
                "reasoning_gym", "matplotlib", "train_extras", "threads", "cache_dir"):
        assert key in info, key
    assert info["runtime_patched"] is True
    assert info["llama_cpp_python"] == SDIST_VERSION
    assert isinstance(info["runtime_version"], int) and info["runtime_version"] >= 1
    assert len(info["patch_hash"]) == 16 and int(info["patch_hash"], 16) >= 0
    assert info["expected_patch_hash"] == build.patch_hash()
    assert info["runtime_up_to_date"] == (info["patch_hash"] == info["expected_patch_hash"])
    assert info["backend"] in build.BACKEND_CMAKE_ARGS
    assert info["threads"] == physical_cores() >= 1
    assert isinstance(info["train_extras"], bool)
    if not info["runtime_up_to_date"]:
        warnings.warn(f"loaded runtime {info['patch_hash']} is older than patches/+cpp/ "
                      f"({info['expected_patch_hash']}): run kvtool build-runtime", stacklevel=1)


def test_doctor_does_not_import_torch():
    code = "import sys, toolchain.commands.doctor as d; d.collect(); print('torch' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(REPO), timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "False"


def test_stock_runtime_message(monkeypatch):
    from toolchain.runtime import library

    monkeypatch.setattr(library, "_fn", lambda *a: None)
    with pytest.raises(KvtoolError) as e:
        library.require_patched()
    assert str(e.value) == "kvtool runtime is not built: run kvtool build-runtime"
    assert e.value.code == 2


CPUINFO_2S_HT = "\n\n".join(
    f"processor\t: {p}\nphysical id\t: {s}\nsiblings\t: 4\ncore id\t\t: {c}\ncpu cores\t: 2"
    for p, (s, c) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1), (0, 0), (0, 1), (1, 0), (1, 1)]))


def test_physical_cores_parsing():
    assert parse_cpuinfo(CPUINFO_2S_HT) == 4  # 8 logical CPUs, 2 sockets x 2 cores
    assert parse_cpuinfo(CPUINFO_2S_HT, allowed={0, 4}) == 1  # both hyperthreads of one core
    assert parse_cpuinfo(CPUINFO_2S_HT, allowed={0, 1}) == 2
    assert parse_cpuinfo("processor\t: 0\nBogoMIPS\t: 50\n\nprocessor\t: 1\nBogoMIPS\t: 50\n") is None  # ARM style
    assert 1 <= physical_cores() <= (os.cpu_count() or 1)
