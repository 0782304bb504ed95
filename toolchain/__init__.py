"""kvtool: mixed per-head KV caches and beacons for long reasoning on small machines."""
__version__ = "0.1.0"
