"""`make check-cuda`: the installed CUDA runtime imports, is kvtool's patched build, and says cleanly how many CUDA
devices it sees ("no CUDA device" on a build machine without a GPU or driver).

Why through ggml's own registry (ctypes on libggml): that is what llama.cpp consults when it offloads, and it
works with or without a driver. One line per fact; exit 1 with a `check-cuda: error:` line on any failure.
"""
from __future__ import annotations

import ctypes
import sys
from pathlib import Path


def fail(msg: str) -> None:
    print(f"check-cuda: error: {msg}", file=sys.stderr)
    sys.exit(1)


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    try:
        import llama_cpp
        import llama_cpp.llama_cpp as lc
    except Exception as e:  # a missing libcublas/libcudart shows up here
        fail(f"llama_cpp does not import: {e}")
    from toolchain.runtime.build import patch_hash
    from toolchain.runtime.library import runtime_info

    info = runtime_info()
    if not info["runtime_patched"]:
        fail("the loaded libllama is not kvtool's patched build")
    if info["backend"] != "cuda":
        fail(f"the loaded runtime was built for {info['backend']}, not cuda")
    if info["patch_hash"] != patch_hash("cuda"):
        fail(f"runtime patch hash {info['patch_hash']} != this checkout's {patch_hash('cuda')}")
    print(f"check-cuda: llama_cpp {llama_cpp.__version__} imports; patched runtime {info['patch_hash']}, backend cuda")

    libdir = Path(lc.__file__).parent / "lib"
    ggml = ctypes.CDLL(str(libdir / "libggml.so"))
    ggml.ggml_backend_reg_by_name.restype = ctypes.c_void_p
    ggml.ggml_backend_reg_by_name.argtypes = [ctypes.c_char_p]
    ggml.ggml_backend_reg_dev_count.restype = ctypes.c_size_t
    ggml.ggml_backend_reg_dev_count.argtypes = [ctypes.c_void_p]
    reg = ggml.ggml_backend_reg_by_name(b"CUDA")
    if not reg:
        fail("libggml has no CUDA backend registered (was it built with GGML_CUDA?)")
    n = int(ggml.ggml_backend_reg_dev_count(reg))
    offload = bool(lc.llama_supports_gpu_offload())
    if n == 0:
        if offload:
            fail("no CUDA device, yet llama_supports_gpu_offload() is true")
        print("check-cuda: CUDA backend present; no CUDA device (llama.cpp will run on the CPU)")
    else:
        print(f"check-cuda: CUDA backend present; {n} CUDA device(s); GPU offload {'on' if offload else 'off'}")


if __name__ == "__main__":
    main()
