"""``kvtool serve MODEL``: an OpenAI-compatible HTTP server over one ``Model``.

Endpoints: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (streamed as server-sent events, or not),
``GET /v1/models``, ``GET /health``. A ``Model`` is single-threaded, so one worker thread runs every generation and
requests queue behind an asyncio lock; at most ``--max-queue`` may wait, later ones get HTTP 503 instead of
piling up. A client that disconnects mid-stream stops its generation, so it frees the queue.

It binds 127.0.0.1 by default. The socket is bound before the model loads, so a port in use is a one-line error.

``--parallel N`` serves N sequences at once over one mixed cache instead: kvtool starts the patched llama-server
(continuous batching, ``llama_server.py``) behind a validating front (``serve_proxy.py``); docs/running.md says why.
Without it this single-worker server runs in-process, needs no compiled tools, and can run the beacon loop.
"""
# no `from __future__ import annotations`: FastAPI reads the endpoint annotations (Request) at runtime

import asyncio
import errno
import json
import socket
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import click

from ..errors import KvtoolError
from .closing_stream import closing_stream_class
from .generate import kv_summary, load_model, load_options, run_standalone
from .request_checks import _BadRequest, chat_messages, json_body, prompt_text, sampling_args, stream_flags

_DONE = object()


def make_app(model, model_id: Optional[str] = None, max_queue: int = 16, default_max_tokens: int = 512):
    """The FastAPI app over ``model`` (tests build it directly too)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    _ClosingStream = closing_stream_class()

    model_id = model_id or model.name
    created = int(time.time())
    app = FastAPI(title="kvtool", version="1")
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvtool-model")
    lock = asyncio.Lock()
    waiting = {"n": 0}

    def error(status: int, message: str, kind: str = "invalid_request_error"):
        return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": None}},
                            status_code=status)

    def usage(st) -> dict:
        return {"prompt_tokens": st.prompt_tokens, "completion_tokens": st.generated_tokens,
                "total_tokens": st.prompt_tokens + st.generated_tokens}

    def finish(st) -> str:
        return "length" if st.finish_reason == "length" else "stop"

    async def acquire() -> None:
        """Wait for the model; at most ``max_queue`` requests wait, later ones get 503."""
        if lock.locked() and waiting["n"] >= max_queue:
            raise _BadRequest(f"server busy: {waiting['n']} requests already waiting (--max-queue {max_queue})",
                              503, "server_error")
        waiting["n"] += 1
        try:
            await lock.acquire()
        finally:
            waiting["n"] -= 1

    def on_model_thread(fn, release: bool):
        """Submit ``fn`` to the model thread. With ``release`` the lock is freed when ``fn`` has finished,
        not when the awaiting request goes away: a cancelled request must not let the next one overlap."""
        fut = asyncio.get_running_loop().run_in_executor(worker, fn)
        if release:
            fut.add_done_callback(lambda _: lock.release())
        return fut

    async def run_locked(fn):
        """Run ``fn`` on the model thread once the model is free."""
        await acquire()
        return await asyncio.shield(on_model_thread(fn, release=True))

    async def stream_response(fn_stream, make_chunk, make_final):
        """SSE response. ``fn_stream`` (template, tokens, context check) runs first, so bad input is an HTTP
        error; then the model thread produces pieces into a queue. The lock is held until the stream ends."""
        await acquire()
        loop = asyncio.get_running_loop()
        try:
            it = await asyncio.shield(on_model_thread(fn_stream, release=False))
        except BaseException:
            lock.release()
            raise
        q: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()

        def produce():
            try:
                for piece in it:
                    if cancel.is_set():
                        break
                    loop.call_soon_threadsafe(q.put_nowait, piece)
                loop.call_soon_threadsafe(q.put_nowait, _DONE)
            except BaseException as e:  # delivered to the response; never kills the worker
                loop.call_soon_threadsafe(q.put_nowait, e)
            finally:
                it.close()

        fut = on_model_thread(produce, release=True)

        def finish_stream() -> None:
            """End of the response (normal or client gone): stop the generation if it still runs. The lock
            is freed by ``fut`` itself; nothing here awaits, so a cancelled response task cannot skip it."""
            cancel.set()
            if not fut.done():
                model.stop()

        async def gen():
            try:
                while True:
                    item = await q.get()
                    if item is _DONE:
                        yield f"data: {json.dumps(make_final())}\n\n"
                        break
                    if isinstance(item, BaseException):
                        msg = str(item) if isinstance(item, KvtoolError) else f"internal error: {item!r}"
                        yield f"data: {json.dumps({'error': {'message': msg, 'type': 'server_error'}})}\n\n"
                        break
                    yield f"data: {json.dumps(make_chunk(item))}\n\n"
                yield "data: [DONE]\n\n"
            finally:  # normal end, or the client went away (the generator is closed)
                finish_stream()

        return _ClosingStream(gen(), finish_stream, media_type="text/event-stream",
                              headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.exception_handler(_BadRequest)
    async def _bad(request, exc: _BadRequest):
        return error(exc.status, str(exc), exc.kind)

    @app.exception_handler(KvtoolError)
    async def _kv(request, exc: KvtoolError):
        return error(400, str(exc))

    @app.exception_handler(Exception)
    async def _any(request, exc: Exception):
        return error(500, f"internal error: {exc!r}", "server_error")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_id, "waiting": waiting["n"], "busy": lock.locked()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created,
                                            "owned_by": "kvtool"}]}

    @app.get("/v1/kv")
    async def kv():
        return await run_locked(model.kv_stats)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await json_body(request)
        msgs = chat_messages(body)
        kw = sampling_args(body, default_max_tokens)
        cid, ts = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if stream_flags(body)[0]:
            def chunk(delta: dict, fin=None):
                return {"id": cid, "object": "chat.completion.chunk", "created": ts, "model": model_id,
                        "choices": [{"index": 0, "delta": delta, "finish_reason": fin}]}

            sent = {"role": False}

            def make_chunk(piece):
                d = {"content": piece}
                if not sent["role"]:
                    d["role"] = "assistant"
                    sent["role"] = True
                return chunk(d)

            def make_final():
                st = model.last_stats
                c = chunk({}, finish(st))
                if stream_flags(body)[1]:
                    c["usage"] = usage(st)
                return c

            return await stream_response(lambda: model.chat(msgs, stream=True, **kw), make_chunk, make_final)

        def run():
            text = model.chat(msgs, **kw)
            return text, model.last_stats

        text, st = await run_locked(run)
        return {"id": cid, "object": "chat.completion", "created": ts, "model": model_id,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": finish(st), "logprobs": None}],
                "usage": usage(st), "kvtool": {"stats": st.as_dict()}}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await json_body(request)
        prompt = prompt_text(body)
        kw = sampling_args(body, default_max_tokens)
        cid, ts = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(text: str, fin=None):
            return {"id": cid, "object": "text_completion", "created": ts, "model": model_id,
                    "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": fin}]}

        if stream_flags(body)[0]:
            def make_final():
                st = model.last_stats
                c = chunk("", finish(st))
                if stream_flags(body)[1]:
                    c["usage"] = usage(st)
                return c

            return await stream_response(lambda: model.generate(prompt, stream=True, **kw), chunk, make_final)

        def run():
            text = model.generate(prompt, **kw)
            return text, model.last_stats

        text, st = await run_locked(run)
        out = chunk(text, finish(st))
        out["usage"] = usage(st)
        out["kvtool"] = {"stats": st.as_dict()}
        return out

    app.state.worker = worker
    return app


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind now, so a port in use is reported before the model loads (and no other process can take it)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise KvtoolError(f"cannot resolve host {host!r}: {e.strerror}") from None
    fam, _, _, _, addr = infos[0]
    s = socket.socket(fam, socket.SOCK_STREAM)
    if sys.platform != "win32":
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(addr)
    except OSError as e:
        s.close()
        if e.errno == errno.EADDRINUSE:
            raise KvtoolError(f"port {port} on {host} is already in use: stop the other server or pass "
                              f"--port N") from None
        if e.errno == errno.EACCES:
            raise KvtoolError(f"no permission to bind {host}:{port} (ports below 1024 need privileges)") from None
        raise KvtoolError(f"cannot bind {host}:{port}: {e.strerror}") from None
    s.listen(128)
    s.set_inheritable(True)
    return s


@click.command("serve")
@click.argument("model", type=click.Path())
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (0.0.0.0 exposes it).")
@click.option("--port", type=int, default=8080, show_default=True, help="Port (0 = any free port).")
@click.option("--model-id", default=None, help="Model name reported by /v1/models (default: the file name).")
@click.option("--max-queue", type=int, default=16, show_default=True, help="Requests that may wait; more get 503.")
@click.option("-n", "--max-tokens", "default_max_tokens", type=int, default=512, show_default=True,
              help="Default max_tokens when a request gives none.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--parallel", "-np", type=int, default=None,
              help="Decode N sequences together through the patched llama-server (--n-ctx is then per sequence).")
@click.option("--server-log", type=click.Path(dir_okay=False), default=None,
              help="With --parallel: keep llama-server's log here (default: a temp file removed at exit).")
@load_options
def command(model, host, port, model_id, max_queue, default_max_tokens, seed, parallel, server_log, n_ctx, kv_budget,
            n_ubatch, threads, cache_type, no_mixed, no_beacons, flash_attn, gpu_layers, swa_full=False):
    """Serve MODEL over an OpenAI-compatible HTTP API (chat completions, completions, models)."""
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise KvtoolError(f"kvtool serve needs fastapi and uvicorn ({e.name} is missing): "
                          f"pip install 'kvtool[serve]'") from None
    if not 0 <= port <= 65535:
        raise KvtoolError(f"--port must be in 0..65535, got {port}")
    if max_queue < 0 or default_max_tokens < 1:
        raise KvtoolError("--max-queue must be >= 0 and --max-tokens >= 1")
    if parallel is not None and not 1 <= parallel <= 256:
        raise KvtoolError(f"--parallel must be in 1..256, got {parallel}")
    if server_log is not None and parallel is None:
        raise KvtoolError("--server-log applies to --parallel only")
    if kv_budget is not None and parallel is not None:
        raise KvtoolError("--kv-budget applies to the in-process server; with --parallel size the cache by --n-ctx "
                          "(kvtool plan MODEL --mem SIZE says what fits)")
    if n_ctx < 1 or n_ubatch < 1 or (threads is not None and threads < 1):
        raise KvtoolError("--n-ctx, --n-ubatch and --threads must be >= 1")
    sock = bind_socket(host, port)
    if parallel is not None:
        from .serve_proxy import run_parallel

        try:
            run_parallel(model, sock, parallel, model_id, default_max_tokens, seed, n_ctx, n_ubatch, threads,
                         cache_type, no_mixed, no_beacons, flash_attn, gpu_layers, server_log,
                         lambda m: click.echo(m, err=True))
        finally:
            sock.close()
        return
    try:
        m = load_model(model, n_ctx, n_ubatch, threads, cache_type, no_mixed, flash_attn, seed, no_beacons,
                       gpu_layers, kv_budget, swa_full=swa_full)
        app = make_app(m, model_id, max_queue, default_max_tokens)
        h, p = sock.getsockname()[:2]
        shown = f"[{h}]" if ":" in h else h
        click.echo(f"kvtool serve · {m.name} · {kv_summary(m.kv_stats())}", err=True)
        click.echo(f"listening on http://{shown}:{p}/v1 (Ctrl-C to stop)", err=True)
        config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=3)
        server = uvicorn.Server(config)
        server.run(sockets=[sock])
        app.state.worker.shutdown(wait=False, cancel_futures=True)
        m.close()
    finally:
        sock.close()


if __name__ == "__main__":
    run_standalone(command, "serve")
