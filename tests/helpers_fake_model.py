"""A stand-in for `Model` that the server's request validation can be tested against without loading a model:
the bad-request tests only need the app to reach (or not reach) the model, never real tokens."""
from __future__ import annotations


class FakeModel:
    name = "fake"
    last_stats = None

    def stop(self):
        pass

    def kv_stats(self):
        return {}

    def generate(self, prompt, stream=False, **kw):
        from toolchain.runtime.model import GenStats

        self.last_stats = GenStats(prompt_tokens=1, generated_tokens=1, finish_reason="stop")

        def pieces():
            yield "ok"

        return pieces() if stream else "ok"

    def chat(self, messages, stream=False, **kw):
        return self.generate("", stream, **kw)
