"""kvtool: mixed per-head KV caches and beacons for long reasoning on small machines."""
__version__ = "0.1.0"


def __getattr__(name):  # lazy: `import toolchain` must not load libllama
    if name == "Model":
        from .runtime.model import Model

        return Model
    raise AttributeError(f"module 'toolchain' has no attribute {name!r}")
