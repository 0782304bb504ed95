"""kvtool bench runs end to end on a tiny budgeted model and reports what the runtime allocated (not a timing test:
the figures are only checked for sanity; speed claims live in docs/benchmarks.md)."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from helpers_runtime import write_windows

from toolchain.cli import cli
from toolchain.errors import KvtoolError

pytestmark = pytest.mark.usefixtures("patched_runtime")


def test_bench_cli_json(tiny_gguf, tmp_path):
    path = write_windows(tiny_gguf, tmp_path / "m.gguf", [[16, 0]] * 3, 4)
    res = CliRunner().invoke(cli, ["bench", str(path), "--ctx", "512", "--prompt", "64", "--decode", "4",
                                   "--repeats", "2", "--variants", "stock,mixed", "--ubatch", "32", "--json"])
    assert res.exit_code == 0, res.output
    rows = {r["variant"]: r for r in json.loads(res.stdout)}
    assert rows["mixed"]["kv_bytes"] < rows["stock"]["kv_bytes"]
    assert rows["mixed"]["ring_bytes"] > 0 and rows["stock"]["ring_bytes"] == 0
    for r in rows.values():
        assert len(r["decode_runs"]) == 2 and r["decode_tps"] > 0 and r["prefill_tps"] > 0


def test_bench_refuses_file_without_budgets(tiny_gguf):
    res = CliRunner().invoke(cli, ["bench", str(tiny_gguf), "--ctx", "512", "--prompt", "32", "--decode", "2",
                                   "--repeats", "1", "--variants", "stock,mixed"])
    assert res.exit_code != 0
    assert isinstance(res.exception, KvtoolError), repr(res.exception)
    assert "has no kvtool budgets (mixed mode did not activate)" in str(res.exception)


def test_bench_reports_each_phase_as_it_is_measured(tiny_gguf, tmp_path, monkeypatch):
    """On a slow backend (lavapipe) one context takes many minutes: the prefill runs are echoed before the fill
    starts and the decode runs right after they finish, with the same figures as the final rows. Every timed run
    and the fill end with a device synchronize (a GPU backend's decode only queues the work)."""
    from toolchain.commands import bench
    from toolchain.commands.bench import run_bench

    synced = []
    real = bench.synchronize
    monkeypatch.setattr(bench, "synchronize", lambda llm: (synced.append(llm), real(llm)))
    path = write_windows(tiny_gguf, tmp_path / "m.gguf", [[16, 0]] * 3, 4)
    lines = []
    rows = run_bench(str(path), [256], ["stock", "mixed"], prompt=32, n_decode=3, repeats=2, n_ubatch=32,
                     echo=lines.append)
    first_fill = next(i for i, m in enumerate(lines) if "filling" in m)
    for r in rows:
        pre = [i for i, m in enumerate(lines) if m.startswith(f"[bench] ctx 256 {r.variant}: prefill 32 tokens")]
        dec = [i for i, m in enumerate(lines) if m.startswith(f"[bench] ctx 256 {r.variant}: decode 3 steps")]
        assert len(pre) == 1 and pre[0] < first_fill, lines
        assert len(dec) == 1 and dec[0] > first_fill, lines
        assert lines[pre[0]].endswith("[" + ", ".join(f"{x:.2f}" for x in r.prefill_runs) + "]")
        assert lines[dec[0]].endswith("[" + ", ".join(f"{x:.2f}" for x in r.decode_runs) + "]")
    assert len(synced) == 2 * 2 + 2 + 2 * 2  # prefill runs + fills + decode runs, two variants, two repeats
