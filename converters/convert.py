"""``convert_model``: a model (GGUF or Hugging Face directory) -> a GGUF carrying a heads mask's budgets.

A GGUF gets a metadata-only rewrite (tensors streamed byte for byte); a Hugging Face directory is converted by the
pinned llama.cpp converter into a temporary GGUF next to the output first. Nothing is left behind on error or
interrupt: every output appears by ``os.replace`` of a finished file.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable, Optional

from toolchain.errors import KvtoolError
from toolchain.heads import HeadsMask, shape_error

from .gguf_budgets import apply_mask, model_shape, open_gguf
from .gguf_fields import model_fields
from .gguf_swa import budget_refusal, swa_info
from .hf_to_gguf import hf_to_gguf, inspect_hf_dir

Echo = Callable[[str], None]


def default_output(model: Path) -> Path:
    """``<stem>.kvtool.gguf`` next to the input (for a directory: next to it, named after it)."""
    model = Path(model)
    if model.is_dir():
        return model.resolve().parent / f"{model.resolve().name}.kvtool.gguf"
    name = model.name[:-5] if model.name.lower().endswith(".gguf") else model.name
    return model.parent / f"{name}.kvtool.gguf"


def check_output(dst: Path) -> None:
    """A KvtoolError unless ``dst`` can be a file in an existing directory (checked before anything slow runs)."""
    if dst.is_dir() or not dst.parent.is_dir():
        raise KvtoolError(f"cannot write {dst}: not a file path in an existing directory")


def via_hf_gguf(src: Path, dst: Path, outtype: Optional[str], echo: Echo, finish: Callable[[Path, Path], Path],
                prefix: str = ".kvtool-convert.") -> Path:
    """HF directory -> a temporary GGUF beside ``dst`` -> ``finish(tmp_gguf, dst)``; the temporary is always removed."""
    check_output(dst)
    with tempfile.TemporaryDirectory(prefix=prefix, dir=dst.parent) as tmp:
        base = hf_to_gguf(src, Path(tmp) / "base.gguf", outtype or "f16", echo)
        return finish(base, dst)


def check_budgets_used(gguf: Path, mask: HeadsMask, force: bool, echo: Echo) -> None:
    """Refuse budgets the runtime would ignore (issue 19): on an architecture whose memory cannot take them (MLA,
    recurrent, hybrid-recurrent), or on the sliding layers of an SWA hybrid. ``force`` writes them anyway."""
    with open_gguf(gguf) as h:
        f = model_fields(h, dims=False)
        swa = swa_info(h, f.arch, f.n_layer)
    if mask.n_compressed() == 0 or mask.n_layer != f.n_layer:
        return  # nothing to ignore, or a shape error apply_mask reports
    why = budget_refusal(f.arch)
    if why is None and swa.any:
        on_swa = sum(1 for il, row in enumerate(mask.full) if swa.is_swa[il] for full in row if not full)
        if on_swa:
            why = (f"{on_swa} of the mask's {mask.n_compressed()} compressed heads sit on sliding-window layers "
                   f"of {f.arch}, which keep the model's window {swa.n_swa} (budgets apply to the global layers "
                   f"{swa.global_layers()}); make the mask with `kvtool heads random MODEL.gguf`, which knows them")
    if why is None:
        return
    if not force:
        raise KvtoolError(f"{why}; refusing to write budgets the runtime would ignore (--force writes them anyway)")
    echo(f"kvtool: warning: {why}; writing them anyway (--force)")


def convert_model(model: str | Path, mask: HeadsMask, out: Optional[str | Path] = None,
                  outtype: Optional[str] = None, beacon_token: Optional[int] = None,
                  beacon_interval: Optional[int] = None, echo: Echo = lambda m: None,
                  beacon_intervals=None, force: bool = False) -> Path:
    """Write the converted model and return its path."""
    src = Path(model)
    if not src.exists():
        raise KvtoolError(f"{src}: no such file or directory")
    dst = Path(out) if out is not None else default_output(src)
    if (beacon_token is None) != (beacon_interval is None):
        raise KvtoolError("--beacon-token and --beacon-interval go together")
    if src.is_dir():
        hf = inspect_hf_dir(src)  # fails on an unsupported architecture before anything slow runs
        if (mask.n_layer, mask.n_head_kv) != (hf.n_layer, hf.n_head_kv):
            raise shape_error((mask.n_layer, mask.n_head_kv), (hf.n_layer, hf.n_head_kv))
        def finish(base: Path, d: Path) -> Path:
            check_budgets_used(base, mask, force, echo)
            return apply_mask(base, d, mask, beacon_token, beacon_interval,
                              beacon_intervals=beacon_intervals)

        return via_hf_gguf(src, dst, outtype, echo, finish)
    if outtype is not None:
        raise KvtoolError("--outtype applies to Hugging Face directories; a GGUF's tensors are copied unchanged")
    with open_gguf(src) as h:
        model_shape(h)  # a clear error for a bad file before the mask check
    check_budgets_used(src, mask, force, echo)
    return apply_mask(src, dst, mask, beacon_token, beacon_interval, beacon_intervals=beacon_intervals)
