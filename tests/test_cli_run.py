"""``kvtool generate`` and ``kvtool chat`` as a user runs them (subprocesses: real exit codes, stdout/stderr).

The verbs are started as ``python -m toolchain.commands.<verb>``, which mounts them under the real ``kvtool``
group and its one-line error handling (the lead registers them in cli.py).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from helpers_runtime import write_windows

pytestmark = pytest.mark.usefixtures("patched_runtime")

N_CTX = "1024"


@pytest.fixture(scope="module")
def masked(smollm2, tmp_path_factory):
    return write_windows(smollm2, tmp_path_factory.mktemp("cli") / "smol-w64.gguf", [[0, 64, 64]] * 30, 16)


def kvtool(verb: str, *args, input: str | None = None, env_extra: dict | None = None, timeout: int = 300):
    """Run a verb with one thread: the suite must not depend on having the cores to itself (two llama.cpp threads
    on a shared 2-core box wait on each other and decode collapses). test_model_api checks the default."""
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", f"toolchain.commands.{verb}", *map(str, args), "-t", "1"],
                          input=input,
                          capture_output=True, text=True, timeout=timeout, env=env)


def one_line_error(res, code: int = 2) -> str:
    assert res.returncode == code, (res.returncode, res.stdout, res.stderr)
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("kvtool: error: "), res.stderr
    assert "Traceback" not in res.stderr
    return lines[0]


# ---------------------------------------------------------------------------------------------- generate
def test_generate_streams_text_and_a_status_line(masked):
    res = kvtool("generate", masked, "-p", "The capital of France is", "--max-tokens", 8, "--n-ctx", N_CTX)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip()
    status = res.stderr.strip().splitlines()[-1]
    assert "tok/s" in status and "KV" in status and "for a full cache" in status


def test_generate_json_fields(masked, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("The capital of France is")
    res = kvtool("generate", masked, "-f", prompt, "-n", 6, "--n-ctx", N_CTX, "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert isinstance(out["text"], str) and out["text"].strip()
    st, kv = out["stats"], out["kv"]
    assert st["prompt_tokens"] > 0 and 1 <= st["generated_tokens"] <= 6
    assert st["prefill_tok_s"] > 0 and st["decode_tok_s"] > 0
    assert kv["mixed"] is True and kv["allocated_bytes"] == kv["full_bytes"] + kv["ring_bytes"]
    assert kv["stock_bytes"] > kv["allocated_bytes"]
    # --no-mixed: the same file with a full cache, and the prompt from stdin
    res = kvtool("generate", masked, "-f", "-", "-n", 4, "--n-ctx", N_CTX, "--json", "--no-mixed",
                 input="The capital of France is")
    assert res.returncode == 0, res.stderr
    kv = json.loads(res.stdout)["kv"]
    assert kv["mixed"] is False and kv["allocated_bytes"] == kv["stock_bytes"]


def test_generate_bad_input_is_one_line(masked, tmp_path):
    line = one_line_error(kvtool("generate", tmp_path / "missing.gguf", "-p", "hi"))
    assert "no such file" in line
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"\x00" * 4096)
    one_line_error(kvtool("generate", junk, "-p", "hi"))
    cut = tmp_path / "cut.gguf"
    with open(masked, "rb") as f:
        cut.write_bytes(f.read(2_000_000))
    assert "truncated" in one_line_error(kvtool("generate", cut, "-p", "hi"))
    line = one_line_error(kvtool("generate", masked, "-p", "word " * 400, "--n-ctx", 256))
    assert "context holds 256" in line and "tokens" in line
    assert "exactly one of" in one_line_error(kvtool("generate", masked))
    # --debug shows the traceback
    res = kvtool("generate", tmp_path / "missing.gguf", "-p", "hi", "--debug")
    assert res.returncode != 0 and "Traceback" in res.stderr


def test_unknown_chat_template_is_one_line(tiny_gguf):
    assert "unknown chat template" in one_line_error(kvtool("generate", tiny_gguf, "-p", "hi", "--chat",
                                                            "--n-ctx", 256))
    assert "unknown chat template" in one_line_error(kvtool("chat", tiny_gguf, "--n-ctx", 256, input="hi\n"))


# ---------------------------------------------------------------------------------------------- chat
def test_chat_through_a_pipe(masked, tmp_path):
    script = "What is 2+2?\n/stats\n/system You answer in one word.\n/system\nName a color.\n/bogus\n/reset\n/exit\nnot read\n"
    res = kvtool("chat", masked, "--n-ctx", N_CTX, "-n", 8, "--temp", 0, input=script,
                 env_extra={"KVTOOL_CACHE": str(tmp_path)})
    assert res.returncode == 0, res.stderr
    out, err = res.stdout, res.stderr
    assert "kv           KV" in out and "live cells" in out and "last reply" in out  # /stats
    assert "system: 'You answer in one word.'" in out
    status = [x for x in err.splitlines() if x.startswith("[") and "tok/s" in x]
    assert len(status) == 2 and all("for a full cache" in s for s in status)
    assert "unknown command /bogus" in err and "[conversation cleared]" in err
    assert "\033[" not in out + err  # no colors when not a terminal
    assert not (tmp_path / "history").exists()  # history is for interactive sessions


def test_chat_reads_until_eof(masked):
    res = kvtool("chat", masked, "--n-ctx", N_CTX, "-n", 4, "--temp", 0, "--no-mixed", input="Hi\n")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip()
    assert "KV" in res.stderr and "full cache" in res.stderr


def test_chat_context_overflow_keeps_the_session(masked):
    res = kvtool("chat", masked, "--n-ctx", 256, "-n", 4, "--temp", 0, input="word " * 300 + "\n/stats\n")
    assert res.returncode == 0, res.stderr
    assert "context holds 256" in res.stderr and "/reset starts over" in res.stderr
    assert "turns        0" in res.stdout


@pytest.mark.skipif(sys.platform == "win32", reason="needs a pty")
def test_chat_ctrl_c_stops_the_reply_not_the_program(masked, tmp_path):
    import pty
    import re
    import select

    pid, fd = pty.fork()
    if pid == 0:  # child
        os.environ["KVTOOL_CACHE"] = str(tmp_path)
        os.execv(sys.executable, [sys.executable, "-m", "toolchain.commands.chat", str(masked), "--n-ctx", N_CTX,
                                  "-n", "900", "--temp", "0", "--hide-think", "-t", "1"])
    buf = b""

    def until(pattern: bytes, timeout: float = 120) -> bool:
        nonlocal buf
        end = time.time() + timeout
        while time.time() < end:
            if select.select([fd], [], [], 0.2)[0]:
                try:
                    buf += os.read(fd, 4096)
                except OSError:
                    return False
                if re.search(pattern, buf, re.S):
                    return True
        return False

    try:
        assert until(rb">>> "), buf
        os.write(fd, b"Write a very long story about a dragon.\r")
        assert until(rb"dragon\.\r?\n.*\w+ \w+ \w+"), buf  # the reply is streaming
        os.write(fd, b"\x03")
        assert until(rb"\(stopped\).*>>> "), buf  # status line says stopped, and the prompt is back
        os.write(fd, b"/stats\r")
        assert until(rb"finish=cancelled.*>>> "), buf
        os.write(fd, b"\x04")  # Ctrl-D quits
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, buf
        assert (tmp_path / "history").exists()  # readline history saved
        assert b"\x1b[1m>>> " in buf  # a terminal gets the bold prompt
    finally:
        try:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(fd)


# ---------------------------------------------------------------------------------------------- <think> display
def test_think_splitter_handles_tags_split_across_pieces():
    from toolchain.commands.chat import ThinkSplitter

    s = ThinkSplitter()
    out = []
    for piece in ["Hi <th", "ink>plan", " more</thi", "nk>answer <", "b>"]:
        out += s.feed(piece)
    out += s.flush()
    kinds = {}
    for kind, text in out:
        kinds[kind] = kinds.get(kind, "") + text
    assert kinds == {"text": "Hi answer <b>", "open": "<think>", "think": "plan more", "close": "</think>"}
    # a template whose generation prompt opens the block: the reply starts inside it
    s = ThinkSplitter(in_think=True)
    assert s.feed("reason</think>ok") == [("think", "reason"), ("close", "</think>"), ("text", "ok")]


def test_renderer_dims_or_hides_think():
    import io

    from toolchain.commands.chat import DIM, Renderer

    segs = [("text", "a"), ("open", "<think>"), ("think", "xyz"), ("close", "</think>"), ("text", "b")]

    def render(tty: bool, show: bool) -> str:
        buf = io.StringIO()
        r = Renderer(buf, tty, show)
        for k, t in segs:
            r.write(k, t)
        r.end()
        return buf.getvalue()

    assert render(False, True) == "a<think>xyz</think>b\n"
    assert render(False, False) == "ab\n"
    shown = render(True, True)
    assert DIM + "<think>" in shown and "xyz" in shown
    hidden = render(True, False)
    assert "xyz" not in hidden and "thought for 3 chars" in hidden


def test_generate_beacons_and_no_beacons(tiny_gguf, tmp_path):
    """A file with beacon keys generates through the beacon loop (the status line and --json show its live and peak
    cells); --no-beacons runs the same file without beacons or eviction."""
    from converters.gguf_budgets import T_U32, Value
    from toolchain.gguf_keys import K_BEACON_INTERVAL, K_BEACON_TOKEN

    path = write_windows(tiny_gguf, tmp_path / "tiny-beacons.gguf", [[0, 0], [0, 0], [0, 0]], 0, enabled=False,
                         extra={K_BEACON_TOKEN: Value(T_U32, 50), K_BEACON_INTERVAL: Value(T_U32, 8)})
    res = kvtool("generate", path, "-p", "the word", "-n", 40, "--n-ctx", 256, "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    b, st = out["kv"]["beacons"], out["stats"]
    n_prompt, n = st["prompt_tokens"], st["generated_tokens"]
    assert b["interval"] == 8 and b["token_id"] == 50 and n == 40
    assert b["beacons"] == 4 and b["evicted"] == 32
    assert b["positions"] == n_prompt + n + b["beacons"] - 1  # the last sampled token is never decoded
    assert b["live_cells"] == b["positions"] - b["evicted"] <= b["peak_live_cells"] <= n_prompt + n // 8 + 8 + 1
    res = kvtool("generate", path, "-p", "the word", "-n", 40, "--n-ctx", 256)
    assert res.returncode == 0, res.stderr
    assert "beacons every 8:" in res.stderr.strip().splitlines()[-1]
    res = kvtool("generate", path, "-p", "the word", "-n", 40, "--n-ctx", 256, "--json", "--no-beacons")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["kv"]["beacons"] is None
