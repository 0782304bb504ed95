"""``kvtool serve --parallel N`` (the patched llama-server behind kvtool's validating front) with the real client.

On the session's tiny random F32 llama with one windowed head per layer, so a request takes milliseconds (chat on
SmolLM2, whose vocabulary can hold a chat template). Greedy answers are compared as token-exact text: a request
decoded alone and the same request decoded in a batch with seven others must agree. Each slot has its own KV stream,
so what the other slots hold cannot reach a sequence's logits (bit for bit, tests/test_parallel_isolation.py); the
batch's shape can, by rounding, in stock llama.cpp as much as here, so the prompts are ones whose greedy picks keep a
clear margin (``CLEAR_PROMPTS``).
"""
from __future__ import annotations

import re
import threading
import time

import pytest
from helpers_serve import start_server as start
from helpers_serve import stop_server as stop
from helpers_tools import tiny_mixed, tool_paths

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

PROMPTS = [f"the {w} of water is" for w in ("side", "number", "sound", "time", "way", "day", "word", "people")]


@pytest.fixture(scope="module")
def tiny(tiny_gguf, tmp_path_factory):
    tool_paths()
    return tiny_mixed(tiny_gguf, tmp_path_factory.mktemp("serve-par") / "tiny-mixed.gguf")


def _server(tiny, tmp_path_factory, parallel: int, n_ctx: int):
    d = tmp_path_factory.mktemp(f"serve-np{parallel}")
    proc, base = start(tiny, d / "serve.log", "--parallel", parallel, "--n-ctx", n_ctx, "--n-ubatch", 64,
                       "--model-id", "tiny", "--server-log", d / "llama-server.log")
    return {"proc": proc, "base": base, "root": base[:-3], "log": d / "serve.log", "slog": d / "llama-server.log"}


@pytest.fixture(scope="module")
def server4(tiny, tmp_path_factory):
    s = _server(tiny, tmp_path_factory, 4, 4096)
    yield s
    stop(s["proc"])


@pytest.fixture(scope="module")
def server8(tiny, tmp_path_factory):
    s = _server(tiny, tmp_path_factory, 8, 512)
    yield s
    stop(s["proc"])


def client_for(s):
    return openai.OpenAI(base_url=s["base"], api_key="unused", timeout=120, max_retries=0)


def complete(c, prompt: str, n: int = 12, **kw) -> str:
    r = c.completions.create(model="tiny", prompt=prompt, max_tokens=n, temperature=0, extra_body={"ignore_eos": True},
                             **kw)
    assert r.usage.completion_tokens == n
    return r.choices[0].text


def n_decode(s) -> float:
    text = httpx.get(s["root"] + "/metrics", timeout=30).text
    return float(re.search(r"^llamacpp:n_decode_total (\S+)$", text, re.M).group(1))


def test_models_health_and_mixed_kv(server4):
    c = client_for(server4)
    assert [m.id for m in c.models.list().data] == ["tiny"]
    h = httpx.get(server4["root"] + "/health", timeout=30).json()
    assert h["status"] == "ok" and h["engine"] == "llama-server"
    assert (h["parallel"], h["slots_idle"], h["busy"]) == (4, 4, False)
    kv = httpx.get(server4["base"] + "/kv", timeout=30).json()
    assert kv["mixed"] is True and kv["allocated_bytes"] < kv["stock_bytes"]
    assert abs(kv["allocated_bytes"] - kv["predicted_bytes"]) <= 0.006 * 2**20 * len(kv["buffers"])
    assert "KV" in server4["log"].read_text() and "mixed" in server4["log"].read_text()


@pytest.fixture(scope="module")
def smol_server(smollm2_masked, tmp_path_factory):
    """Chat on SmolLM2 (s=0.5): the tiny model's SentencePiece vocabulary cannot hold a chat template's text."""
    tool_paths()
    d = tmp_path_factory.mktemp("serve-smol")
    proc, base = start(smollm2_masked, d / "serve.log", "--parallel", 2, "--n-ctx", 512, "--model-id", "smol")
    yield {"proc": proc, "base": base}
    stop(proc)


def test_chat_streamed_and_not(smol_server):
    c = client_for(smol_server)
    msgs = [{"role": "user", "content": "Name a fruit."}]
    r = c.chat.completions.create(model="smol", messages=msgs, max_tokens=8, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content
    assert r.usage.completion_tokens == 8 and r.choices[0].finish_reason == "length"
    chunks = list(c.chat.completions.create(model="smol", messages=msgs, max_tokens=8, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == r.choices[0].message.content
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8


def test_completion_streamed_equals_non_streamed(server4):
    c = client_for(server4)
    text = complete(c, PROMPTS[0])
    pieces = [ch.choices[0].text for ch in c.completions.create(
        model="tiny", prompt=PROMPTS[0], max_tokens=12, temperature=0, stream=True, extra_body={"ignore_eos": True})]
    assert len(pieces) > 1 and "".join(pieces) == text


def test_bad_requests_are_4xx_json_and_the_server_lives(server4):
    c = client_for(server4)
    with pytest.raises(openai.BadRequestError, match="n=1"):
        c.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=4, n=2)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        c.completions.create(model="m", prompt="hi", max_tokens=4, temperature=7)
    r = httpx.post(server4["base"] + "/chat/completions", content=b"{not json", timeout=30)
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = httpx.post(server4["base"] + "/chat/completions", json={"messages": []}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(server4["base"] + "/completions", json={"prompt": "hi", "stream": "yes"}, timeout=30)
    assert r.status_code == 400 and "stream" in r.json()["error"]["message"]
    # too long for a slot (4096 tokens each): llama-server's own check, as a 400 with its message, streamed or not
    long = "water " * 6000
    for stream in (False, True):
        r = httpx.post(server4["base"] + "/completions", json={"prompt": long, "max_tokens": 4, "stream": stream},
                       timeout=120)
        assert r.status_code == 400, r.text
        assert "context" in r.json()["error"]["message"]
    assert complete(c, "hi", 2)


# Prompts whose lone greedy answers keep every top-1 pick at least GREEDY_MARGIN (in logits) above the runner-up on
# the session's tiny model. Batch shape changes ggml's CPU rounding, in stock llama.cpp as in the mixed cache (up to
# 1.2e-3 in logits here, tests/test_parallel_isolation.py), so a near-tied pick may flip between a lone and a batched
# decode; with this margin none can. The test checks the margin on llama-server's own logprobs first, so a changed
# model or kernel shows up as that, not as a flake.
CLEAR_PROMPTS = [f"the {w} of water is" for w in ("point", "place", "part", "river", "group", "number", "time", "work")]
GREEDY_MARGIN = 0.01


def lone_with_margins(s, prompt: str, n: int) -> tuple:
    """A lone greedy completion and the smallest top-1 minus top-2 logprob gap over its tokens (llama-server's
    pre-sampling probabilities: the softmax of the raw logits, so the gap is the logit gap)."""
    r = httpx.post(s["base"] + "/completions", timeout=120,
                   json={"prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True, "n_probs": 2})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    toks = choice["logprobs"]["content"]
    assert len(toks) == n
    gaps = [t["top_logprobs"][0]["logprob"] - t["top_logprobs"][1]["logprob"] for t in toks]
    assert all(t["id"] == t["top_logprobs"][0]["id"] for t in toks)  # greedy: the pick is the top-1
    return choice["text"], min(gaps)


def test_eight_concurrent_clients_get_their_own_greedy_answers(server8):
    c = client_for(server8)
    n = 48  # long enough that the eight requests overlap even when the threads start unevenly
    alone = []
    for p in CLEAR_PROMPTS:
        text, gap = lone_with_margins(server8, p, n)
        assert gap >= GREEDY_MARGIN, (p, gap)
        assert complete(c, p, n) == text  # the real client, alone, agrees with itself
        alone.append(text)
    assert len(set(alone)) == len(alone)  # different prompts, different answers: a swapped answer would show
    decodes0 = n_decode(server8)
    got, errors = {}, []
    barrier = threading.Barrier(len(CLEAR_PROMPTS))

    def run(i: int) -> None:
        try:
            barrier.wait(30)
            if i % 2:
                s = c.completions.create(model="tiny", prompt=CLEAR_PROMPTS[i], max_tokens=n, temperature=0,
                                         stream=True, extra_body={"ignore_eos": True})
                got[i] = "".join(ch.choices[0].text for ch in s)
            else:
                got[i] = complete(c, CLEAR_PROMPTS[i], n)
        except Exception as e:  # collected, so a failure names the request
            errors.append((i, repr(e)))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(CLEAR_PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert [got[i] for i in range(len(CLEAR_PROMPTS))] == alone
    # they really were decoded together: one at a time would take >= 8 x 48 llama_decode calls
    assert n_decode(server8) - decodes0 < 8 * n // 2


def test_a_disconnected_client_frees_its_slot(server4):
    c = client_for(server4)
    n = 3000
    with httpx.stream("POST", server4["base"] + "/completions", timeout=120,
                      json={"prompt": PROMPTS[1], "max_tokens": n, "temperature": 0, "stream": True,
                            "ignore_eos": True}) as r:
        assert r.status_code == 200
        got = 0
        for line in r.iter_lines():
            got += line.startswith("data: ")
            if got >= 3:
                break  # leaving the block closes the connection mid-stream
    end = time.time() + 30
    while time.time() < end:
        h = httpx.get(server4["root"] + "/health", timeout=30).json()
        if h["slots_idle"] == 4:
            break
        time.sleep(0.1)
    assert h["slots_idle"] == 4, h
    # llama-server's own account: the task was cancelled and its slot released long before max_tokens
    log = server4["slog"].read_text()
    assert "cancel task" in log
    released = [int(x) for x in re.findall(r"stop processing: n_tokens = (\d+)", log.split("cancel task")[-1])]
    assert released and released[0] < n, released
    assert complete(c, "hi", 2)
