"""How many layers go to the GPU: the one parser and resolver behind ``--gpu-layers`` and ``Model.load(n_gpu_layers=)``.

Why one place: six commands and the Python API take the same value, and they must agree on what "all", a
missing value and a CPU-only build mean. Rules:

* a value is ``"all"`` or an integer >= 0 (more than the model has is fine: llama.cpp caps it);
* no value means all layers when the loaded runtime can offload (it has a GPU device), else 0;
* asking for GPU layers from a runtime that cannot offload prints one warning line and runs on the CPU,
  so a script written for a GPU laptop still runs on a CPU box.

llama.cpp counts the output layer as one of the ``n_layer + 1`` offloadable layers, and ``-1`` means all of them;
``llama_value`` makes that translation where the ``Llama`` object is built.
"""
from __future__ import annotations

import sys
from typing import Callable, Optional, Union

from ..errors import KvtoolError

ALL = "all"
GpuLayers = Union[int, str]  # an int >= 0 or "all"


def parse_gpu_layers(value: object, what: str = "--gpu-layers") -> Optional[GpuLayers]:
    """None stays None (use the default); "all" or a non-negative integer (as int or text) passes; else KvtoolError."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip().lower()
        if text == ALL:
            return ALL
        try:
            n = int(text, 10)
        except ValueError:
            raise KvtoolError(f"{what} must be a non-negative integer or 'all', got {value!r}") from None
    elif isinstance(value, bool) or not isinstance(value, int):
        raise KvtoolError(f"{what} must be a non-negative integer or 'all', got {value!r}")
    else:
        n = value
    if n < 0:
        raise KvtoolError(f"{what} must be a non-negative integer or 'all', got {n}")
    return n


_warned: set = set()  # messages already printed by this process (``eval`` and ``bench`` load several models)


def _warn_once(msg: str) -> None:
    if msg in _warned:
        return
    _warned.add(msg)
    sys.stderr.write(f"kvtool: warning: {msg}\n")
    sys.stderr.flush()


def resolve_gpu_layers(value: object, available: Optional[bool] = None,
                       warn: Optional[Callable[[str], None]] = None, what: str = "--gpu-layers") -> GpuLayers:
    """The layers to offload for this runtime: ``"all"`` or an int >= 0. ``available`` None asks the loaded runtime.

    A request for GPU layers (``"all"`` or N > 0) on a runtime that cannot offload gives one ``warn`` call and 0.
    The default ``warn`` prints a ``kvtool: warning:`` line once per process, however many models a command loads;
    commands resolve after their cheap input checks, so a bad argument is still a single error line.
    """
    warn = warn or _warn_once
    n = parse_gpu_layers(value, what)
    if available is None:
        from .library import gpu_offload_available

        available = gpu_offload_available()
    if n is None:
        return ALL if available else 0
    if n != 0 and not available:
        from .library import runtime_info

        backend = runtime_info().get("backend") or "cpu"
        warn(f"GPU layers requested ({n}), but this runtime ({backend} build) has no GPU device; running on the CPU")
        return 0
    return n


def llama_value(n: GpuLayers) -> int:
    """llama.cpp's ``n_gpu_layers`` for a resolved value (-1 = every layer, the output layer included)."""
    return -1 if n == ALL else int(n)


def device_layers(n: GpuLayers, n_layer: int) -> int:
    """Repeating layers (those holding KV) llama.cpp puts on the device for ``n``: it offloads the last layers
    first and counts the output layer as the (n_layer + 1)-th, so N = n_layer leaves layer 0 on the CPU."""
    if n == ALL:
        return n_layer
    return max(0, min(n_layer, int(n) - 1))


def weights_on_device(path, n: GpuLayers, n_layer: int) -> int:
    """Bytes of the GGUF's weights that go to the device for ``n``, read from the tensor table (no load).

    Mirrors llama.cpp's assignment: the input layer (``token_embd``) stays on the CPU; ``blk.i.*`` of the last
    ``device_layers`` layers move; the output layer (``output*``) moves once ``n`` >= 1, and with tied embeddings
    (no ``output.weight``) llama.cpp puts a copy of ``token_embd`` there. Compute buffers are not weights and are
    not counted.
    """
    from converters.gguf_budgets import tensor_spans

    k = device_layers(n, n_layer)
    first = n_layer - k
    total = 0
    names = {}
    for name, _, n_bytes in tensor_spans(path):
        names[name] = n_bytes
        if name.startswith("blk."):
            il = name.split(".", 2)[1]
            if il.isdigit() and int(il) >= first:
                total += n_bytes
    if n == ALL or int(n) >= 1:
        total += sum(b for name, b in names.items() if name.startswith("output"))
        if "output.weight" not in names:
            total += names.get("token_embd.weight", 0)
    return total
