"""The kvtool command line: every verb registered and documented, help, version, one-line errors."""
from __future__ import annotations

import click
import pytest
from click.testing import CliRunner
from helpers_cli import REPO, assert_one_line_error, kvtool

from toolchain.cli import cli


def _walk(group: click.Group, prefix=()):
    for name, cmd in sorted(group.commands.items()):
        yield prefix + (name,)
        if isinstance(cmd, click.Group):
            yield from _walk(cmd, prefix + (name,))


COMMANDS = list(_walk(cli))


# ---------------------------------------------------------------------------------------------- CLI


def test_foundation_commands_registered():
    names = {c[0] for c in COMMANDS}
    assert {"build-runtime", "doctor", "fetch"} <= names


@pytest.mark.parametrize("path", COMMANDS, ids=[" ".join(c) for c in COMMANDS])
def test_help_of_every_command(path):
    res = CliRunner().invoke(cli, [*path, "--help"])
    assert res.exit_code == 0, res.output
    assert "Usage:" in res.output


def test_console_script_help_and_version():
    res = kvtool("--help")
    assert res.returncode == 0, res.stderr
    for name in ("build-runtime", "doctor", "fetch"):
        assert name in res.stdout
    res = kvtool("--version")
    assert res.returncode == 0 and "kvtool" in res.stdout


def test_unknown_command_is_one_line_error():
    assert_one_line_error(kvtool("no-such-command"), code=2)


def _readme_rows():
    import re

    for line in (REPO / "README.md").read_text().splitlines():
        m = re.match(r"^\| `kvtool ([a-z][a-z0-9-]*)((?: [a-z][a-z0-9-]*)*)[ `].*\| *(built|not built yet) *\|$", line)
        if m:
            yield [m.group(1), *m.group(2).split()], m.group(3)


def test_readme_cli_table_matches_registration():
    """The README's CLI table says "built" exactly for the commands toolchain/cli.py registers."""
    rows = list(_readme_rows())
    assert len(rows) >= 10
    for words, status in rows:
        cmd, path = cli, []
        for w in words:  # follow group -> subcommand as far as the words name registered commands
            if isinstance(cmd, click.Group) and w in cmd.commands:
                cmd, path = cmd.commands[w], path + [w]
            else:
                break
        registered = bool(path) and not (isinstance(cmd, click.Group) and len(path) < len(words))
        shown = "kvtool " + " ".join(words)
        assert (status == "built") == registered, (
            f"README.md marks `{shown}` as {status!r} but it is {'' if registered else 'not '}registered in "
            f"toolchain/cli.py: update the README's CLI table")
    listed = {tuple(w[:2]) if len(w) > 1 and isinstance(cli.commands.get(w[0]), click.Group) else (w[0],)
              for w, _ in rows}
    for path in COMMANDS:
        if not isinstance(cli.commands.get(path[0]), click.Group) or len(path) > 1:
            assert tuple(path) in listed, f"`kvtool {' '.join(path)}` is registered but missing from README's CLI table"
