"""``kvtool convert MODEL --mask heads.json``: a GGUF with the mask's budgets as kvtool keys (docs/architecture.md).

MODEL is a GGUF (metadata-only rewrite; tensors streamed byte for byte) or a Hugging Face directory (converted by
the pinned llama.cpp converter first). Flags override heads.json values, so one heads.json serves several runs.
``converters.convert.convert_model`` is the library entry; the click command is a shell around it.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import click

from converters.beacon_checkpoint import beacon_from_checkpoint, convert_checkpoint
from converters.convert import convert_model, default_output
from converters.hf_to_gguf import OUTTYPES

from ..errors import KvtoolError
from ..heads import HeadsMask, check_sink, check_sparsity, check_window


def resolve_mask(mask: HeadsMask, sparsity: Optional[float] = None, per_layer: Optional[bool] = None,
                 sink: Optional[int] = None, window: Optional[int] = None) -> HeadsMask:
    """heads.json values with CLI overrides applied; sparsity or per-layer changes re-derive the mask from scores."""
    if sparsity is not None or (per_layer is not None and per_layer != bool(mask.per_layer)):
        mask = mask.with_sparsity(check_sparsity(sparsity) if sparsity is not None else mask.sparsity, per_layer)
    if sink is not None:
        mask.sink = check_sink(sink)
    if window is not None:
        mask.window = check_window(window)
    return mask.validate()


@click.command("convert")
@click.argument("model", type=click.Path())
@click.option("--mask", "mask_path", type=click.Path(dir_okay=False), default=None,
              help="heads.json (optional only for a beacon checkpoint with kvtool.json)")
@click.option("--sparsity", "-s", type=float, default=None, help="Re-derive the mask from its scores at this sparsity.")
@click.option("--per-layer/--global", "per_layer", default=None,
              help="With scores: apply the rule inside each layer (or globally).")
@click.option("--sink", type=int, default=None, help="Sink positions S (default: heads.json, else 16).")
@click.option("--window", type=int, default=None, help="Window W of compressed heads (default: heads.json, else 64).")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Output GGUF (default: <stem>.kvtool.gguf next to MODEL).")
@click.option("--outtype", type=click.Choice(list(OUTTYPES), case_sensitive=False), default=None,
              help="For a Hugging Face directory: tensor type (default f16).")
@click.option("--beacon-token", type=int, default=None, help="Beacon token id (with --beacon-interval).")
@click.option("--beacon-interval", type=int, default=None, help="Beacon every C generated tokens.")
@click.option("--force", is_flag=True, help="Write budgets even where the runtime ignores them (MLA, recurrent and "
              "hybrid architectures; sliding-window layers).")
def convert(model, mask_path, sparsity, per_layer, sink, window, output, outtype, beacon_token, beacon_interval,
            force):
    """Write MODEL (GGUF or Hugging Face dir) with the head budgets of a heads.json as kvtool.* keys."""
    t0 = time.perf_counter()
    from ..validate import check_input_path, check_output_path

    # every input (the model file or every file of a checkpoint directory, the mask) is compared with -o by
    # inode, so no spelling, link or hard link of an input can be replaced by the output
    check_input_path(model)
    check_output_path(output or default_output(Path(model)), [model, mask_path])
    if Path(model).is_dir() and beacon_token is None and beacon_from_checkpoint(model) is not None:
        mask = resolve_mask(HeadsMask.load(mask_path), sparsity, per_layer, sink, window) if mask_path else None
        dst = convert_checkpoint(model, output or default_output(Path(model)), mask, outtype.lower() if outtype else None,
                                 echo=lambda m: click.echo(m, err=True))
        click.echo(f"wrote {dst}: beacon checkpoint in {time.perf_counter() - t0:.1f} s", err=True)
        return
    if mask_path is None:
        raise KvtoolError("--mask is required (unless MODEL is a beacon checkpoint with kvtool.json)")
    mask = resolve_mask(HeadsMask.load(mask_path), sparsity, per_layer, sink, window)
    dst = convert_model(model, mask, output, outtype.lower() if outtype else None, beacon_token, beacon_interval,
                        echo=lambda m: click.echo(m, err=True), force=force)
    n = mask.n_layer * mask.n_head_kv
    click.echo(f"wrote {dst}: {mask.n_compressed()} of {n} KV heads compressed (S={mask.sink}, W={mask.window}) "
               f"in {time.perf_counter() - t0:.1f} s", err=True)
