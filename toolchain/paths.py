"""Where kvtool keeps its caches.

Everything slow to make (the llama-cpp-python sdist, the patched build tree, wheels, models) lives under one
root so that CI and a user's laptop can reuse it across runs. ``KVTOOL_CACHE`` moves it (tests use that).
"""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def cache_root() -> Path:
    root = os.environ.get("KVTOOL_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "kvtool"


def models_dir() -> Path:
    return cache_root() / "models"
