"""GPU build recipes without compiling anything (issue 15): backend-scoped patch series and their hashes, the Vulkan
compat patch on the real sdist, the CUDA arguments, the exported source archive, and the split-count parser.

The property that matters most: a backend-only patch never changes the CPU patch hash, because the CPU wheel in
~/.cache/kvtool is shared and keyed by it.
"""
from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import pytest

from toolchain.errors import KvtoolError
from toolchain.runtime import build, cuda, export
from toolchain.runtime.graph_splits import parse_splits
from toolchain.sdist import SDIST_FILE, SDIST_TOP, fetch_sdist

SDIST = Path.home() / ".cache" / "kvtool" / "sdist" / SDIST_FILE
VK_PATCH = "vulkan-0001-headers-without-layer-settings.patch"


@pytest.fixture()
def patches_copy(tmp_path, monkeypatch):
    d = tmp_path / "patches"
    shutil.copytree(build.patches_dir(), d)
    monkeypatch.setattr(build, "patches_dir", lambda: d)
    return d


def test_backend_series_does_not_touch_the_cpu_hash(patches_copy):
    cpu, vk = build.patch_hash("cpu"), build.patch_hash("vulkan")
    assert build.patch_hash() == cpu  # the default is the CPU hash
    assert vk != cpu and build.patch_hash("cuda") == cpu  # cuda has no series of its own
    (patches_copy / VK_PATCH).write_text((patches_copy / VK_PATCH).read_text() + "\n")
    assert build.patch_hash("cpu") == cpu and build.patch_hash("vulkan") != vk
    (patches_copy / "series-vulkan").unlink()  # without its series, vulkan hashes the common inputs only
    assert build.patch_hash("vulkan") == cpu
    (patches_copy / "0004-graph-mixed-attention.patch").write_text("changed")  # a common patch moves both
    assert build.patch_hash("cpu") != cpu


def test_backend_series_lists_existing_patches():
    names = [p.name for p in build.backend_patch_series("vulkan")]
    assert names == [VK_PATCH] and all(p.is_file() for p in build.backend_patch_series("vulkan"))
    assert build.backend_patch_series("cpu") == [] and build.backend_patch_series("cuda") == []


@pytest.fixture(scope="module")
def sdist_tree(tmp_path_factory):
    if not SDIST.exists():
        fetch_sdist(lambda m: None)
    return build.extract_sdist(SDIST, tmp_path_factory.mktemp("sdist"))


def test_vulkan_patch_applies_and_guards_only_the_layer_settings(sdist_tree):
    src = sdist_tree / "vendor/llama.cpp/ggml/src/ggml-vulkan/ggml-vulkan.cpp"
    before = src.read_text()
    build.apply_patches(sdist_tree, "vulkan")
    after = src.read_text()
    assert after.count("#ifdef VK_EXT_layer_settings") == 1
    guarded = after.split("#ifdef VK_EXT_layer_settings", 1)[1].split("#endif", 1)[0]
    assert "vk::LayerSettingEXT" in guarded and "vk::LayerSettingsCreateInfoEXT" in guarded
    assert "vk::LayerSettingEXT" not in after.replace(guarded, "")  # no other use left unguarded
    # nothing else in the file changed: removing the added lines gives the original back
    added = after.split("\n")
    orig = before.split("\n")
    assert len(added) - len(orig) == 6
    assert {ln for ln in added} - {ln for ln in orig} <= {
        "#ifdef VK_EXT_layer_settings", "#else", "#endif",
        "    // kvtool: Vulkan headers without VK_EXT_layer_settings (Debian 12 ships 1.3.239); the settings only matter for",
        "    // GGML_VULKAN_VALIDATE builds, so older headers create the instance without them.",
        "    vk::InstanceCreateInfo instance_create_info(vk::InstanceCreateFlags{}, &app_info, layers, extensions);"}


def test_cuda_arch_lists():
    assert cuda.parse_archs(cuda.DEFAULT_ARCHS) == ["75", "86", "87", "89", "90"]
    assert cuda.parse_archs("86,89") == ["86", "89"] and cuda.parse_archs("native") == ["native"]
    assert cuda.parse_archs("90a") == ["90a"]
    for bad in ("", "sm_86", "86;native", "8"):
        with pytest.raises(KvtoolError, match="bad --cuda-arch"):
            cuda.parse_archs(bad)
    assert build.wheel_key("cuda", False) == "cuda-sm75_86_87_89_90"
    assert build.wheel_key("cuda", False, "89") != build.wheel_key("cuda", False)  # the arch list keys the wheel
    assert build.wheel_key("vulkan", False) == "vulkan" and build.wheel_key("cpu", True) == "cpu-portable"


def test_cuda_arch_only_with_cuda(tmp_path, monkeypatch):
    monkeypatch.setenv("KVTOOL_CACHE", str(tmp_path))
    with pytest.raises(KvtoolError, match="--cuda-arch applies to --backend cuda only"):
        build.build_runtime(backend="vulkan", cuda_arch="86", echo=lambda m: None)
    with pytest.raises(KvtoolError, match="bad --cuda-arch"):
        build.build_runtime(backend="cuda", cuda_arch="x", echo=lambda m: None)
    assert not any(tmp_path.iterdir())  # refused before touching the cache


def _fake_toolkit(root: Path, with_cublas: bool) -> Path:
    (root / "bin").mkdir(parents=True)
    (root / "include").mkdir()
    (root / "lib64").mkdir()
    nvcc = root / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\necho 'Cuda compilation tools, release 13.0, V13.0.88'\n")
    nvcc.chmod(0o755)
    (root / "include" / "cuda_runtime.h").write_text("")
    if with_cublas:
        (root / "include" / "cublas_v2.h").write_text("")
        (root / "lib64" / "libcublas.so").write_text("")
        (root / "lib64" / "libcublasLt.so").write_text("")
    return root


def test_cuda_cmake_args_with_toolkit_cublas(tmp_path, monkeypatch):
    root = _fake_toolkit(tmp_path / "cuda", with_cublas=True)
    monkeypatch.setenv("CUDAToolkit_ROOT", str(root))
    args = cuda.cmake_args("75;86", lambda m: None)
    assert f"-DCUDAToolkit_ROOT={root}" in args and "-DCMAKE_CUDA_ARCHITECTURES=75;86" in args
    assert f"-DCUDA_cublas_LIBRARY={root / 'lib64' / 'libcublas.so'}" in args
    assert f"-DCMAKE_CUDA_FLAGS=-I{root / 'include'}" in args
    assert not any(" " in a for a in args)  # CMAKE_ARGS is split on whitespace
    assert "-DGGML_CUDA_NO_VMM=ON" in build.BACKEND_CMAKE_ARGS["cuda"]


def test_cuda_cublas_from_pypi_exposes_only_cublas(tmp_path, monkeypatch):
    """Without cuBLAS in the toolkit: only cublas*.h and libcublas*.so* from the nvidia-cublas wheel are exposed,
    never the wheel's other headers (they can clash with an older nvcc)."""
    import zipfile

    root = _fake_toolkit(tmp_path / "cuda", with_cublas=False)
    monkeypatch.setenv("CUDAToolkit_ROOT", str(root))
    monkeypatch.setenv("KVTOOL_CACHE", str(tmp_path / "cache"))
    dl = tmp_path / "cache" / "cuda" / "downloads"
    dl.mkdir(parents=True)
    with zipfile.ZipFile(dl / "nvidia_cublas-13.1.0-py3-none-manylinux_x86_64.whl", "w") as zf:
        for name in ("cublas_v2.h", "cublas_api.h", "cublasLt.h", "cuda_runtime_api.h", "crt/host_defines.h"):
            zf.writestr(f"nvidia/cu13/include/{name}", "//")
        for name in ("libcublas.so.13", "libcublasLt.so.13", "libnvblas.so.13"):
            zf.writestr(f"nvidia/cu13/lib/{name}", "ELF")
    monkeypatch.setattr(cuda.subprocess, "run", _pip_download_noop(cuda.subprocess.run))
    inc, lib, from_pypi = cuda.cublas_dirs(root, lambda m: None)
    assert from_pypi
    assert sorted(p.name for p in inc.iterdir()) == ["cublasLt.h", "cublas_api.h", "cublas_v2.h"]
    assert sorted(p.name for p in lib.iterdir()) == ["libcublas.so", "libcublas.so.13", "libcublasLt.so",
                                                    "libcublasLt.so.13"]
    assert (lib / "libcublas.so").resolve() == (lib / "libcublas.so.13").resolve()


def _pip_download_noop(real_run):
    """`pip download` finds the wheel already in the download dir; everything else (nvcc --version) runs."""
    import subprocess

    def run(cmd, *a, **kw):
        if "download" in cmd:
            return subprocess.CompletedProcess(cmd, 0, "", "")
        return real_run(cmd, *a, **kw)
    return run


def test_export_source_bad_paths(tmp_path):
    with pytest.raises(KvtoolError, match="wants a .tar.gz"):
        export.export_source(str(tmp_path / "x.zip"), backend="cuda", sdist=str(SDIST))
    with pytest.raises(KvtoolError, match="directory does not exist"):
        export.export_source(str(tmp_path / "no" / "x.tar.gz"), backend="cuda", sdist=str(SDIST))
    with pytest.raises(KvtoolError, match="unknown backend"):
        export.export_source(str(tmp_path / "x.tar.gz"), backend="rocm", sdist=str(SDIST))
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_export_source_cuda_archive(tmp_path, monkeypatch):
    """The archive bench/gpu_check.sh carries: pre-patched, pruned, under 60 MiB, with kvtool's CMake arguments."""
    monkeypatch.setenv("KVTOOL_CACHE", str(tmp_path / "cache"))
    if not SDIST.exists():
        fetch_sdist(lambda m: None)
    out = export.export_source(str(tmp_path / "src.tar.gz"), backend="cuda", sdist=str(SDIST), echo=lambda m: None)
    assert out.stat().st_size < export.MAX_BYTES
    top = SDIST_TOP
    with tarfile.open(out) as tf:
        names = set(tf.getnames())
        man = json.loads(tf.extractfile(f"{top}/{export.EXPORT_MANIFEST}").read())
        marker = json.loads(tf.extractfile(f"{top}/llama_cpp/{build.MARKER}").read())
        cml = tf.extractfile(f"{top}/vendor/llama.cpp/src/CMakeLists.txt").read().decode()
    assert man["patch_hash"] == marker["patch_hash"] == build.patch_hash("cuda") and man["backend"] == "cuda"
    assert "-DGGML_CUDA_NO_VMM=ON" in man["cmake_args"]
    assert "KVTOOL_SOURCES" in cml  # patched
    assert f"{top}/vendor/llama.cpp/src/kvtool/kvtool.cpp" in names
    assert f"{top}/vendor/llama.cpp/ggml/src/ggml-cuda/ggml-cuda.cu" in names
    assert f"{top}/vendor/llama.cpp/tests/test-backend-ops.cpp" in names
    assert not any(n.startswith(f"{top}/vendor/llama.cpp/models/") for n in names)
    assert not any(n.startswith(f"{top}/vendor/llama.cpp/ggml/src/ggml-vulkan/") for n in names)
    assert not any(n.startswith(f"{top}/.git/") for n in names)


def test_parse_splits():
    both = ("sched_reserve: graph (pp bs=512, tg bs=1): nodes = 1000 / 980, splits = 3 / 2, input objects = 5 / 5,"
            " input tensors = 9 / 9\n")
    same = "sched_reserve: graph: nodes = 1000, splits = 1, input objects = 5, input tensors = 9\n"
    assert parse_splits(both) == (3, 2)
    assert parse_splits(same) == (1, 1)
    assert parse_splits(both + same) == (1, 1)  # the last context created
    with pytest.raises(KvtoolError, match="no graph split count"):
        parse_splits("llama_context: n_ctx = 512\n")
