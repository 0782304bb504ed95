"""``kvtool build-runtime --export-source ARCHIVE``: a pruned, pre-patched runtime source tree that travels.

Why: a GPU machine without network (bench/gpu_check.sh) cannot download the sdist, and the sdist is 73 MiB, most of
it vocabularies, docs and a web UI that the library never compiles. The archive is the llama-cpp-python project with
patches/ (plus the backend's own series) and cpp/ already applied, the kvtool marker written for that backend, and
everything the library build does not read removed. ``kvtool_export.json`` at its top says what it is and which
CMake arguments reproduce kvtool's recipe, so the far side needs only CMake and a compiler.
"""
from __future__ import annotations

import json
import os
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Optional

from ..errors import KvtoolError
from ..paths import cache_root
from ..sdist import SDIST_PROJECT, SDIST_TOP, SDIST_VERSION, fetch_sdist
from . import build

MAX_BYTES = 60 * 2**20
EXPORT_MANIFEST = "kvtool_export.json"
# Relative to vendor/llama.cpp: read by no part of the library build (LLAMA_BUILD_TOOLS/EXAMPLES are off when
# llama.cpp is a subproject; tools/mtmd stays for LLAVA_BUILD=ON users).
PRUNE = ["models", "docs", "media", "benches", "examples", "gguf-py", "scripts", "conversion", ".devops", ".github",
         "tools/server", "tools/ui", "grammars", "prompts", "requirements", "pocs", "ci", "licenses"]
# Relative to the llama-cpp-python project: its git history (the sdist carries one), Python examples, docs, tests;
# and the multimodal test media (kvtool builds with LLAVA_BUILD=OFF).
PRUNE_PROJECT = [".git", ".github", "docker", "examples", "docs", "tests", "vendor/llama.cpp/tools/mtmd/test-1.jpeg",
                 "vendor/llama.cpp/tools/mtmd/test-2.mp3", "vendor/llama.cpp/tools/mtmd/test-3.mp4"]
# ggml backends kept for every export; the exported backend's own directory is added to these.
KEEP_BACKENDS = {"ggml-cpu"}
BACKEND_DIRS = {"cpu": set(), "cuda": {"ggml-cuda"}, "metal": {"ggml-metal"}, "vulkan": {"ggml-vulkan"}}


def prune(project: Path, backend: str) -> None:
    llama = project / "vendor" / "llama.cpp"
    for p in [project / rel for rel in PRUNE_PROJECT] + [llama / rel for rel in PRUNE]:
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    keep = KEEP_BACKENDS | BACKEND_DIRS[backend]
    for d in (llama / "ggml" / "src").iterdir():
        if d.is_dir() and d.name.startswith("ggml-") and d.name not in keep:
            shutil.rmtree(d)


def manifest(phash: str, backend: str) -> dict:
    return {"patch_hash": phash, "backend": backend, "sdist": f"{SDIST_PROJECT}=={SDIST_VERSION}",
            "recipe": build.RECIPE_VERSION, "top": SDIST_TOP,
            "cmake_args": [*build.COMMON_CMAKE_ARGS, *build.BACKEND_CMAKE_ARGS[backend],
                           f"-DKVTOOL_PATCH_HASH={phash}", f"-DKVTOOL_BACKEND={backend}"]}


def export_source(dest: str, backend: str = "cuda", sdist: Optional[str] = None, echo=print) -> Path:
    """Write the archive atomically; refuse (and leave nothing) when it would exceed MAX_BYTES."""
    build.check_backend_args(backend, None)
    out = Path(dest).expanduser()
    if not out.name.endswith(".tar.gz"):
        raise KvtoolError(f"--export-source wants a .tar.gz path, got {dest}")
    if not out.parent.is_dir():
        raise KvtoolError(f"directory does not exist: {out.parent}")
    sdist_path = build.check_sdist(Path(sdist)) if sdist else fetch_sdist(echo)
    phash = build.patch_hash(backend)
    cache_root().mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="export-", dir=cache_root()))
    tmp = out.with_name(out.name + ".tmp")
    try:
        project = build.patched_project(sdist_path, staging, phash, backend, portable=False)
        prune(project, backend)
        (project / EXPORT_MANIFEST).write_text(json.dumps(manifest(phash, backend), indent=1) + "\n")
        with tarfile.open(tmp, "w:gz", compresslevel=9) as tf:
            tf.add(project, arcname=SDIST_TOP)
        size = tmp.stat().st_size
        if size > MAX_BYTES:
            raise KvtoolError(f"exported archive is {size / 2**20:.1f} MiB, over the {MAX_BYTES // 2**20} MiB limit")
        os.replace(tmp, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if tmp.exists():
            tmp.unlink()
    echo(f"[kvtool] exported {backend} source (patch hash {phash}): {out} ({size / 2**20:.1f} MiB)")
    return out
