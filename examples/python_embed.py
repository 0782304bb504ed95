"""Embed kvtool in a Python app: load a GGUF (its head budgets apply by themselves), ask, see the KV bill.

    python examples/python_embed.py MODEL.gguf        # no argument: the SmolLM2 demo model (fetched once)
"""
import sys

from toolchain import Model
from toolchain.models import fetch_smollm2

path = sys.argv[1] if len(sys.argv) > 1 else fetch_smollm2()
model = Model.load(path, n_ctx=2048)  # threads: physical cores; flash attention: on when the file has budgets
print(model.chat([{"role": "user", "content": "Name three primary colors."}], max_tokens=32))
kv, st = model.kv_stats(), model.last_stats
print(f"KV cache: {kv['allocated_bytes'] / 2**20:.1f} MiB allocated (mixed={kv['mixed']}), "
      f"a full cache would take {kv['stock_bytes'] / 2**20:.1f} MiB")
print(f"{st.generated_tokens} tokens at {st.decode_tok_s or 0:.1f} tok/s")
