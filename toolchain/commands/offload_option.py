"""``--gpu-layers N|all`` (short ``-ngl``, llama.cpp's name): the one option definition every command shares.

The option only parses (a bad value is a one-line error before anything loads); what a missing value means and
the CPU-build warning are ``runtime.offload.resolve_gpu_layers``'s job, called once per command.
"""
from __future__ import annotations

import click

from ..runtime.offload import parse_gpu_layers


class _GpuLayers(click.ParamType):
    name = "N|all"

    def convert(self, value, param, ctx):
        # a KvtoolError, not click's BadParameter: the CLI prints it as the one line "kvtool: error: --gpu-layers ..."
        return parse_gpu_layers(value)


def gpu_layers_option(help_text: str = "Layers to offload to the GPU: N or 'all' (default: all when the runtime "
                                       "has a GPU device, else 0)."):
    """Decorator adding ``--gpu-layers/-ngl`` as the ``gpu_layers`` parameter (None when not given)."""
    return click.option("--gpu-layers", "-ngl", "gpu_layers", type=_GpuLayers(), default=None, help=help_text)
