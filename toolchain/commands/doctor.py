"""``kvtool doctor``: what is installed, whether the loaded runtime is kvtool's patched build, and its devices.

It never imports torch (slow, and absent on edge installs): the train extras are probed with
``importlib.util.find_spec``. It does load libllama, because "patched" means the *loaded* library exports the
kvtool symbols, not that a marker file says so.
"""
from __future__ import annotations

import importlib.util
import platform
import sys

from .. import __version__
from ..paths import cache_root
from ..runtime.library import devices, gpu_offload_available, runtime_info
from ..runtime.threads import physical_cores

# import name -> the `train` extra's distribution it comes from
TRAIN_MODULES = {
    "torch": "torch",
    "transformers": "transformers",
    "reasoning_gym": "reasoning-gym",
    "matplotlib": "matplotlib",
    "safetensors": "safetensors",
    "sentencepiece": "sentencepiece",
}
REPORTED = ("torch", "transformers", "reasoning_gym", "matplotlib")


def importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def expected_patch_hash():
    """The patch hash of this checkout's patches/ + cpp/ (None when they are not available, e.g. a plain wheel)."""
    try:
        from ..runtime.build import patch_hash

        return patch_hash()
    except (OSError, ValueError):
        return None


def collect() -> dict:
    rt = runtime_info()
    expected = expected_patch_hash()
    info = {
        "kvtool": __version__,
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "platform": f"{platform.system()} {platform.machine()}",
        "llama_cpp_python": rt["llama_cpp_python"],
        "runtime_patched": rt["runtime_patched"],
        "runtime_version": rt["runtime_version"],
        "patch_hash": rt["patch_hash"],
        "expected_patch_hash": expected,
        "runtime_up_to_date": bool(rt["runtime_patched"] and expected is not None and rt["patch_hash"] == expected),
        "backend": rt["backend"],
    }
    devs = devices() if rt["runtime_patched"] else None
    info["devices"] = devs  # None: the loaded runtime cannot list them (stock, or older than kvtool_device_info)
    info["gpu_offload"] = gpu_offload_available() if rt["llama_cpp_python"] else False
    info["default_gpu_layers"] = "all" if info["gpu_offload"] else 0
    for mod in REPORTED:
        info[mod] = importable(mod)
    info["train_extras"] = all(importable(m) for m in TRAIN_MODULES)
    info["threads"] = physical_cores()
    info["cache_dir"] = str(cache_root())
    return info
