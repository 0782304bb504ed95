"""``kvtool heads``: make, import and look at heads.json masks (docs/architecture.md §1).

Thin shells over ``toolchain.heads`` so tests and users run the same code. Without ``-o`` the JSON goes to
stdout, which keeps the commands pipeable.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import click

from ..heads import DEFAULT_SINK, DEFAULT_WINDOW, HeadsMask, format_map, import_scores, plot_mask, random_mask


def _emit(mask: HeadsMask, out: Optional[str], inputs: tuple = ()) -> None:
    if out is None:
        click.echo(mask.to_json(), nl=False)
        return
    from ..validate import check_output_path

    check_output_path(out, inputs)  # by inode: no spelling or link of an input, no device or FIFO
    mask.save(out)
    click.echo(f"wrote {out}: {mask.n_compressed()} of {mask.n_layer * mask.n_head_kv} heads compressed", err=True)


@click.group("heads")
def heads() -> None:
    """Head masks (heads.json): import published scores, export them for RLKV or DuoAttention, make random
    baselines, show."""


@heads.command("import")
@click.argument("kind", type=click.Choice(["rlkv", "duo"]))
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--sparsity", "-s", type=float, required=True, help="Fraction of KV heads to compress, in [0, 1].")
@click.option("--per-layer", is_flag=True, help="Apply the rule inside each layer instead of globally.")
@click.option("--sink", type=int, default=DEFAULT_SINK, show_default=True, help="Sink positions kept by compressed heads.")
@click.option("--window", type=int, default=DEFAULT_WINDOW, show_default=True, help="Window of compressed heads.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None, help="heads.json to write (default: stdout).")
@click.option("--model", "model", type=click.Path(), default=None,
              help="GGUF or HF directory the scores belong to: on a sliding-window model, compress global heads only.")
def import_cmd(kind, file, sparsity, per_layer, sink, window, output, model):
    """Import RLKV adapter_weights.tsv or DuoAttention full_attention_heads.tsv scores."""
    mask = import_scores(kind, file, sparsity, per_layer, sink, window)
    if model is not None:
        mask = _global_only(mask, model)
    _emit(mask, output, (file,) + ((model,) if model else ()))


def _global_only(mask: HeadsMask, model: str) -> HeadsMask:
    """On a sliding-window model, keep budgets on global layers only, and say so (toolchain.swa_mask)."""
    from converters.gguf_swa import swa_layers_of

    from ..swa_mask import restrict_to_global

    mask, note = restrict_to_global(mask, swa_layers_of(model))
    if note:
        click.echo(f"kvtool: {note}", err=True)
    return mask


@heads.command("random")
@click.option("--model", "model", type=click.Path(), required=True,
              help="GGUF (or Hugging Face directory) whose shape to use.")
@click.option("--sparsity", "-s", type=float, required=True, help="Fraction of KV heads to compress, in [0, 1].")
@click.option("--seed", type=int, required=True, help="RNG seed (same seed, same mask).")
@click.option("--per-layer", is_flag=True, help="Apply the rule inside each layer instead of globally.")
@click.option("--sink", type=int, default=DEFAULT_SINK, show_default=True)
@click.option("--window", type=int, default=DEFAULT_WINDOW, show_default=True)
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None, help="heads.json to write (default: stdout).")
def random_cmd(model, sparsity, seed, per_layer, sink, window, output):
    """A random baseline mask with exactly the rule's number of compressed heads."""
    if Path(model).is_dir():
        from converters.hf_to_gguf import inspect_hf_dir

        hf = inspect_hf_dir(model)
        L, H, info = hf.n_layer, hf.n_head_kv, {"arch": hf.gguf_arch, "name": Path(model).resolve().name}
    else:
        from converters.gguf_budgets import model_shape, open_gguf

        with open_gguf(model) as h:
            shape = model_shape(h)
        L, H, info = shape.n_layer, shape.n_head_kv, {"arch": shape.arch}
        if shape.name:
            info["name"] = shape.name
    _emit(_global_only(random_mask(L, H, sparsity, seed, per_layer, sink, window, info), model), output, (model,))


@heads.command("show")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--plot", type=click.Path(dir_okay=False), default=None, help="Also write a heatmap PNG here.")
def show_cmd(file, plot):
    """Per-layer full/compressed counts and an L x H map (F = full, c = compressed)."""
    mask = HeadsMask.load(file)
    if plot is not None:
        from ..validate import check_output_path

        check_output_path(plot, [file], "plot")
        plot_mask(mask, plot)
    click.echo(format_map(mask))
    if plot is not None:
        click.echo(f"wrote {plot}", err=True)


@heads.command("export")
@click.argument("kind", type=click.Choice(["rlkv", "duo"]))
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False), required=True,
              help="Table to write (RLKV: adapter_weights.tsv, DuoAttention: full_attention_heads.tsv).")
@click.option("--scores", is_flag=True, help="Write the stored scores (clipped to [0, 1]) instead of the 0/1 mask.")
def export_cmd(kind, file, output, scores):
    """Write a heads.json as RLKV's adapter_weights.tsv or DuoAttention's full_attention_heads.tsv."""
    from ..heads_export import export_heads

    mask = HeadsMask.load(file)
    export_heads(kind, file, output, scores)
    what = "scores" if scores else "mask (1 = full, 0 = compressed)"
    click.echo(f"wrote {output}: {mask.n_layer}x{mask.n_head_kv} {kind} table, {what}; "
               f"{mask.n_compressed()} of {mask.n_layer * mask.n_head_kv} heads compressed", err=True)
