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
