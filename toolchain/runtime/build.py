"""Build and install the patched llama-cpp-python (docs/architecture.md §6).

Why this shape:
- We never vendor llama.cpp. The pinned llama-cpp-python sdist already carries it, so we patch that tree
  (``patches/series``) and drop our own sources (``cpp/``) into ``vendor/llama.cpp/src/kvtool/``.
- A cold CPU build takes ~9 min on 2 cores, so everything is cached: the sdist, a persistent source tree whose
  unchanged files keep their mtimes (so an edited .cpp rebuilds in seconds), a persistent CMake build dir per
  backend, and the finished wheel keyed by the patch hash.
- The installed build carries ``llama_cpp/kvtool_build.json`` and the library itself exports
  ``kvtool_patch_hash()``, so "is the right runtime installed?" is answered without guessing.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Callable, Optional

from ..errors import KvtoolError
from ..paths import REPO_ROOT, cache_root
from ..sdist import SDIST_PROJECT, SDIST_TOP, SDIST_VERSION, fetch_sdist

# Bump when the recipe below changes in a way that changes the produced wheel.
RECIPE_VERSION = "1"

BACKEND_CMAKE_ARGS = {
    "cpu": [],
    "cuda": ["-DGGML_CUDA=on"],
    "metal": ["-DGGML_METAL=on"],
    "vulkan": ["-DGGML_VULKAN=on"],
}
# The multimodal library (mtmd) is loaded lazily by llama-cpp-python and kvtool never uses it: skip it.
COMMON_CMAKE_ARGS = ["-DLLAVA_BUILD=OFF"]
BUILD_REQUIREMENTS = ["scikit-build-core>=0.9.2", "cmake>=3.21", "ninja"]
MARKER = "kvtool_build.json"

Echo = Callable[[str], None]


def patches_dir() -> Path:
    return REPO_ROOT / "patches"


def cpp_dir() -> Path:
    return REPO_ROOT / "cpp"


def patch_series() -> list[Path]:
    series = patches_dir() / "series"
    names = [ln.strip() for ln in series.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    return [patches_dir() / n for n in names]


def cpp_sources() -> list[Path]:
    return sorted(p for p in cpp_dir().iterdir() if p.is_file() and p.suffix in (".h", ".cpp", ".hpp"))


def patch_hash() -> str:
    """Hash of everything that changes the patched runtime: sdist version, recipe, patches, cpp/."""
    h = hashlib.sha256()
    h.update(f"{SDIST_PROJECT}=={SDIST_VERSION};recipe={RECIPE_VERSION}\n".encode())
    for p in [patches_dir() / "series", *patch_series(), *cpp_sources()]:
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def build_key(backend: str, portable: bool) -> str:
    return backend + ("-portable" if portable else "")


def installed_build() -> Optional[dict]:
    """The marker of the installed llama_cpp package, or None (stock or absent). Does not load libllama."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    marker = Path(list(spec.submodule_search_locations)[0]) / MARKER
    try:
        return json.loads(marker.read_text())
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------- sdist


def check_sdist(path: Path) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        raise KvtoolError(f"sdist not found: {path}")
    if not tarfile.is_tarfile(path):
        raise KvtoolError(f"not a tar.gz sdist: {path}")
    return path


def extract_sdist(sdist: Path, into: Path) -> Path:
    """Extract and return the project root; refuses anything but the pinned version."""
    with tarfile.open(sdist) as tf:
        names = tf.getnames()
        if not any(n.startswith(f"{SDIST_TOP}/vendor/llama.cpp/") for n in names):
            raise KvtoolError(f"{sdist} is not the {SDIST_PROJECT} {SDIST_VERSION} sdist (no {SDIST_TOP}/vendor/llama.cpp)")
        try:
            tf.extractall(into, filter="data")
        except TypeError:  # Python < 3.11.4 has no filter argument
            tf.extractall(into)
    return into / SDIST_TOP


# ----------------------------------------------------------------------------------------- patching


def apply_patches(project: Path) -> None:
    """Apply patches/series to vendor/llama.cpp; stop at the first failing hunk naming the file."""
    llama = project / "vendor" / "llama.cpp"
    for patch in patch_series():
        if not patch.is_file():
            raise KvtoolError(f"patch listed in patches/series is missing: {patch.name}")
        res = subprocess.run(["git", "apply", "--whitespace=nowarn", str(patch)], cwd=llama,
                             capture_output=True, text=True)
        if res.returncode != 0:
            m = re.search(r"patch failed: ([^:\s]+)", res.stderr) or re.search(r"error: ([^:\s]+): ", res.stderr)
            where = m.group(1) if m else res.stderr.strip().splitlines()[0]
            raise KvtoolError(f"patch {patch.name} does not apply to vendor/llama.cpp: {where}", code=1)


def install_cpp(project: Path) -> None:
    """Copy our own sources into the tree: src/kvtool/ for libllama, and kvtool.h next to llama.h."""
    llama = project / "vendor" / "llama.cpp"
    dst = llama / "src" / "kvtool"
    dst.mkdir(parents=True, exist_ok=True)
    for src in cpp_sources():
        shutil.copyfile(src, dst / src.name)
    shutil.copyfile(cpp_dir() / "kvtool.h", llama / "include" / "kvtool.h")


def write_marker(project: Path, phash: str, backend: str, portable: bool) -> None:
    marker = {"patch_hash": phash, "backend": backend, "portable": portable,
              "sdist": f"{SDIST_PROJECT}=={SDIST_VERSION}", "recipe": RECIPE_VERSION}
    (project / "llama_cpp" / MARKER).write_text(json.dumps(marker, indent=1) + "\n")


def sync_tree(src: Path, dst: Path) -> int:
    """Make dst's content equal src's while leaving unchanged files' mtimes alone (incremental builds)."""
    changed = 0
    seen: set[Path] = set()
    for root, dirs, files in os.walk(src):
        dirs[:] = [d for d in dirs if d != ".git"]
        rel_root = Path(root).relative_to(src)
        (dst / rel_root).mkdir(parents=True, exist_ok=True)
        for f in files:
            rel = rel_root / f
            seen.add(rel)
            s, d = src / rel, dst / rel
            if d.is_file() and d.stat().st_size == s.stat().st_size and d.read_bytes() == s.read_bytes():
                continue
            shutil.copyfile(s, d)
            changed += 1
    for root, _dirs, files in os.walk(dst):
        rel_root = Path(root).relative_to(dst)
        if rel_root.parts[:2] == ("llama_cpp", "lib") or ".git" in rel_root.parts:
            continue  # CMake installs the built libraries here
        for f in files:
            if rel_root / f not in seen:
                (dst / rel_root / f).unlink()
                changed += 1
    return changed


def prepare_tree(sdist: Path, phash: str, backend: str, portable: bool, echo: Echo) -> Path:
    key = build_key(backend, portable)
    tree = cache_root() / "src" / key / SDIST_TOP
    staging_root = Path(tempfile.mkdtemp(prefix="staging-", dir=cache_root()))
    try:
        echo("[kvtool] extracting sdist and applying patches/series")
        project = extract_sdist(sdist, staging_root)
        apply_patches(project)
        install_cpp(project)
        write_marker(project, phash, backend, portable)
        tree.mkdir(parents=True, exist_ok=True)
        n = sync_tree(project, tree)
        echo(f"[kvtool] source tree ready ({n} files changed): {tree}")
    finally:
        shutil.rmtree(staging_root, ignore_errors=True)
    return tree


# ------------------------------------------------------------------------------------------- build

_NINJA = re.compile(r"^\[(\d+)/(\d+)\]")
_MAKE = re.compile(r"^\[\s*(\d+)%\]")


def ensure_build_requirements(echo: Echo) -> None:
    missing = importlib.util.find_spec("scikit_build_core") is None or shutil.which("cmake") is None
    if missing:
        echo("[kvtool] installing build requirements: " + " ".join(BUILD_REQUIREMENTS))
        res = subprocess.run([sys.executable, "-m", "pip", "install", "-q", *BUILD_REQUIREMENTS],
                             capture_output=True, text=True)
        if res.returncode != 0:
            raise KvtoolError("could not install build requirements: " + res.stderr.strip().splitlines()[-1], code=1)


def cmake_args(backend: str, portable: bool, phash: str) -> str:
    args = [*COMMON_CMAKE_ARGS, *BACKEND_CMAKE_ARGS[backend],
            f"-DKVTOOL_PATCH_HASH={phash}", f"-DKVTOOL_BACKEND={backend}"]
    if portable:
        args.append("-DGGML_NATIVE=OFF")
    extra = os.environ.get("CMAKE_ARGS")
    if extra:
        args.append(extra)
    return " ".join(args)


def build_wheel(tree: Path, backend: str, portable: bool, jobs: int, phash: str, echo: Echo) -> Path:
    key = build_key(backend, portable)
    build_dir = cache_root() / "build" / key
    logs = cache_root() / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"build-{phash}-{key}.log"
    out_dir = Path(tempfile.mkdtemp(prefix="wheel-", dir=cache_root()))
    env = dict(os.environ, CMAKE_ARGS=cmake_args(backend, portable, phash), CMAKE_BUILD_PARALLEL_LEVEL=str(jobs))
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-v",
           "-w", str(out_dir), "-C", f"build-dir={build_dir}", str(tree)]
    echo(f"[kvtool] compiling ({backend}, {jobs} jobs; a cold CPU build takes ~9 min on 2 cores); log: {log_path}")
    t0 = time.time()
    last_shown = -1
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            m = _NINJA.match(line.strip())
            pct = None
            if m:
                pct = int(100 * int(m.group(1)) / max(1, int(m.group(2))))
            else:
                m = _MAKE.match(line.strip())
                if m:
                    pct = int(m.group(1))
            if pct is not None and pct // 10 != last_shown // 10:
                last_shown = pct
                echo(f"[kvtool]   compile {pct:3d}%  ({time.time() - t0:5.0f} s)")
        rc = proc.wait()
    if rc != 0:
        shutil.rmtree(out_dir, ignore_errors=True)
        tail = log_path.read_text().splitlines()[-15:]
        for ln in tail:
            echo("    " + ln)
        raise KvtoolError(f"runtime build failed (exit {rc}); full log: {log_path}", code=1)
    wheels = list(out_dir.glob("*.whl"))
    if len(wheels) != 1:
        raise KvtoolError(f"build produced no wheel; full log: {log_path}", code=1)
    echo(f"[kvtool] compiled in {time.time() - t0:.0f} s")
    return wheels[0]


# ----------------------------------------------------------------------------------------- wheels


def wheel_cache_dir(phash: str, backend: str, portable: bool) -> Path:
    return cache_root() / "wheels" / f"{phash}-{build_key(backend, portable)}"


def store_wheel(built: Path, cache_dir: Path) -> Path:
    cache_dir.mkdir(parents=True, exist_ok=True)
    dst = cache_dir / built.name
    tmp = cache_dir / (built.name + ".tmp")
    shutil.move(str(built), tmp)
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    (cache_dir / (built.name + ".sha256")).write_text(digest + "\n")
    os.replace(tmp, dst)
    shutil.rmtree(built.parent, ignore_errors=True)
    return dst


def cached_wheel(cache_dir: Path) -> Optional[Path]:
    """The cached wheel if present; a damaged one is an error rather than a silent rebuild."""
    wheels = sorted(cache_dir.glob("*.whl")) if cache_dir.is_dir() else []
    if not wheels:
        return None
    whl = wheels[0]
    side = cache_dir / (whl.name + ".sha256")
    ok = side.is_file() and hashlib.sha256(whl.read_bytes()).hexdigest() == side.read_text().strip()
    if ok:
        try:
            with zipfile.ZipFile(whl) as zf:
                ok = zf.testzip() is None
        except zipfile.BadZipFile:
            ok = False
    if not ok:
        raise KvtoolError(f"cached runtime wheel is corrupt: {whl} (delete it or rerun with --rebuild)", code=1)
    return whl


def install_wheel(whl: Path, echo: Echo) -> None:
    echo(f"[kvtool] installing {whl.name}")
    res = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--force-reinstall", "-q", str(whl)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise KvtoolError("pip could not install the runtime wheel: " + res.stderr.strip().splitlines()[-1], code=1)
    # llama-cpp-python's own runtime dependencies (not kvtool's business to pin, but they must be present)
    for mod, req in (("diskcache", "diskcache>=5.6.1"), ("jinja2", "jinja2>=2.11.3"),
                     ("typing_extensions", "typing-extensions>=4.5.0")):
        if importlib.util.find_spec(mod) is None:
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", req], check=False)


def loaded_patch_hash() -> Optional[str]:
    """Ask a fresh interpreter which patch hash the installed libllama reports (None if stock)."""
    code = ("import json,sys\n"
            "from toolchain.runtime.library import runtime_info\n"
            "print(json.dumps(runtime_info()))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(REPO_ROOT))
    if res.returncode != 0:
        return None
    info = json.loads(res.stdout.strip().splitlines()[-1])
    return info.get("patch_hash") if info.get("runtime_patched") else None


@contextlib.contextmanager
def build_lock(key: str, echo: Echo):
    """One build-runtime at a time per cache and backend: a backend's source tree and CMake build dir are shared, and
    two concurrent builds (two checkouts, two shells) would corrupt each other. The second one waits. Other backends
    have their own trees, so a long CUDA compile does not hold up a CPU rebuild."""
    cache_root().mkdir(parents=True, exist_ok=True)
    lock = cache_root() / f"build-{key}.lock"
    with open(lock, "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            echo(f"[kvtool] another build-runtime holds {lock}; waiting for it")
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def build_runtime(backend: str = "cpu", portable: bool = False, jobs: Optional[int] = None,
                  sdist: Optional[str] = None, rebuild: bool = False, echo: Echo = print) -> dict:
    """Build (or reuse) and install the patched runtime; returns what was done."""
    if backend not in BACKEND_CMAKE_ARGS:
        raise KvtoolError(f"unknown backend {backend!r} (choose from {', '.join(BACKEND_CMAKE_ARGS)})")
    sdist_path = check_sdist(Path(sdist)) if sdist else None
    with build_lock(build_key(backend, portable), echo):
        return _build_runtime_locked(backend, portable, jobs, sdist_path, rebuild, echo)


def _build_runtime_locked(backend: str, portable: bool, jobs: Optional[int], sdist_path: Optional[Path],
                          rebuild: bool, echo: Echo) -> dict:
    t0 = time.time()
    phash = patch_hash()
    inst = installed_build()
    if (not rebuild and inst and inst.get("patch_hash") == phash and inst.get("backend") == backend
            and bool(inst.get("portable")) == portable):
        echo(f"[kvtool] runtime is up to date (patch hash {phash}, backend {build_key(backend, portable)})")
        return {"action": "none", "patch_hash": phash, "seconds": time.time() - t0}
    cache_root().mkdir(parents=True, exist_ok=True)
    wdir = wheel_cache_dir(phash, backend, portable)
    whl = None if rebuild else cached_wheel(wdir)
    action = "cached"
    if whl is None:
        action = "built"
        ensure_build_requirements(echo)
        sdist_path = sdist_path or fetch_sdist(echo)
        tree = prepare_tree(sdist_path, phash, backend, portable, echo)
        if rebuild and wdir.exists():
            shutil.rmtree(wdir)
        whl = store_wheel(build_wheel(tree, backend, portable, jobs or os.cpu_count() or 1, phash, echo), wdir)
    else:
        echo(f"[kvtool] using cached wheel {whl}")
    install_wheel(whl, echo)
    got = loaded_patch_hash()
    if got != phash:
        raise KvtoolError(f"installed runtime reports patch hash {got}, expected {phash}", code=1)
    echo(f"[kvtool] runtime installed: patch hash {phash}, backend {build_key(backend, portable)} "
         f"({time.time() - t0:.0f} s)")
    return {"action": action, "patch_hash": phash, "wheel": str(whl), "seconds": time.time() - t0}
