"""``kvtool eval``: accuracy vs KV memory on a task, or perplexity and KL(full || mixed) on a text.

A thin shell over ``toolchain.eval`` (``run_eval``, ``run_ppl``); see that module for what is measured and how.
"""
from __future__ import annotations

import json

import click

from ..console import echo_stderr
from ..errors import KvtoolError
from ..kv_variants import NAMES
from .offload_option import gpu_layers_option

_echo = echo_stderr
QUANT_VARIANTS = tuple(n for n in NAMES if "+" in n)  # stock+q8_0, stock+q4_0, mixed+q8_0, mixed+q4_0


@click.command("eval")
@click.argument("models", nargs=-1, type=click.Path())
@click.option("--task", default=None, help="Task spec: a reasoning-gym dataset (chain_sum, simple_equations, "
              "gsm_symbolic, ... with optional :key=value,...) or a local task (long_addition, cyclic_sum, passkey:ctx=N).")
@click.option("--n", "n", type=int, default=200, show_default=True, help="Problems per file/variant.")
@click.option("--seed", type=int, default=0, show_default=True, help="Dataset seed.")
@click.option("--max-tokens", type=int, default=512, show_default=True, help="Generation cap per problem.")
@click.option("--variants", default=None,
              help="Comma-separated: full (kvtool.kv.enabled=false, no beacons), mixed (=true), beacons (beacon loop, "
                   "every head full), mixed+beacons, auto (as the file says; default); stock+q8_0, stock+q4_0, "
                   "mixed+q8_0, mixed+q4_0 (that cache type for K and V, flash attention on; with --ppl each is "
                   "compared with the full load at --cache-type).")
@click.option("--out", "out", type=click.Path(dir_okay=False), default=None,
              help="Results JSON; per-problem records go to the .jsonl next to it (reruns resume from them).")
@click.option("--plot", "plot", type=click.Path(dir_okay=False), default=None,
              help="PNG: accuracy (95%% CI) vs allocated and peak live KV bytes.")
@click.option("--n-ctx", type=int, default=None, help="Context size (default: longest prompt + --max-tokens; "
              "512 for --ppl).")
@click.option("--ubatch", "n_ubatch", type=int, default=512, show_default=True,
              help="Micro-batch; also sizes the rings (pad256(W + S + ubatch) cells), so small models want it small.")
@click.option("--cache-type", default=None, help="KV cache type (default f16; f32 for --ppl).")
@click.option("--kv-budget", "kv_budget", default=None, metavar="SIZE",
              help="KV memory budget (e.g. 512MiB): each model runs at the smallest sparsity whose cache fits.")
@click.option("--threads", type=int, default=None, help="Default: physical cores.")
@gpu_layers_option()
@click.option("--ppl", "ppl", default=None, metavar="FILE.txt",
              help="Perplexity and KL(full||mixed) over this text instead of a task ('verne': "
                   "reasoning_gym/data/in_the_year_2889.txt).")
@click.option("--ppl-tokens", type=int, default=None, help="With --ppl: use only the first N tokens of the text.")
@click.option("--beacon-interval", default=None, metavar="C|auto",
              help="Beacon variants: run at interval C (one the file lists), or 'auto': --kv-budget then caps the "
                   "beacon loop's live KV.")
@click.option("--json", "as_json", is_flag=True, help="Print the result JSON instead of the Markdown table.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def eval_cmd(models, task, n, seed, max_tokens, variants, out, plot, n_ctx, n_ubatch, cache_type, kv_budget, threads,
             gpu_layers, ppl, ppl_tokens, beacon_interval, as_json, quiet):
    """Evaluate GGUF files (full vs mixed KV) on a verifiable task, or measure perplexity/KL with --ppl."""
    from .. import eval as ev
    from ..eval.records import check_writable

    if not models:
        raise KvtoolError("give at least one MODEL.gguf")
    vlist = [v.strip() for v in variants.split(",") if v.strip()] if variants else None
    if ppl is not None:
        if task is not None:
            raise KvtoolError("--ppl and --task are separate modes; give one")
        if kv_budget is not None:
            raise KvtoolError("--kv-budget applies to task evaluation, not --ppl")
        if plot is not None:
            raise KvtoolError("--plot applies to task evaluation, not --ppl")
        mixed = None
        quant = [v for v in (vlist or []) if "+" in v]
        if vlist:
            base = [v for v in vlist if "+" not in v]
            bad = [v for v in base if v not in ("full", "mixed", "auto")]
            bad += [v for v in quant if v not in QUANT_VARIANTS]
            if bad:
                raise KvtoolError(f"unknown variant {bad[0]!r} (choose from full, mixed, auto, "
                                  f"{', '.join(QUANT_VARIANTS)})")
            mixed = True if "mixed" in base else (False if base in (["full"], []) else None)
        out_p = check_writable(out, "output")
        results = []
        for m in models:
            results.append(ev.run_ppl(m, ppl, n_ctx=n_ctx or 512, max_tokens=ppl_tokens, n_ubatch=n_ubatch,
                                      cache_type=cache_type or "f32", threads=threads, mixed=mixed,
                                      progress=not quiet, echo=_echo, gpu_layers=gpu_layers, kv_variants=quant))
        if out_p is not None:
            from ..heads import write_atomic

            write_atomic(out_p, (json.dumps({"kvtool_ppl": 1, "results": results}, indent=1) + "\n").encode())
        click.echo(json.dumps(results, indent=1) if as_json else ev.ppl_markdown(results))
        return
    if task is None:
        raise KvtoolError("give --task NAME (or --ppl FILE.txt)")
    from ..runtime.beacon_interval import parse_interval
    from .inspect import parse_size

    beacon_interval = parse_interval(beacon_interval)
    budget = parse_size(kv_budget) if kv_budget is not None and beacon_interval == "auto" else None
    if ppl_tokens is not None:
        raise KvtoolError("--ppl-tokens goes with --ppl")
    res = ev.run_eval(models, task, n=n, seed=seed, variants=vlist, max_tokens=max_tokens, n_ctx=n_ctx,
                      n_ubatch=n_ubatch, cache_type=cache_type or "f16", threads=threads, out=out, plot=plot,
                      progress=not quiet, echo=_echo, gpu_layers=gpu_layers, kv_budget=kv_budget,
                      beacon_interval=beacon_interval, beacon_budget=budget)
    click.echo(json.dumps(res, indent=1) if as_json else ev.markdown(res["rows"]))
    if out:
        _echo(f"wrote {out} (records: {res['records']})" + (f" and {plot}" if plot else ""))
