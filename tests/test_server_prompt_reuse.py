"""llama-server's prompt reuse on a mixed cache (found diagnosing issue 18's 8-client test).

A request whose prompt shares a prefix with what a slot holds makes llama-server cut the slot's sequence back to
that prefix (``llama_memory_seq_rm(slot, p0, -1)``). The mixed cache refuses the cut when a window ring no longer
holds the positions a query at ``p0`` must see: overwritten by a longer earlier request on the slot, or never
restored, because a sequence state (llama-server's RAM prompt cache moves them between slots) keeps only the cells
inside each window. Stock llama-server treats any refused cut as fatal (``GGML_ABORT`` in common's
``common_context_seq_rm``): the whole server died. Patch 0007 makes llama-server ask ``kvtool_can_seq_rm`` (the
same ring test, without side effects) before the cut and re-process the prompt when the answer is no, as upstream
does for SWA caches without a checkpoint. kvtool serve --parallel therefore leaves llama-server's prompt reuse on
for mixed files too, and a prompt that extends what a slot holds still reuses its prefix.
"""
from __future__ import annotations

import numpy as np
import pytest
from helpers_runtime import LowLevel
from helpers_serve import start_server, stop_server
from helpers_tools import tiny_mixed, tool_paths

from toolchain.runtime.library import can_seq_rm

httpx = pytest.importorskip("httpx")

PROMPT = "the point of water is"
LONG = 300  # more than the 256-cell ring of the windowed heads (window 32 + sink 4 + ubatch 64, padded to 256)


@pytest.fixture(scope="module")
def tiny(tiny_gguf, tmp_path_factory):
    return tiny_mixed(tiny_gguf, tmp_path_factory.mktemp("reuse") / "tiny-mixed.gguf")


def _asked_then_cut(ll, seq: int, p0: int) -> bool:
    """The cut, after asking whether it would be honoured: the answer must predict it and change nothing."""
    lc = ll.lc
    span = (lc.llama_memory_seq_pos_min(ll.mem, seq), lc.llama_memory_seq_pos_max(ll.mem, seq))
    asked = can_seq_rm(ll.ctx, seq, p0)
    assert (lc.llama_memory_seq_pos_min(ll.mem, seq), lc.llama_memory_seq_pos_max(ll.mem, seq)) == span
    done = lc.llama_memory_seq_rm(ll.mem, seq, p0, -1)
    assert asked == done, (seq, p0, asked, done)
    return done


@pytest.mark.usefixtures("patched_runtime")
def test_the_mixed_cache_refuses_a_cut_its_rings_cannot_honour(tiny):
    """The runtime half: honest refusals where stock succeeds (what llama-server then aborts on)."""
    toks = np.random.default_rng(0).integers(3, 100, 16).tolist()
    for mixed in (True, False):
        ll = LowLevel(tiny, n_ctx=2 * 512, n_ubatch=64, n_seq_max=2, cache="f16", flash_attn=True, mixed=mixed)
        try:
            ll.run(toks, seq=1)
            for p in range(16, 40):
                ll.decode([(5, p, 1)])
            assert ll.set_seq_state(ll.seq_state(1), 0) > 0  # what the RAM prompt cache does between slots
            assert _asked_then_cut(ll, 1, 15)  # the original still holds every ring cell
            assert _asked_then_cut(ll, 0, 15) is not mixed  # the restored copy only the windows
            assert _asked_then_cut(ll, 0, 0)  # clearing from 0 always works
            assert _asked_then_cut(ll, 1, -1)
            ll.run(toks, seq=1)
            for p in range(16, LONG):
                ll.decode([(5, p, 1)])
            assert _asked_then_cut(ll, 1, 15) is not mixed  # the ring wrapped over 4..14
            assert _asked_then_cut(ll, 1, LONG - 1)  # the last token only: every ring still holds what position LONG-1 sees
        finally:
            ll.close()


def test_the_front_leaves_prompt_reuse_to_the_client():
    from toolchain.commands.llama_server import server_args
    from toolchain.commands.serve_proxy import upstream_body

    assert upstream_body({"prompt": "a", "cache_prompt": True}, 8)["cache_prompt"] is True
    assert upstream_body({"prompt": "a", "cache_prompt": False}, 8)["cache_prompt"] is False
    assert "cache_prompt" not in upstream_body({"prompt": "a"}, 8)  # llama-server's default (on)
    assert "--cache-ram" not in server_args("srv", "m.gguf", "{sock}", 2, 512, 64, 1, "f16", False, None, "0", 0, "m")


def _long_then_reuse(post) -> tuple:
    a = post({"prompt": PROMPT, "max_tokens": LONG, "temperature": 0, "ignore_eos": True})
    b = post({"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": True})
    return a, b


def test_kvtool_serve_parallel_survives_a_reused_prompt_after_a_long_request(tiny, tmp_path):
    tool_paths()
    proc, base = start_server(tiny, tmp_path / "serve.log", "--parallel", 1, "--n-ctx", 512, "--n-ubatch", 64,
                       "--model-id", "tiny", "--server-log", tmp_path / "llama-server.log")
    try:
        def post(body):
            r = httpx.post(base + "/completions", json=body, timeout=120)
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["text"]

        a, b = _long_then_reuse(post)
        assert a.startswith(b) and len(b) > 0  # the same prompt alone, again: the same greedy start
        assert httpx.get(base[:-3] + "/health", timeout=30).json()["status"] == "ok"
        assert "cannot cut back" in (tmp_path / "llama-server.log").read_text()  # reuse was tried, then refused
    finally:
        stop_server(proc)


def test_plain_llama_server_survives_a_reused_prompt_after_a_long_request(tiny, tmp_path):
    """Prompt reuse on (llama-server's default): the refused cut becomes a full re-processing, not an abort."""
    from toolchain.commands.llama_server import LlamaServer, server_args

    tools = tool_paths()
    srv = LlamaServer(server_args(str(tools["llama-server"]), str(tiny), "{sock}", 1, 512, 64, 1, "f16", False, None,
                                  "0", 0, "tiny"), tmp_path / "server.log")
    srv.start(timeout=120)
    try:
        with httpx.Client(transport=httpx.HTTPTransport(uds=srv.sock), base_url="http://llama", timeout=120) as c:
            def post(body):
                r = c.post("/v1/completions", json=body)
                assert r.status_code == 200, r.text
                return r.json()["choices"][0]["text"]

            try:
                a, b = _long_then_reuse(post)
            except httpx.HTTPError as e:
                pytest.fail(f"llama-server died: {e!r}; its log ends: {srv.log_text()[-300:]}")
            assert a.startswith(b)
            assert "cannot cut back" in srv.log_text()  # the reuse was tried and refused, not skipped
            # a prompt that extends what the slot holds needs no cut the rings cannot back: the prefix is reused
            r = c.post("/v1/completions", json={"prompt": PROMPT + b + " and", "max_tokens": 4, "temperature": 0,
                                                "ignore_eos": True})
            assert r.status_code == 200, r.text
            assert r.json()["timings"]["cache_n"] > 0
            r = c.get("/health")
            assert r.status_code == 200 and r.json()["status"] == "ok"
    finally:
        srv.stop()
