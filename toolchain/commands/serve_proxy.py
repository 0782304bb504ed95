"""``kvtool serve --parallel N``'s front: validates like the in-process server, then forwards to llama-server.

Why a thin validating proxy rather than exposing llama-server itself:
- kvtool's error contract holds: a malformed body, a bad number or an unsupported field is a 4xx JSON error in the
  OpenAI shape, checked by the same validators as the single-worker server (``serve.sampling_args``), before any
  stream starts. llama-server is lenient about several of these (it clamps or ignores them).
- kvtool's sampling defaults (temperature 0.7, max_tokens from ``-n``) apply whichever server runs.
- ``/health``, ``/v1/models`` and ``/v1/kv`` are kvtool's, so clients see one API; ``/slots`` and ``/metrics`` pass
  through for llama.cpp tooling.
The cost is one loopback hop per request and per streamed chunk (bytes are forwarded as they come, not re-encoded).
Errors llama-server finds itself (a prompt longer than a slot's context) keep their status and message, reshaped
into the same ``{"error": {...}}`` body.

A client that goes away closes its upstream connection here; llama-server sees the closed socket, cancels the task
and frees the slot (tests/test_serve_parallel.py checks it through /health).
"""
# no `from __future__ import annotations`: FastAPI reads the endpoint annotations (Request) at runtime

import json
import time
from typing import Optional

from .closing_stream import closing_stream_class
from .request_checks import _BadRequest, chat_messages, json_body, prompt_text, sampling_args

_PASS_STATUS = range(400, 500)


def upstream_body(body: dict, default_max_tokens: int) -> dict:
    """The validated request for llama-server: kvtool's defaults filled in, every other field (``cache_prompt``,
    ``ignore_eos``, ...) passed on as the client sent it."""
    kw = sampling_args(body, default_max_tokens)
    out = dict(body)
    out.pop("max_completion_tokens", None)
    out["max_tokens"] = kw["max_tokens"]
    for k in ("temperature", "top_p", "top_k", "min_p", "repeat_penalty"):
        out[k] = kw[k]
    if kw["seed"] is not None:
        out["seed"] = kw["seed"]
    return out


def error_body(status: int, message: str, kind: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": kind, "param": None, "code": status}}


def upstream_error(status: int, raw: bytes) -> tuple:
    """llama-server's error as (status, kvtool-shaped body); a 5xx becomes 502 (the engine failed, not the client)."""
    try:
        e = json.loads(raw).get("error", {})
        msg, kind = str(e.get("message") or raw[:300].decode(errors="replace")), str(e.get("type") or "")
    except (ValueError, AttributeError):
        msg, kind = raw[:300].decode(errors="replace").strip() or f"HTTP {status}", ""
    if status in _PASS_STATUS:
        return status, error_body(status, msg, kind or "invalid_request_error")
    return 502, error_body(502, f"llama-server failed (HTTP {status}): {msg}", "server_error")


def make_proxy_app(sock: str, model_id: str, parallel: int, n_ctx: int, default_max_tokens: int = 512,
                   kv: Optional[dict] = None):
    """The FastAPI front over llama-server listening on the Unix socket ``sock``."""
    import httpx
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response

    _ClosingStream = closing_stream_class()

    created = int(time.time())
    app = FastAPI(title="kvtool", version="1")
    limits = httpx.Limits(max_connections=4 * parallel + 8, max_keepalive_connections=2 * parallel + 4)
    client = httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=sock, limits=limits), base_url="http://llama",
                               timeout=httpx.Timeout(None, connect=10.0))

    def error(status: int, message: str, kind: str = "invalid_request_error"):
        return JSONResponse(error_body(status, message, kind), status_code=status)

    async def forward(path: str, body: dict):
        stream = bool(body.get("stream"))
        req = client.build_request("POST", path, json=body)
        try:
            resp = await client.send(req, stream=True)
        except httpx.HTTPError as e:
            return error(502, f"llama-server is not reachable: {e!r}", "server_error")
        if resp.status_code != 200:
            raw = await resp.aread()
            await resp.aclose()
            status, out = upstream_error(resp.status_code, raw)
            return JSONResponse(out, status_code=status)
        if not stream:
            raw = await resp.aread()
            await resp.aclose()
            return Response(raw, media_type="application/json")

        async def gen():
            async for chunk in resp.aiter_raw():
                yield chunk

        return _ClosingStream(gen(), resp.aclose, media_type="text/event-stream",
                              headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.exception_handler(_BadRequest)
    async def _bad(request, exc: _BadRequest):
        return error(exc.status, str(exc), exc.kind)

    @app.exception_handler(Exception)
    async def _any(request, exc: Exception):
        return error(500, f"internal error: {exc!r}", "server_error")

    async def slots() -> Optional[list]:
        try:
            r = await client.get("/slots", timeout=10)
            return r.json() if r.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            return None

    @app.get("/health")
    async def health():
        s = await slots()
        if s is None:
            return JSONResponse({"status": "error", "model": model_id, "message": "llama-server is not answering"},
                                status_code=503)
        busy = sum(1 for x in s if x.get("is_processing"))
        return {"status": "ok", "model": model_id, "engine": "llama-server", "parallel": parallel,
                "slots_busy": busy, "slots_idle": len(s) - busy, "busy": busy > 0, "n_ctx_per_sequence": n_ctx}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created,
                                            "owned_by": "kvtool"}]}

    @app.get("/v1/kv")
    async def kv_info():
        return kv or {}

    @app.get("/slots")
    async def slots_passthrough():
        r = await client.get("/slots", timeout=10)
        return Response(r.content, status_code=r.status_code, media_type="application/json")

    @app.get("/metrics")
    async def metrics():
        r = await client.get("/metrics", timeout=10)
        return Response(r.content, status_code=r.status_code, media_type=r.headers.get("content-type", "text/plain"))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await json_body(request)
        chat_messages(body)
        return await forward("/v1/chat/completions", upstream_body(body, default_max_tokens))

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await json_body(request)
        body["prompt"] = prompt_text(body)
        return await forward("/v1/completions", upstream_body(body, default_max_tokens))

    @app.on_event("shutdown")
    async def _close():
        await client.aclose()

    return app


def run_parallel(model: str, sock_front, parallel: int, model_id: Optional[str], default_max_tokens: int, seed: int,
                 n_ctx: int, n_ubatch: int, threads: Optional[int], cache_type: str, no_mixed: bool,
                 no_beacons: bool, flash_attn: Optional[bool], gpu_layers, server_log: Optional[str], echo) -> None:
    """Check the file, start llama-server, report its KV cache, and serve the front on ``sock_front`` until Ctrl-C."""
    from pathlib import Path

    import uvicorn

    from converters.gguf_budgets import read_budgets

    from ..errors import KvtoolError
    from ..fmt import fmt_bytes
    from ..runtime.memory import dims_from_gguf, predict
    from ..runtime.offload import ALL, resolve_gpu_layers
    from ..runtime.tools import tool_path
    from .llama_server import LlamaServer, parse_kv_log, server_args

    if not Path(model).is_file():
        raise KvtoolError(f"model not found: {model}")
    dims = dims_from_gguf(model)  # a bad file is a one-line error before anything starts
    b = read_budgets(model)
    if b is not None and b.beacon_token_id is not None and not no_beacons:
        raise KvtoolError(f"{model} has beacon keys, and --parallel serves through llama-server, which has no beacon "
                          f"loop: pass --no-beacons to serve its mixed cache without beacons, or drop --parallel")
    exe = str(tool_path("llama-server"))
    ngl = resolve_gpu_layers(gpu_layers, available=_runtime_offloads())
    ngl = "all" if ngl == ALL else str(ngl)  # common's -ngl: a count or 'all' (-1 would mean 'auto' there)
    model_id = model_id or Path(model).name
    mixed = bool(b and b.enabled and not no_mixed)
    srv = LlamaServer(server_args(exe, model, "{sock}", parallel, n_ctx, n_ubatch, threads, cache_type, no_mixed,
                                  flash_attn, ngl, seed, model_id),
                      Path(server_log) if server_log else None)
    try:
        srv.start()
        got = parse_kv_log(srv.log_text())
        fa = flash_attn is not False
        plan = predict(dims, b.head_window if b else None, b.sink if b else 0, n_ctx * parallel, n_ubatch, parallel,
                       cache_type, cache_type, fa, unified=False, mixed=mixed)
        kv = {"engine": "llama-server", "mixed": got.mixed, "parallel": parallel, "n_ctx_per_sequence": n_ctx,
              "allocated_bytes": got.allocated_bytes, "predicted_bytes": plan.mixed_bytes,
              "stock_bytes": plan.stock_bytes, "buffers": got.buffers}
        h, p = sock_front.getsockname()[:2]
        shown = f"[{h}]" if ":" in h else h
        echo(f"kvtool serve · {model_id} · llama-server, {parallel} parallel sequences of {n_ctx} tokens · KV "
             f"{fmt_bytes(got.allocated_bytes)} ({'mixed' if got.mixed else 'stock'}; stock would be "
             f"{fmt_bytes(plan.stock_bytes)})")
        echo(f"listening on http://{shown}:{p}/v1 (Ctrl-C to stop)")
        app = make_proxy_app(srv.sock, model_id, parallel, n_ctx, default_max_tokens, kv)
        config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=3)
        uvicorn.Server(config).run(sockets=[sock_front])
    finally:
        srv.stop()


def _runtime_offloads() -> bool:
    """Whether the installed runtime has a GPU backend (the tools are built with the same one)."""
    from ..runtime.tools import current_key

    return current_key()[1] != "cpu"
