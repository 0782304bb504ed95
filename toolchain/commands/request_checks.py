"""OpenAI request checks shared by both servers: the in-process one (``serve.py``) and the validating front of
llama-server (``serve_proxy.py``), so a bad field is the same 4xx JSON error whichever one answers."""
from __future__ import annotations


class _BadRequest(Exception):
    def __init__(self, message: str, status: int = 400, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.kind = status, kind


async def json_body(request) -> dict:
    """The request's JSON object; anything else is a 400 (never a 500 from a parser deep in a handler)."""
    try:
        body = await request.json()
    except Exception:
        raise _BadRequest("request body must be JSON") from None
    if not isinstance(body, dict):
        raise _BadRequest("request body must be a JSON object")
    return body


def chat_messages(body: dict) -> list:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise _BadRequest("'messages' must be a non-empty list")
    return msgs


def prompt_text(body: dict) -> str:
    """The completion prompt: a string, or a batch of exactly one string (what some clients send)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise _BadRequest("'prompt' must be a string (batches and token arrays are not supported)")
    return prompt


_I32_MAX = 0x7FFFFFFF
_U32_MAX = 0xFFFFFFFF


def _num(body: dict, key: str, typ, default, lo=None, hi=None):
    """A JSON number in [lo, hi]: NaN, inf, booleans and (for ints) fractions are a 400, never a silent wrap."""
    import math

    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not math.isfinite(v)):
        raise _BadRequest(f"'{key}' must be a finite number")
    if typ is int and not float(v).is_integer():
        raise _BadRequest(f"'{key}' must be an integer")
    v = typ(v)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise _BadRequest(f"'{key}' must be in [{lo}, {hi}], got {v}")
    return v


def stream_flags(body: dict) -> tuple:
    """(stream, include_usage), validated before any response starts, so a bad value is a 400 and not a stream
    that breaks after its 200."""
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _BadRequest("'stream' must be true or false")
    opts = body.get("stream_options")
    if opts is None:
        return stream, False
    if not isinstance(opts, dict):
        raise _BadRequest("'stream_options' must be an object such as {\"include_usage\": true}")
    unknown = sorted(set(opts) - {"include_usage"})
    if unknown:
        raise _BadRequest(f"'stream_options' has unknown field(s): {', '.join(map(str, unknown))}")
    usage = opts.get("include_usage", False)
    if not isinstance(usage, bool):
        raise _BadRequest("'stream_options.include_usage' must be true or false")
    return stream, usage


def sampling_args(body: dict, default_max_tokens: int) -> dict:
    """OpenAI request fields -> Model.generate/chat keyword arguments (unknown fields are ignored)."""
    if _num(body, "n", int, 1) != 1:
        raise _BadRequest("only n=1 is supported")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = default_max_tokens if max_tokens is None else _num({"max_tokens": max_tokens}, "max_tokens", int,
                                                                    default_max_tokens, 1, _I32_MAX)
    stop = body.get("stop")
    if stop is not None and not isinstance(stop, str) and not (isinstance(stop, list) and
                                                                all(isinstance(s, str) for s in stop)):
        raise _BadRequest("'stop' must be a string or a list of strings")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise _BadRequest("'seed' must be an integer")
    if seed is not None and not 0 <= seed <= _U32_MAX:
        raise _BadRequest(f"'seed' must be in [0, {_U32_MAX}], got {seed}")
    stream_flags(body)
    return dict(max_tokens=max_tokens, temperature=_num(body, "temperature", float, 0.7, 0.0, 2.0),
                top_p=_num(body, "top_p", float, 0.95, 0.0, 1.0), top_k=_num(body, "top_k", int, 40, 0, _I32_MAX),
                min_p=_num(body, "min_p", float, 0.05, 0.0, 1.0),
                repeat_penalty=_num(body, "repeat_penalty", float, 1.0, 0.0, 100.0), seed=seed, stop=stop)
