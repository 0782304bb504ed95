"""``kvtool serve`` end to end with the real ``openai`` client, plus its queueing rules on a fake model.

The server runs as ``python -m toolchain.commands.serve MODEL --port 0`` in a subprocess (the lead mounts the verb
in cli.py); the port it got is read from its "listening on" line.
"""
from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest
from helpers_runtime import write_windows
from helpers_serve import start_server, stop_server

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")


@pytest.fixture(scope="module")
def masked(smollm2, tmp_path_factory):
    return write_windows(smollm2, tmp_path_factory.mktemp("serve") / "smol-w64.gguf", [[0, 64, 64]] * 30, 16)


@pytest.fixture(scope="module")
def server(masked, patched_runtime, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve-log") / "serve.log"
    # -ngl all on the CPU build: the server warns once and serves from the CPU (test_models_and_health)
    proc, base = start_server(masked, log, "--n-ctx", 1024, "--model-id", "smol-masked", "-ngl", "all")
    yield {"proc": proc, "base": base, "log": log}
    stop_server(proc)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server["base"], api_key="unused", timeout=300, max_retries=0)


MSG = [{"role": "user", "content": "Name a fruit."}]


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["smol-masked"]
    h = httpx.get(server["base"][:-3] + "/health").json()
    assert h["status"] == "ok" and h["busy"] is False
    kv = httpx.get(server["base"] + "/kv", timeout=60).json()
    assert kv["mixed"] is True and kv["allocated_bytes"] < kv["stock_bytes"]
    assert {(b["group"], b["device"]) for b in kv["buffers"]} == {("full", "CPU"), ("ring", "CPU")}
    assert sum(b["bytes"] for b in kv["buffers"]) == kv["allocated_bytes"] and kv["gpu_layers"] == 0
    warnings = [x for x in server["log"].read_text().splitlines() if x.startswith("kvtool: warning:")]
    assert len(warnings) == 1 and "running on the CPU" in warnings[0]


def test_chat_completion_non_streamed(client):
    r = client.chat.completions.create(model="smol-masked", messages=MSG, max_tokens=8, temperature=0)
    c = r.choices[0]
    assert c.message.role == "assistant" and c.message.content.strip()
    assert c.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 0 and 1 <= r.usage.completion_tokens <= 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_completion_streamed(client):
    chunks = list(client.chat.completions.create(model="smol-masked", messages=MSG, max_tokens=8, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text.strip()
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].usage is not None and 1 <= chunks[-1].usage.completion_tokens <= 8


def test_completions_both_ways(client):
    r = client.completions.create(model="smol-masked", prompt="The capital of France is", max_tokens=6,
                                  temperature=0)
    assert r.choices[0].text.strip() and r.usage.completion_tokens <= 6
    pieces = [ch.choices[0].text for ch in client.completions.create(
        model="smol-masked", prompt="The capital of France is", max_tokens=6, temperature=0, stream=True)]
    assert "".join(pieces).strip()


def test_concurrent_requests_queue_and_all_succeed(server, client):
    results, errors = {}, []

    def run(i: int) -> None:
        try:
            msgs = [{"role": "user", "content": f"Say the number {i}."}]
            if i % 2:
                s = client.chat.completions.create(model="m", messages=msgs, max_tokens=6, temperature=0, stream=True)
                results[i] = "".join(ch.choices[0].delta.content or "" for ch in s if ch.choices)
            else:
                r = client.chat.completions.create(model="m", messages=msgs, max_tokens=6, temperature=0)
                results[i] = r.choices[0].message.content
        except Exception as e:  # collected, so a failure names the request
            errors.append((i, repr(e)))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    assert set(results) == {0, 1} and all(v.strip() for v in results.values())
    assert httpx.get(server["base"][:-3] + "/health").json()["busy"] is False


def test_bad_requests_are_400_and_the_server_lives(server, client):
    with pytest.raises(openai.BadRequestError, match="context holds 1024"):
        client.completions.create(model="m", prompt="word " * 1500, max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="context holds 1024"):
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "word " * 1500}],
                                       max_tokens=4, stream=True)
    with pytest.raises(openai.BadRequestError, match="n=1"):
        client.chat.completions.create(model="m", messages=MSG, max_tokens=4, n=2)
    r = httpx.post(server["base"] + "/chat/completions", content=b"{not json", timeout=30)
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = httpx.post(server["base"] + "/chat/completions", json={"messages": []}, timeout=30)
    assert r.status_code == 400
    assert client.completions.create(model="m", prompt="Hi", max_tokens=2, temperature=0).choices[0].text is not None


def test_client_gone_mid_stream_frees_the_model(server, client):
    with httpx.stream("POST", server["base"] + "/completions", timeout=120,
                      json={"prompt": "Once upon a time", "max_tokens": 600, "temperature": 0, "stream": True}) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 4:
                break
    t0 = time.time()
    r = client.completions.create(model="m", prompt="Hi", max_tokens=2, temperature=0)
    assert r.choices[0].text is not None
    # 600 tokens would take far longer than this: the abandoned generation was stopped
    assert time.time() - t0 < 30


def test_port_in_use_is_one_line(server, masked):
    port = server["base"].rsplit(":", 1)[1].split("/")[0]
    res = subprocess.run([sys.executable, "-m", "toolchain.commands.serve", str(masked), "--port", port],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "already in use" in lines[0] and port in lines[0], res.stderr


def test_missing_model_is_one_line(tmp_path):
    res = subprocess.run([sys.executable, "-m", "toolchain.commands.serve", str(tmp_path / "nope.gguf"), "--port",
                          "0"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stderr.strip().startswith("kvtool: error:") and "no such file" in res.stderr
    assert "Traceback" not in res.stderr


# ---------------------------------------------------------------------------------------------- queue rules (fake)
class FakeModel:
    """Stands in for Model: slow pieces, honours stop(); records how many generations overlap."""

    name = "fake"

    def __init__(self):
        self.last_stats = None
        self._stop = False
        self.active = self.max_active = 0

    def stop(self):
        self._stop = True

    def kv_stats(self):
        return {}

    def _gen(self, n):
        from toolchain.runtime.model import GenStats

        self._stop = False
        st = self.last_stats = GenStats(prompt_tokens=3)
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            for i in range(n):
                if self._stop:
                    st.finish_reason = "cancelled"
                    return
                time.sleep(0.05)
                st.generated_tokens += 1
                yield f"w{i} "
            st.finish_reason = "length"
        finally:
            self.active -= 1

    def chat(self, messages, stream=False, max_tokens=8, **kw):
        it = self._gen(max_tokens)
        return it if stream else "".join(it)

    def generate(self, prompt, stream=False, max_tokens=8, **kw):
        return self.chat([{"role": "user", "content": prompt}], stream, max_tokens)


@pytest.fixture()
def fake_server():
    import uvicorn

    from toolchain.commands.serve import bind_socket, make_app

    fake = FakeModel()
    sock = bind_socket("127.0.0.1", 0)
    srv = uvicorn.Server(uvicorn.Config(make_app(fake, max_queue=1), log_level="warning"))
    th = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    th.start()
    base = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    for _ in range(100):
        try:
            httpx.get(base[:-3] + "/health", timeout=1)
            break
        except httpx.HTTPError:
            time.sleep(0.05)
    yield fake, base
    srv.should_exit = True
    th.join(10)
    sock.close()


def test_queue_is_bounded_and_generations_never_overlap(fake_server):
    fake, base = fake_server
    codes = []

    def post():
        r = httpx.post(base + "/chat/completions", timeout=30,
                       json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 10})
        codes.append(r.status_code)

    threads = [threading.Thread(target=post) for _ in range(4)]
    for t in threads:
        t.start()
        time.sleep(0.05)
    for t in threads:
        t.join(30)
    assert fake.max_active == 1
    assert codes.count(200) >= 2 and codes.count(503) >= 1 and set(codes) <= {200, 503}


def test_fake_disconnect_stops_generation(fake_server):
    fake, base = fake_server
    with httpx.stream("POST", base + "/completions", timeout=30,
                      json={"prompt": "x", "max_tokens": 400, "stream": True}) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 3:
                break
    t0 = time.time()
    r = httpx.post(base + "/completions", json={"prompt": "y", "max_tokens": 2}, timeout=30)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "w0 w1 "
    assert time.time() - t0 < 5  # 400 pieces would take 20 s
