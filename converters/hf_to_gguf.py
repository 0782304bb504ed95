"""Hugging Face directory -> GGUF with the llama.cpp converter pinned by the runtime (docs/architecture.md §1).

Why run the vendored ``convert_hf_to_gguf.py`` instead of our own: the tensor names, permutations and tokenizer
handling must match the libllama we link, and that script is the one written for it (llama.cpp 0c1e570 inside
llama-cpp-python 0.3.36). It runs in a subprocess with its own ``gguf-py`` first on the path, because the
``gguf`` release installed next to kvtool can be older or newer than the one the script was written against.
Types the script cannot emit (K-quants and friends) are made from an f16 intermediate with
``llama_model_quantize``, in a child process too, since a failed GGML assert aborts the whole process.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from toolchain.errors import KvtoolError
from toolchain.paths import cache_root
from toolchain.sdist import SDIST_TOP, SDIST_VERSION, fetch_sdist

# Architectures whose llama.cpp graph kvtool's mixed cache has been written for (config.json "architectures").
SUPPORTED_ARCHS = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    # sliding-window hybrids: budgets apply to their global layers (docs/semantics.md, "Sliding-window models")
    "Gemma3ForCausalLM": "gemma3",
    "GptOssForCausalLM": "gpt-oss",
}
# What convert_hf_to_gguf.py writes itself.
DIRECT_TYPES = ("f32", "f16", "bf16", "q8_0")
# What goes through llama_model_quantize (the ones that need no importance matrix).
QUANT_TYPES = ("q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m",
               "q5_k_s", "q5_k_m", "q6_k", "iq4_nl", "iq4_xs")
OUTTYPES = DIRECT_TYPES + QUANT_TYPES
# Members of the sdist the converter needs, relative to vendor/llama.cpp.
_MEMBERS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "models/templates/")

Echo = Callable[[str], None]


@dataclass(frozen=True)
class HFModel:
    path: Path
    arch: str          # config.json architectures[0]
    gguf_arch: str
    n_layer: int
    n_head_kv: int


def inspect_hf_dir(path: str | os.PathLike) -> HFModel:
    """Check a HF directory before anything slow runs: config, architecture, safetensors weights."""
    p = Path(path)
    cfg_path = p / "config.json"
    if not cfg_path.is_file():
        raise KvtoolError(f"{p}: not a Hugging Face model directory (no config.json)")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise KvtoolError(f"{cfg_path}: unreadable config ({e.__class__.__name__})") from None
    archs = cfg.get("architectures") if isinstance(cfg, dict) else None
    if not isinstance(archs, list) or not archs:
        raise KvtoolError(f"{cfg_path}: no 'architectures' entry")
    arch = archs[0]
    if arch not in SUPPORTED_ARCHS:
        raise KvtoolError(f"unsupported architecture {arch} (kvtool converts {', '.join(sorted(SUPPORTED_ARCHS))})")
    if not any(p.glob("*.safetensors")):
        raise KvtoolError(f"{p}: no *.safetensors weights (kvtool converts safetensors checkpoints only)")
    try:
        n_layer = int(cfg["num_hidden_layers"])
        n_head_kv = int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"])
    except (KeyError, TypeError, ValueError):
        raise KvtoolError(f"{cfg_path}: lacks num_hidden_layers / num_attention_heads") from None
    return HFModel(p, arch, SUPPORTED_ARCHS[arch], n_layer, n_head_kv)


def converter_dir(echo: Echo = lambda m: None) -> Path:
    """``~/.cache/kvtool/convert/<sdist version>/``: the converter script, its package and gguf-py, extracted once."""
    version = SDIST_VERSION
    dest = cache_root() / "convert" / version
    if (dest / ".complete").exists():
        return dest
    sdist = fetch_sdist(echo)
    echo(f"[kvtool] extracting convert_hf_to_gguf.py from {sdist.name}")
    prefix = f"{SDIST_TOP}/vendor/llama.cpp/"
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{version}.", dir=dest.parent))
    try:
        with tarfile.open(sdist) as tf:
            members = [m for m in tf.getmembers() if m.name.startswith(prefix) and
                       any(m.name[len(prefix):] == x or (x.endswith("/") and m.name[len(prefix):].startswith(x))
                           for x in _MEMBERS)]
            if not any(m.name == prefix + "convert_hf_to_gguf.py" for m in members):
                raise KvtoolError(f"{sdist} has no vendor/llama.cpp/convert_hf_to_gguf.py")
            try:
                tf.extractall(staging, members=members, filter="data")
            except TypeError:  # Python < 3.11.4 has no filter argument
                tf.extractall(staging, members=members)
        tree = staging / prefix
        (tree / ".complete").write_text(f"{sdist.name}\n")
        if dest.exists() and not (dest / ".complete").exists():
            shutil.rmtree(dest, ignore_errors=True)  # a stale, incomplete extraction
        try:
            os.replace(tree, dest)
        except OSError:
            if not (dest / ".complete").exists():  # not simply another process winning the race
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest


def _require_convert_deps() -> None:
    missing = [m for m in ("torch", "transformers", "safetensors") if importlib.util.find_spec(m) is None]
    if missing:
        raise KvtoolError(f"converting a Hugging Face directory needs {', '.join(missing)}: "
                          f"pip install 'kvtool[train]' (or pip install torch transformers safetensors)")


def _log_path(tag: str) -> Path:
    d = cache_root() / "logs"
    d.mkdir(parents=True, exist_ok=True)
    return d / f"{tag}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"


def _run_logged(cmd: list[str], env: dict, tag: str, what: str) -> None:
    log = _log_path(tag)
    with open(log, "w") as f:
        res = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    if res.returncode != 0:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
        last = lines[-1] if lines else f"exit code {res.returncode}"
        raise KvtoolError(f"{what} failed: {last[:300]} (log: {log})", code=1)
    log.unlink(missing_ok=True)  # keep logs of failures only


def run_hf_converter(model: HFModel, out: Path, outtype: str, echo: Echo) -> Path:
    """convert_hf_to_gguf.py MODEL --outfile OUT --outtype T, in a child with the vendored gguf-py first."""
    if outtype not in DIRECT_TYPES:
        raise KvtoolError(f"convert_hf_to_gguf.py writes {'|'.join(DIRECT_TYPES)}, not {outtype}")
    cdir = converter_dir(echo)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(cdir / "gguf-py"), str(cdir)] +
                                        ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.pop("NO_LOCAL_GGUF", None)
    env.setdefault("HF_HUB_OFFLINE", "1")  # a local directory needs no hub; never stall on the network
    cmd = [sys.executable, str(cdir / "convert_hf_to_gguf.py"), str(model.path), "--outfile", str(out),
           "--outtype", outtype]
    echo(f"[kvtool] convert_hf_to_gguf.py {model.path.name} ({model.arch}) -> {outtype}")
    _run_logged(cmd, env, "convert", "convert_hf_to_gguf.py")
    if not out.is_file():
        raise KvtoolError(f"convert_hf_to_gguf.py wrote no {out.name}", code=1)
    return out


def quantize(src: Path, dst: Path, outtype: str, echo: Echo) -> Path:
    """llama_model_quantize(src -> dst) at ``outtype``, in a child process (see module doc)."""
    if outtype not in QUANT_TYPES:
        raise KvtoolError(f"cannot quantize to {outtype} (choose from {'|'.join(QUANT_TYPES)})")
    if importlib.util.find_spec("llama_cpp") is None:
        raise KvtoolError("quantizing needs the kvtool runtime (llama_cpp): run kvtool build-runtime")
    echo(f"[kvtool] llama_model_quantize -> {outtype}")
    cmd = [sys.executable, "-m", "converters.hf_to_gguf", "--quantize", str(src), str(dst), outtype]
    _run_logged(cmd, dict(os.environ), "quantize", "llama_model_quantize")
    return dst


def _quantize_child(src: str, dst: str, outtype: str) -> int:
    import llama_cpp

    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{outtype.upper()}", None)
    if ftype is None:
        print(f"this llama_cpp has no LLAMA_FTYPE_MOSTLY_{outtype.upper()}", file=sys.stderr)
        return 2
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), llama_cpp.byref(params))
    if rc != 0:
        print(f"llama_model_quantize returned {rc}", file=sys.stderr)
    return 1 if rc != 0 else 0


def hf_to_gguf(model_dir: str | os.PathLike, out: str | os.PathLike, outtype: str = "f16",
               echo: Echo = lambda m: None) -> Path:
    """HF directory -> GGUF at ``out`` (written atomically). Caller adds kvtool keys afterwards."""
    if outtype not in OUTTYPES:
        raise KvtoolError(f"unknown --outtype {outtype} (choose from {'|'.join(OUTTYPES)})")
    model = inspect_hf_dir(model_dir)
    _require_convert_deps()
    out = Path(out)
    with tempfile.TemporaryDirectory(prefix=".kvtool-convert.", dir=out.parent) as tmp:
        t = Path(tmp)
        if outtype in DIRECT_TYPES:
            made = run_hf_converter(model, t / "model.gguf", outtype, echo)
        else:
            f16 = run_hf_converter(model, t / "model.f16.gguf", "f16", echo)
            made = quantize(f16, t / f"model.{outtype}.gguf", outtype, echo)
        os.replace(made, out)
    return out


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--quantize":
        sys.exit(_quantize_child(*sys.argv[2:]))
    print("usage: python -m converters.hf_to_gguf --quantize SRC DST TYPE", file=sys.stderr)
    sys.exit(2)
