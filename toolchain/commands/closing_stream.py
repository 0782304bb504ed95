"""The streamed response both servers use (``serve.py`` and llama-server's front, ``serve_proxy.py``).

It closes its body generator however the response ends. With ASGI 2.4 servers a client that goes away makes
``send`` raise and Starlette just drops the generator; its ``finally`` (stop the generation, free the lock, close
the upstream response) would then wait for garbage collection and every later request would queue behind it.
FastAPI is imported only when a server starts, so the class is made then.
"""
from __future__ import annotations

import inspect


def closing_stream_class():
    from fastapi.responses import StreamingResponse

    class ClosingStream(StreamingResponse):
        def __init__(self, body, on_close, **kw):
            super().__init__(body, **kw)
            self._on_close = on_close  # a plain function or a coroutine function

        async def __call__(self, scope, receive, send):
            try:
                await super().__call__(scope, receive, send)
            finally:
                done = self._on_close()  # also when the body never started (headers could not be sent)
                if inspect.isawaitable(done):
                    await done
                await self.body_iterator.aclose()

    return ClosingStream
