"""The ``kvtool`` command line (click).

Each verb is a thin shell over a library function so that tests, the demo and users call the same code.
Errors a user can fix are ``KvtoolError``: one line on stderr, non-zero exit, no traceback unless ``--debug``.
"""
from __future__ import annotations

import json
import os
import sys

import click

from . import __version__
from .commands.offload_option import gpu_layers_option
from .console import echo_stderr
from .errors import KvtoolError

BACKENDS = ["cpu", "cuda", "metal", "vulkan"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="kvtool")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """kvtool: long reasoning on small machines with mixed per-head KV caches and beacons."""
    ctx.obj = {"debug": debug}


_echo = echo_stderr


@cli.command("build-runtime")
@click.option("--backend", default="cpu", show_default=True, help="cpu | cuda | metal | vulkan")
@click.option("--portable", is_flag=True, help="No -march=native (a wheel that runs on other CPUs).")
@click.option("--jobs", "-j", type=int, default=None, help="Parallel compile jobs (default: all cores).")
@click.option("--sdist", type=str, default=None, help="Use this llama-cpp-python 0.3.36 sdist instead of downloading.")
@click.option("--rebuild", is_flag=True, help="Ignore the installed build and the cached wheel.")
@click.option("--cuda-arch", type=str, default=None,
              help="CUDA compute capabilities, e.g. '75;86;87;89;90' (the default) or 'native'.")
@click.option("--export-source", type=str, default=None, metavar="ARCHIVE",
              help="Write a pruned, pre-patched source archive for --backend (.tar.gz) instead of building.")
@click.option("--tools", "with_tools", is_flag=True,
              help="Also build llama-server, llama-cli, llama-bench, llama-perplexity, llama-batched-bench (cached).")
def build_runtime_cmd(backend, portable, jobs, sdist, rebuild, cuda_arch, export_source, with_tools):
    """Build and install the patched llama-cpp-python (libllama with the mixed KV cache)."""
    from .runtime.build import build_runtime

    if jobs is not None and jobs < 1:
        raise KvtoolError(f"--jobs must be >= 1, got {jobs}")
    if export_source:
        from .runtime.export import export_source as export

        export(export_source, backend=backend, sdist=sdist, echo=_echo)
        return
    build_runtime(backend=backend, portable=portable, jobs=jobs, sdist=sdist, rebuild=rebuild, echo=_echo,
                  cuda_arch=cuda_arch)
    if with_tools:
        from .runtime.tools import build_tools

        build_tools(backend=backend, portable=portable, jobs=jobs, sdist=sdist, rebuild=rebuild, echo=_echo,
                    cuda_arch=cuda_arch)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def doctor(as_json):
    """Report versions, the patched runtime, its backend and devices (free/total memory), and optional extras."""
    from .commands.doctor import collect

    info = collect()
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    for k, v in info.items():
        if k == "devices":
            continue
        click.echo(f"{k:22s} {v}")
    devs = info["devices"]
    click.echo(f"{'devices':22s} {len(devs) if devs is not None else 'unknown (rebuild the runtime)'}")
    for d in devs or []:
        click.echo(f"  {d['name']:20s} {d['type']:5s} {d['free_bytes'] / 2**20:.0f} MiB free / "
                   f"{d['total_bytes'] / 2**20:.0f} MiB total  ({d['description']})")


@cli.command()
@click.argument("name", type=click.Choice(["smollm2", "gemma3-270m"]))
def fetch(name):
    """Fetch a demo model into ~/.cache/kvtool/models and print its path."""
    if name == "gemma3-270m":
        from .models_gemma3 import fetch_gemma3

        click.echo(str(fetch_gemma3(echo=_echo)))
        return
    from .models import fetch_smollm2

    click.echo(str(fetch_smollm2(echo=_echo)))


@cli.command()
@click.argument("model", type=click.Path())
@click.option("--ctx", default="4096,16384", show_default=True, help="Comma-separated context sizes.")
@click.option("--variants", default="stock,mixed,mixed+q8_0", show_default=True)
@click.option("--prompt", default=2048, show_default=True, help="Prefill prompt length.")
@click.option("--decode", "n_decode", default=32, show_default=True, help="Decode steps per run.")
@click.option("--repeats", default=3, show_default=True, help="Runs per figure (the median is reported).")
@click.option("--ubatch", default=512, show_default=True)
@click.option("--threads", type=int, default=None, help="Default: physical cores.")
@gpu_layers_option()
@click.option("--json", "as_json", is_flag=True, help="Print rows as JSON.")
@click.option("--md", "md_out", type=click.Path(dir_okay=False), default=None, help="Also write the Markdown table here.")
@click.option("--plot", "plot_out", type=click.Path(dir_okay=False), default=None, help="PNG of decode tok/s and KV bytes vs context.")
def bench(model, ctx, variants, prompt, n_decode, repeats, ubatch, threads, gpu_layers, as_json, md_out, plot_out):
    """Same file, mixed KV off vs on (vs on + q8_0): KV bytes, prefill and decode tok/s."""
    from .commands import bench as b

    try:
        ctxs = [int(x) for x in ctx.split(",") if x.strip()]
    except ValueError:
        raise KvtoolError(f"--ctx must be comma-separated integers, got {ctx!r}") from None
    rows = b.run_bench(model, ctxs, [v.strip() for v in variants.split(",") if v.strip()], prompt, n_decode, repeats,
                       ubatch, threads, echo=_echo, gpu_layers=gpu_layers)
    table = b.markdown(rows)
    if md_out:
        from .heads import write_atomic

        write_atomic(md_out, (table + "\n").encode())
    if plot_out:
        b.plot(rows, plot_out)
    click.echo(json.dumps(b.rows_json(rows), indent=1) if as_json else table)


def _register() -> None:
    """Verbs that live in their own modules (toolchain/commands/)."""
    import importlib

    for mod, attr in (("heads", "heads"), ("convert", "convert"), ("inspect", "inspect_cmd"), ("inspect", "plan_cmd"),
                      ("train", "train"), ("generate", "command"), ("chat", "command"), ("serve", "command"),
                      ("eval", "eval_cmd"), ("tools", "tools")):
        cli.add_command(getattr(importlib.import_module(f"toolchain.commands.{mod}"), attr))


_register()


def _stdout_failed() -> None:
    """Point fd 1 at /dev/null so the interpreter's final flush cannot fail a second time."""
    try:
        fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, sys.stdout.fileno())
        os.close(fd)
    except (OSError, ValueError, AttributeError):
        pass


def _os_error_line(e: OSError) -> str:
    where = f"{e.filename}: " if e.filename else "writing output failed: "
    where = where if len(where) <= 240 else where[:110] + "..." + where[-110:]
    return f"kvtool: error: {where}{e.strerror or e}"


def main(argv=None) -> None:
    from .atomic import Terminated, install_termination_handlers

    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    install_termination_handlers()  # SIGTERM/SIGHUP unwind like Ctrl-C: temp files are removed
    try:
        rv = cli.main(args=argv, prog_name="kvtool", standalone_mode=False)
        sys.stdout.flush()  # a full disk or /dev/full under stdout is an error here, not a silent cut
    except KvtoolError as e:
        if debug:
            raise
        click.echo(f"kvtool: error: {e}", err=True)
        sys.exit(e.code)
    except click.exceptions.Abort:
        click.echo("kvtool: aborted", err=True)
        sys.exit(130)
    except click.UsageError as e:
        if debug:
            raise
        # one line, like every other kvtool error
        where = f" ({e.ctx.command_path})" if e.ctx else ""
        click.echo(f"kvtool: error: {e.format_message()}{where}", err=True)
        sys.exit(2)
    except click.ClickException as e:
        click.echo(f"kvtool: error: {e.format_message()}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("kvtool: interrupted", err=True)
        sys.exit(130)
    except Terminated as e:
        click.echo(f"kvtool: {e}", err=True)
        sys.exit(128 + e.signum)
    # last resort: whatever slipped past the specific checks is still one line, never a traceback
    except RecursionError:
        if debug:
            raise
        click.echo("kvtool: error: input nested too deeply", err=True)
        sys.exit(2)
    except MemoryError:
        if debug:
            raise
        click.echo("kvtool: error: out of memory", err=True)
        sys.exit(1)
    except OSError as e:
        if debug:
            raise
        if not e.filename:
            _stdout_failed()
        click.echo(_os_error_line(e), err=True)
        sys.exit(1)
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":
    main()
