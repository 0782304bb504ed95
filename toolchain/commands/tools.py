"""``kvtool tools``: where the patched llama.cpp programs are, and ``kvtool-llama-*`` launchers for the venv.

Why launchers and not copies in ``.venv/bin``: the binaries live once per patch hash in ``~/.cache/kvtool/tools``
(several worktrees share them), and a launcher that resolves the path at call time always runs the set that matches
the runtime this venv has installed, never a stale copy.
"""
from __future__ import annotations

import os
import sys

import click

from ..errors import KvtoolError


@click.group("tools", invoke_without_command=True)
@click.pass_context
def tools(ctx: click.Context) -> None:
    """Paths of llama-server, llama-cli, llama-bench, llama-perplexity, llama-batched-bench (patched build)."""
    if ctx.invoked_subcommand is None:
        from ..runtime.tools import tool_paths

        for name, path in tool_paths().items():
            click.echo(f"{name:22s} {path}")


@tools.command("path")
@click.argument("name")
def path_cmd(name: str) -> None:
    """Print one tool's path (NAME: llama-server or server, ...)."""
    from ..runtime.tools import tool_path

    click.echo(str(tool_path(name)))


@tools.command("run", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.argument("name")
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def run_cmd(name: str, args: tuple) -> None:
    """Run a tool with ARGS, e.g. ``kvtool tools run bench -m F.gguf -d 4096``."""
    _exec(name, list(args))


def _exec(name: str, args: list) -> None:
    from ..runtime.tools import tool_path

    exe = str(tool_path(name))
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execv(exe, [exe, *args])
    except OSError as e:
        raise KvtoolError(f"cannot run {exe}: {e.strerror}", code=1) from None


def _launcher(name: str):
    def main() -> None:
        try:
            _exec(name, sys.argv[1:])
        except KvtoolError as e:
            click.echo(f"kvtool: error: {e}", err=True)
            sys.exit(e.code)

    main.__name__ = name.replace("-", "_")
    return main


# console_scripts in pyproject.toml: kvtool-llama-server, kvtool-llama-cli, ...
llama_server = _launcher("llama-server")
llama_cli = _launcher("llama-cli")
llama_bench = _launcher("llama-bench")
llama_perplexity = _launcher("llama-perplexity")
llama_batched_bench = _launcher("llama-batched-bench")
