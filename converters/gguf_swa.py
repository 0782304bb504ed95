"""Which layers of a GGUF use a sliding window, and which architectures' memory can take per-head budgets at all.

Why a Python copy of llama.cpp's per-architecture rules: ``inspect``/``plan`` predict the allocation without loading
the model, and ``convert`` must refuse budgets the runtime would ignore. llama.cpp reads
``{arch}.attention.sliding_window`` (the window) and ``{arch}.attention.sliding_window_pattern`` (an int period or a
bool per layer); without the pattern key each architecture has a built-in period (``load_swa_pattern(ml, n)`` in
its model file): layer ``il`` slides iff ``il % n < n - 1`` (``dense_first``: iff ``il % n != 0``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from toolchain.errors import KvtoolError

from .gguf_header import GGUFHeader

# architecture -> (built-in period, dense_first), as the vendored llama.cpp's model files set them
SWA_PATTERNS = {"gemma2": (2, False), "gemma3": (6, False), "gpt-oss": (2, False), "cohere2": (4, False)}

# architectures whose memory is not the plain or sliding-window KV cache (llama.cpp create_memory): MLA caches a
# compressed latent shared by all heads, recurrent layers keep a state instead of positions, hybrids mix the two
NO_BUDGETS = {
    **{a: "MLA attention caches one latent vector shared by all heads" for a in ("deepseek2", "minicpm3", "plm")},
    # llm_arch_is_recurrent
    **{a: "a recurrent model keeps a state per sequence, not per-head keys and values" for a in (
        "mamba", "mamba2", "rwkv6", "rwkv6qwen2", "rwkv7", "arwkv7")},
    # llm_arch_is_hybrid
    **{a: "a hybrid-recurrent model's attention layers live in a hybrid memory kvtool does not replace" for a in (
        "jamba", "falcon-h1", "plamo2", "granitehybrid", "lfm2", "lfm2moe", "nemotron_h", "nemotron_h_moe",
        "qwen3next", "kimi-linear", "bailingmoe3", "kimi-k3", "glm5-next", "qwen35", "qwen35moe", "qwen4exp",
        "deepseek4", "minimax-01")},
}


def budget_refusal(arch: str) -> Optional[str]:
    """``"<arch> cannot take per-head budgets: <why>"`` for an architecture whose memory ignores them, else None."""
    why = NO_BUDGETS.get(arch)
    return f"{arch} cannot take per-head budgets: {why}" if why else None


@dataclass(frozen=True)
class SWAInfo:
    n_swa: int                 # window of the sliding layers (0: the model has none)
    is_swa: tuple[bool, ...]   # per layer

    @property
    def any(self) -> bool:
        return self.n_swa > 0 and any(self.is_swa)

    def global_layers(self) -> list[int]:
        return [il for il, s in enumerate(self.is_swa) if not s]


def swa_info(h: GGUFHeader, arch: str, n_layer: int) -> SWAInfo:
    """The sliding-window layout llama.cpp will load for this header (``SWAInfo(0, all False)`` for none)."""
    none = SWAInfo(0, (False,) * n_layer)
    if arch not in SWA_PATTERNS:
        return none
    n_swa = h.value(f"{arch}.attention.sliding_window")
    if n_swa is None:
        return none
    if isinstance(n_swa, bool) or not isinstance(n_swa, int) or n_swa < 0:
        raise KvtoolError(f"{h.path}: {arch}.attention.sliding_window must be a non-negative integer")
    if n_swa == 0:
        return none
    period, dense_first = SWA_PATTERNS[arch]
    pat = h.value(f"{arch}.attention.sliding_window_pattern")
    if isinstance(pat, list):
        if len(pat) != n_layer or not all(isinstance(x, bool) for x in pat):
            raise KvtoolError(f"{h.path}: {arch}.attention.sliding_window_pattern must be {n_layer} booleans")
        return SWAInfo(n_swa, tuple(pat))
    if pat is not None:
        if isinstance(pat, bool) or not isinstance(pat, int) or pat < 0:
            raise KvtoolError(f"{h.path}: {arch}.attention.sliding_window_pattern must be an integer or booleans")
        period = pat
    if dense_first:
        flags = tuple(period == 0 or il % period != 0 for il in range(n_layer))
    else:
        flags = tuple(period == 0 or il % period < period - 1 for il in range(n_layer))
    return SWAInfo(n_swa, flags)


def swa_layers_of(model) -> Optional[list[bool]]:
    """Per-layer "slides" flags of a GGUF (llama.cpp's rule above) or a Hugging Face directory (config
    ``layer_types``); None when the model has no sliding layers."""
    from pathlib import Path

    from toolchain.swa_mask import swa_layers_of_config

    from .gguf_budgets import open_gguf
    from .gguf_fields import model_fields

    p = Path(model)
    if p.is_dir():
        import json

        try:
            cfg = json.loads((p / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return swa_layers_of_config(cfg) if isinstance(cfg, dict) else None
    with open_gguf(p) as h:
        f = model_fields(h, dims=False)
        info = swa_info(h, f.arch, f.n_layer)
    return list(info.is_swa) if info.any else None
