"""Latency of candidate blocks and whole models on the real runtime (see base.LatencyBackend)."""
from .base import BACKENDS, LatencyBackend, default_backend_name, get_backend
from .cache import LatencyCache, default_cache_path
from .profiler import make_table, profile_blocks, read_table, write_table
from .signature import model_fingerprint, structural_signature

__all__ = [
    "BACKENDS", "LatencyBackend", "LatencyCache", "default_backend_name", "default_cache_path",
    "get_backend", "make_table", "model_fingerprint", "profile_blocks", "read_table",
    "structural_signature", "write_table",
]
