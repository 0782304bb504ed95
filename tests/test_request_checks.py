"""The request-body checks both servers share (``commands/request_checks.py``): same 400 whichever one answers."""
from __future__ import annotations

import asyncio

import pytest

from toolchain.commands.request_checks import _BadRequest, chat_messages, json_body, prompt_text


class _Request:
    def __init__(self, value):
        self.value = value

    async def json(self):
        if isinstance(self.value, Exception):
            raise self.value
        return self.value


def test_json_body_is_an_object_or_a_400():
    assert asyncio.run(json_body(_Request({"a": 1}))) == {"a": 1}
    for value, match in ((ValueError("Expecting value"), "must be JSON"), ([1, 2], "JSON object"),
                         ("text", "JSON object")):
        with pytest.raises(_BadRequest, match=match) as e:
            asyncio.run(json_body(_Request(value)))
        assert e.value.status == 400


def test_prompt_is_a_string_or_a_batch_of_one():
    assert prompt_text({"prompt": "hi"}) == "hi"
    assert prompt_text({"prompt": ["hi"]}) == "hi"
    for bad in (["a", "b"], [1, 2, 3], None, 7, {}):
        with pytest.raises(_BadRequest, match="'prompt' must be a string"):
            prompt_text({"prompt": bad})


def test_messages_are_a_non_empty_list():
    msgs = [{"role": "user", "content": "hi"}]
    assert chat_messages({"messages": msgs}) is msgs
    for bad in ([], None, "hi", {"role": "user"}):
        with pytest.raises(_BadRequest, match="non-empty list"):
            chat_messages({"messages": bad})


BAD = [("/v1/completions", b"{not json", "request body must be JSON"),
       ("/v1/completions", b"[1, 2]", "request body must be a JSON object"),
       ("/v1/completions", b'{"prompt": ["a", "b"]}', "'prompt' must be a string"),
       ("/v1/completions", b'{"prompt": [1, 2]}', "'prompt' must be a string"),
       ("/v1/chat/completions", b'{"messages": []}', "'messages' must be a non-empty list"),
       ("/v1/chat/completions", b'{"messages": "hi"}', "'messages' must be a non-empty list")]


def test_both_servers_give_the_same_400s(tmp_path):
    """The in-process server and llama-server's front (whose upstream here does not exist: a bad body never
    reaches it) answer each bad body with the same status and message."""
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient
    from helpers_fake_model import FakeModel

    from toolchain.commands.serve import make_app
    from toolchain.commands.serve_proxy import make_proxy_app

    apps = [make_app(FakeModel()), make_proxy_app(str(tmp_path / "no-llama-server.sock"), "m", 1, 512)]
    for path, content, message in BAD:
        answers = []
        for app in apps:
            r = TestClient(app).post(path, content=content, headers={"content-type": "application/json"})
            answers.append((r.status_code, r.json()["error"]["message"], r.json()["error"]["type"]))
        assert answers[0] == answers[1], (path, content, answers)
        assert answers[0][0] == 400 and answers[0][1].startswith(message) and answers[0][2] == "invalid_request_error"
