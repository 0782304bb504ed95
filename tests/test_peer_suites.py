"""llama.cpp's own tests on the patched tree (slow: a separate CMake build of vendor/llama.cpp with tests on).

test-llama-archs builds random models of every architecture and compares outputs across batch sizes;
test-save-load-state and test-recurrent-state-rollback use those models; test-batch-alloc and test-backend-ops
(CPU) cover the batch allocator and ggml ops; test-state-restore-fragmented runs on our budgeted SmolLM2, so
llama.cpp's own state test exercises the mixed cache."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("patched_runtime")]

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "peer_tests.sh"


def test_llama_cpp_peer_suites(smollm2_masked):
    res = subprocess.run(["bash", str(SCRIPT), str(smollm2_masked)], capture_output=True, text=True, timeout=3600)
    summary = [ln for ln in res.stdout.splitlines() if ln.startswith(("PASS", "FAIL"))]
    assert res.returncode == 0, "\n".join(summary) + res.stdout[-3000:] + res.stderr[-2000:]
    assert len(summary) == 11 and all(s.startswith("PASS") for s in summary), summary
