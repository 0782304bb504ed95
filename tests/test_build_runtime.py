"""kvtool build-runtime: the patch series applies to a fresh sdist; bad input is one line, no compile."""
from __future__ import annotations

import hashlib
import subprocess

import pytest
from helpers_cli import SDIST, assert_one_line_error, kvtool, no_subprocess

from toolchain.cli import main
from toolchain.errors import KvtoolError
from toolchain.runtime import build
from toolchain.sdist import SDIST_VERSION

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
        monkeypatch.setattr(build, step, no_subprocess)  # tripwires: no download, compile or install
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
