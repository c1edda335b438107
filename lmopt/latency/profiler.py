"""Time many candidate blocks: each distinct structure once, cached, with a progress bar.

Also the latency-table file: the per-block latencies of one model on one backend, written as
JSON so that `lmopt profile` (on the target device) and `lmopt optimize` (anywhere) can be
separate steps.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import onnx

from ..errors import LmoptError
from ..onnxio import atomic_write_text
from .base import ENQUEUE_BOUND_RATIO, LatencyBackend
from .cache import LatencyCache
from .signature import model_fingerprint, structural_signature

logger = logging.getLogger(__name__)

TABLE_FORMAT = "lmopt-latency-table"
TABLE_VERSION = 1


def profile_blocks(blocks: dict[str, onnx.ModelProto], backend: LatencyBackend,
                   cache: LatencyCache | None = None, progress: bool = True,
                   desc: str = "profiling", signatures: dict[str, str] | None = None) -> dict[str, float]:
    """Median ms per block name.

    Blocks are grouped by structural signature and each signature is timed once; with a
    `cache`, signatures already stored for this backend's cache_key() are not re-timed, and
    each new measurement is committed as soon as it is taken (Ctrl-C loses nothing timed).
    cache=None times without persistence. `signatures`, if given, is filled with block -> signature.
    Blocks whose timing was enqueue-bound (see base.enqueue_bound) are counted in one logged warning.
    """
    from ..progress import stage

    key = backend.cache_key()
    sig_of = {name: structural_signature(model) for name, model in blocks.items()}
    if signatures is not None:
        signatures.update(sig_of)
    ms_of: dict[str, float] = {}
    todo: dict[str, onnx.ModelProto] = {}
    hits = 0
    for name, sig in sig_of.items():
        if sig in ms_of or sig in todo:
            continue
        cached = cache.get(sig, key) if cache is not None else None
        if cached is not None:
            ms_of[sig] = cached
            hits += 1
        else:
            todo[sig] = blocks[name]
    bound = 0
    with stage(total=len(todo), desc=desc, unit="block", enabled=progress) as bar:
        bar.set_postfix_str(f"{len(sig_of)} blocks, {len(ms_of) + len(todo)} distinct, {hits} cached")
        for sig, model in todo.items():
            ms = backend.measure(model)
            bound += backend.last_enqueue_bound
            ms_of[sig] = ms
            if cache is not None:
                cache.put(sig, key, ms)
            bar.update(1)
    if bound:
        logger.warning("%d of %d blocks timed on %s were enqueue-bound (the host's enqueue time was over %gx "
                       "the GPU time): their latencies may include GPU idle time",
                       bound, len(todo), backend.name, ENQUEUE_BOUND_RATIO)
    return {name: ms_of[sig] for name, sig in sig_of.items()}


def profile_relative(reference: onnx.ModelProto, builders: dict[str, Callable[[], onnx.ModelProto]],
                     backend: LatencyBackend, cache: LatencyCache | None = None, progress: bool = True,
                     group: int = 4, desc: str = "timing segments") -> tuple[dict[str, float], dict[str, str]]:
    """(each model's time as a fraction of `reference`'s, each model's structural signature). Each
    model is timed interleaved with `reference`, `group` at a time: whole models that differ by a
    little (one layer replaced) are told apart by the difference of their times, and two times taken
    one after the other drift apart with the machine's load more than that. The models are built by
    `builders`, a group at a time, and dropped after it: a whole model per segment of a large network
    does not fit in memory at once. Cached by the pair's signatures (the cache holds a ratio there)."""
    from ..progress import stage

    ratios: dict[str, float] = {}
    signatures: dict[str, str] = {}
    names = list(builders)
    if not names:  # nothing to time (a model without segments): no progress line either
        return ratios, signatures
    key, reference_signature = backend.cache_key(), structural_signature(reference)
    with stage(total=len(names), desc=desc, unit="model", enabled=progress) as bar:
        for begin in range(0, len(names), group):
            todo = []
            for name in names[begin:begin + group]:
                model = builders[name]()
                signatures[name] = structural_signature(model)
                pair = f"ratio:{reference_signature}:{signatures[name]}"
                cached = cache.get(pair, key) if cache is not None else None
                if cached is not None:
                    ratios[name] = cached
                else:
                    todo.append((name, pair, model))
            if todo:
                times = backend.measure_interleaved([reference] + [model for _, _, model in todo])
                for (name, pair, _), ms in zip(todo, times[1:]):
                    ratios[name] = ms / times[0]
                    if cache is not None:
                        cache.put(pair, key, ratios[name])
            bar.update(len(names[begin:begin + group]))
    return ratios, signatures


def make_table(model: onnx.ModelProto, backend_key: dict, latencies: dict[str, float],
               signatures: dict[str, str]) -> dict:
    """A latency table for `model`: backend key, model fingerprint, block -> {signature, ms}."""
    return {
        "format": TABLE_FORMAT,
        "version": TABLE_VERSION,
        "backend": backend_key,
        "model_fingerprint": model_fingerprint(model),
        "blocks": {name: {"signature": signatures[name], "ms": float(ms)} for name, ms in latencies.items()},
    }


def write_table(path: str | os.PathLike, table: dict) -> Path:
    """Write a latency table (JSON, atomically). `table` needs backend, model_fingerprint and blocks."""
    missing = [k for k in ("backend", "model_fingerprint", "blocks") if k not in table]
    if missing:
        raise LmoptError(f"latency table is missing {', '.join(missing)}")
    table = {"format": TABLE_FORMAT, "version": TABLE_VERSION, **table}
    return atomic_write_text(path, json.dumps(table, indent=1, sort_keys=True) + "\n")


def read_table(path: str | os.PathLike) -> dict:
    """Read and validate a latency table; LmoptError (one line) for anything else."""
    path = Path(path)
    if not path.is_file():
        raise LmoptError(f"{path}: no such file")
    try:
        table = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LmoptError(f"{path}: not an lmopt latency table (not JSON: {exc})") from None
    if not isinstance(table, dict) or table.get("format") != TABLE_FORMAT:
        raise LmoptError(f"{path}: not an lmopt latency table (write one with `lmopt profile`)")
    if table.get("version") != TABLE_VERSION:
        raise LmoptError(f"{path}: latency table version {table.get('version')!r}, this lmopt reads {TABLE_VERSION}")
    blocks = table.get("blocks")
    if (not isinstance(table.get("backend"), dict) or not isinstance(table.get("model_fingerprint"), str)
            or not isinstance(blocks, dict)):
        raise LmoptError(f"{path}: damaged latency table (backend, model_fingerprint or blocks missing)")
    for name, entry in blocks.items():
        if not (isinstance(entry, dict) and isinstance(entry.get("signature"), str)
                and isinstance(entry.get("ms"), (int, float)) and entry["ms"] >= 0):
            raise LmoptError(f"{path}: damaged latency table (block {name!r} has no valid signature and ms)")
    return table
