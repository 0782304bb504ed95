"""``kvtool generate MODEL -p TEXT | -f FILE``: one-shot completion, streamed to stdout; ``--json`` for scripts.

Also holds what ``chat`` and ``serve`` share: the load options, byte formatting, the status line, and
``run_standalone`` (``python -m toolchain.commands.<verb>`` with the CLI's one-line error handling).
"""
from __future__ import annotations

import json
import sys
from typing import Optional

import click

from ..errors import KvtoolError
from ..fmt import fmt_bytes
from ..gguf_keys import CACHE_TYPES
from .offload_option import gpu_layers_option


class _NCtx(click.ParamType):
    """--n-ctx: tokens, or ``auto`` (with --kv-budget: the largest context that fits)."""

    name = "N|auto"

    def convert(self, value, param, ctx):
        if isinstance(value, int) or value == "auto":
            return value
        try:
            return int(value)
        except (TypeError, ValueError):
            raise KvtoolError(f"--n-ctx must be an integer or 'auto', got {value!r}") from None


def kv_budget_option(f):
    return click.option("--kv-budget", "kv_budget", default=None, metavar="SIZE",
                        help="KV memory budget (e.g. 2GiB): the smallest sparsity whose cache fits --n-ctx, or with "
                             "--n-ctx auto the largest context (needs kvtool.heads.scores to change the sparsity).")(f)


def load_options(f):
    """Options every command that loads a model takes (same names and defaults everywhere)."""
    opts = [
        click.option("--n-ctx", "n_ctx", type=_NCtx(), default=4096, show_default=True,
                     help="Context size in tokens ('auto' with --kv-budget)."),
        kv_budget_option,
        click.option("--n-ubatch", type=int, default=512, show_default=True,
                     help="Micro-batch; rings hold window + sink + n_ubatch cells, so smaller saves memory."),
        click.option("--threads", "-t", type=int, default=None, help="CPU threads (default: physical cores)."),
        click.option("--cache-type", type=click.Choice(list(CACHE_TYPES)), default="f16", show_default=True,
                     help="KV cache type (quantized types need flash attention)."),
        click.option("--no-mixed", is_flag=True, help="Ignore the file's budgets: a full KV cache, for comparison."),
        click.option("--no-beacons", is_flag=True,
                     help="Ignore the file's beacon keys: no beacons, no eviction (A/B against the beacon loop)."),
        click.option("--flash-attn/--no-flash-attn", "flash_attn", default=None,
                     help="Default: on when the file has budgets (without it V rows are padded)."),
        click.option("--swa-full", is_flag=True,
                     help="Sliding-window models (Gemma 2/3, gpt-oss): keep every position in the SWA layers too. "
                          "Costs memory; lets a new prompt reuse a long cached prefix (docs/memory.md)."),
        gpu_layers_option(),
        *beacon_options(),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def beacon_options() -> list:
    """``--beacon-interval C|auto``. Its value goes to the click context (``ctx.meta``), so the commands that take
    ``load_options`` pass it on through :func:`load_model` without a parameter of their own. With ``auto`` the
    same ``--kv-budget`` caps the beacon loop's live KV instead of choosing a sparsity."""

    def keep(ctx, param, value):
        ctx.meta["kvtool.beacon_interval"] = value
        return value

    return [
        click.option("--beacon-interval", "beacon_interval", default=None, metavar="C|auto", expose_value=False,
                     callback=keep,
                     help="Beacon files: run at interval C (one the file lists), or 'auto': start at the smallest and "
                          "switch to a larger one when the live KV would pass --kv-budget."),
    ]


def beacon_interval_setting() -> Optional[str]:
    """The ``--beacon-interval`` value of the running command (None outside one)."""
    ctx = click.get_current_context(silent=True)
    return (ctx.meta if ctx is not None else {}).get("kvtool.beacon_interval")


def load_model(model: str, n_ctx: int, n_ubatch: int, threads: Optional[int], cache_type: str, no_mixed: bool,
               flash_attn: Optional[bool], seed: int = 0, no_beacons: bool = False, gpu_layers=None,
               kv_budget: Optional[str] = None, swa_full: bool = False):
    from ..runtime.model import Model
    from ..validate import parse_size

    c = beacon_interval_setting()
    budget = parse_size(kv_budget) if c == "auto" and kv_budget is not None else None
    return Model.load(model, n_ctx=n_ctx, n_threads=threads, n_ubatch=n_ubatch, cache_type=cache_type,
                      mixed=False if no_mixed else None, flash_attn=flash_attn, seed=seed,
                      beacons=False if no_beacons else None, n_gpu_layers=gpu_layers, beacon_interval=c,
                      beacon_budget=budget, kv_budget=None if c == "auto" else kv_budget, swa_full=swa_full)


def fmt_rate(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.1f}"


def kv_where(kv: dict) -> str:
    """``on CPU``, or ``on Vulkan0 12.0 MiB + CPU 2.1 MiB`` when layers are split: from the measured buffers."""
    per: dict[str, int] = {}
    for b in kv.get("buffers") or []:
        per[b["device"]] = per.get(b["device"], 0) + b["bytes"]
    if not per:
        return ""
    if len(per) == 1:
        return f" on {next(iter(per))}"
    return " on " + " + ".join(f"{d} {fmt_bytes(n)}" for d, n in sorted(per.items(), key=lambda x: -x[1]))


def kv_summary(kv: dict) -> str:
    """``KV 18.8 MiB allocated (mixed) on CPU vs 22.5 MiB for a full cache (83%)``."""
    mode = "mixed" if kv["mixed"] else "full cache"
    s = f"KV {fmt_bytes(kv['allocated_bytes'])} allocated ({mode}){kv_where(kv)}"
    if kv["mixed"] and kv["stock_bytes"]:
        s += f" vs {fmt_bytes(kv['stock_bytes'])} for a full cache ({100 * kv['allocated_bytes'] / kv['stock_bytes']:.0f}%)"
    b = kv.get("beacons")
    if b:
        s += (f" · beacons every {b['interval']}: {b['live_cells']} live cells (peak {b['peak_live_cells']}) "
              f"for {b['positions']} positions")
        if b.get("adaptive"):
            s += f" · auto interval within {b['budget_cells']} cells ({len(b.get('switches') or [])} switches)"
    return s


def status_line(stats, kv: dict) -> str:
    """One line after a reply: tokens, speeds, context use, KV allocated vs the full-cache equivalent."""
    st = stats.as_dict()
    extra = " (stopped)" if st["finish_reason"] == "cancelled" else ""
    return (f"[{st['generated_tokens']} tokens{extra} · {fmt_rate(st['decode_tok_s'])} tok/s · prefill "
            f"{st['prompt_eval_tokens']} tok at {fmt_rate(st['prefill_tok_s'])} tok/s · ctx "
            f"{kv['context_tokens']}/{kv['n_ctx']} · {kv_summary(kv)}]")


def read_prompt(prompt: Optional[str], file: Optional[str]) -> str:
    if (prompt is None) == (file is None):
        raise KvtoolError("give exactly one of -p TEXT or -f FILE")
    if prompt is not None:
        return prompt
    from ..validate import check_input_path, decode_text

    if file == "-":
        buf = getattr(sys.stdin, "buffer", None)
        return sys.stdin.read() if buf is None else decode_text(buf.read(), "stdin")
    p = check_input_path(file)
    if not p.is_file():
        raise KvtoolError(f"{p}: not a regular file")
    try:
        return decode_text(p.read_bytes(), str(p))
    except OSError as e:
        raise KvtoolError(f"{p}: cannot read ({e.strerror or e})") from None


@click.command("generate")
@click.argument("model", type=click.Path())
@click.option("-p", "--prompt", type=str, default=None, help="Prompt text.")
@click.option("-f", "--file", "file", type=str, default=None, help="Read the prompt from FILE ('-' = stdin).")
@click.option("--chat", "as_chat", is_flag=True, help="Wrap the prompt as one user turn in the GGUF's chat template.")
@click.option("--system", type=str, default=None, help="With --chat: a system message.")
@click.option("-n", "--max-tokens", type=int, default=256, show_default=True, help="Tokens to generate at most.")
@click.option("--temp", type=float, default=0.0, show_default=True, help="Temperature (0 = greedy).")
@click.option("--top-p", type=float, default=0.95, show_default=True)
@click.option("--top-k", type=int, default=40, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--stop", "stops", multiple=True, help="Stop string (repeatable).")
@load_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object: text, stats, KV bytes.")
def command(model, prompt, file, as_chat, system, max_tokens, temp, top_p, top_k, seed, stops, n_ctx, n_ubatch,
            threads, cache_type, kv_budget, no_mixed, no_beacons, flash_attn, gpu_layers, as_json, swa_full=False):
    """Complete a prompt once (streams to stdout; stats to stderr)."""
    text = read_prompt(prompt, file)
    if system is not None and not as_chat:
        raise KvtoolError("--system needs --chat")
    if max_tokens < 0:
        raise KvtoolError(f"--max-tokens must be >= 0, got {max_tokens}")
    from ..validate import check_sampling

    check_sampling(temp, top_p, top_k, seed=seed, max_tokens=max_tokens)  # before the model loads
    m = load_model(model, n_ctx, n_ubatch, threads, cache_type, no_mixed, flash_attn, seed, no_beacons, gpu_layers,
                   kv_budget, swa_full=swa_full)
    try:
        kw = dict(max_tokens=max_tokens, temperature=temp, top_p=top_p, top_k=top_k, seed=seed, stop=list(stops))
        if as_chat:
            msgs = ([{"role": "system", "content": system}] if system is not None else []) + \
                   [{"role": "user", "content": text}]
            run = lambda stream: m.chat(msgs, stream=stream, **kw)  # noqa: E731
        else:
            run = lambda stream: m.generate(text, stream=stream, **kw)  # noqa: E731
        if as_json:
            out = run(False)
            kv = m.kv_stats()
            click.echo(json.dumps({"model": str(m.path), "text": out, "stats": m.last_stats.as_dict(), "kv": kv},
                                  indent=2))
            return
        for piece in run(True):
            click.echo(piece, nl=False)
            sys.stdout.flush()
        click.echo("")
        click.echo(status_line(m.last_stats, m.kv_stats()), err=True)
    finally:
        m.close()


def run_standalone(cmd: click.Command, name: str, argv=None) -> None:
    """``python -m toolchain.commands.<verb> ...``: the verb under the real ``kvtool`` group and error handling."""
    from ..cli import cli, main

    argv = list(sys.argv[1:] if argv is None else argv)
    pre = ["--debug"] if "--debug" in argv else []
    argv = [a for a in argv if a != "--debug"]
    if name not in cli.commands:
        cli.add_command(cmd, name)
    main(pre + [name] + argv)


if __name__ == "__main__":
    run_standalone(command, "generate")
