"""Talk to ``kvtool serve`` with the official ``openai`` client (pip install openai).

    kvtool serve MODEL.gguf --port 8080 &
    python examples/openai_client.py [BASE_URL] [--max-tokens N]

BASE_URL defaults to $KVTOOL_BASE_URL, then http://127.0.0.1:8080/v1. No API key is checked by kvtool.
"""
import argparse
import os

from openai import OpenAI

ap = argparse.ArgumentParser()
ap.add_argument("base_url", nargs="?", default=os.environ.get("KVTOOL_BASE_URL", "http://127.0.0.1:8080/v1"))
ap.add_argument("--max-tokens", type=int, default=64)
args = ap.parse_args()

client = OpenAI(base_url=args.base_url, api_key=os.environ.get("OPENAI_API_KEY", "not-needed"))
model = client.models.list().data[0].id
messages = [{"role": "user", "content": "Name three primary colors."}]

reply = client.chat.completions.create(model=model, messages=messages, max_tokens=args.max_tokens, temperature=0)
print("reply:", reply.choices[0].message.content)
print("usage:", reply.usage.prompt_tokens, "prompt +", reply.usage.completion_tokens, "completion tokens")

print("streamed: ", end="", flush=True)
for chunk in client.chat.completions.create(model=model, messages=messages, max_tokens=args.max_tokens,
                                            temperature=0, stream=True):
    if chunk.choices and chunk.choices[0].delta.content:
        print(chunk.choices[0].delta.content, end="", flush=True)
print()
