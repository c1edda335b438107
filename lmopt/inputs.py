"""Inputs of transformer exports: token-like random feeds and .npz calibration with one array per input.

Random floats cannot feed int64 token ids, masks or type ids. Without calibration data, ids are drawn
uniformly below the vocabulary size of the embedding table that reads them (found in the graph),
masks are all ones and type or segment ids zeros, positions count up along the last axis.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx

from .errors import LmoptError
from .onnxio import graph_inputs, input_dtype, static_shape

PASS_THROUGH_OPS = ("Cast", "Unsqueeze", "Reshape", "Squeeze", "Flatten", "Identity")


def role(name: str) -> str:
    """What an integer input carries, from its name: "mask", "type", "position" or "ids"."""
    lowered = name.lower()
    if "mask" in lowered:
        return "mask"
    if "type" in lowered or "segment" in lowered:
        return "type"
    if "position" in lowered:
        return "position"
    return "ids"


def vocabulary_size(model: onnx.ModelProto, name: str) -> int | None:
    """Rows of the constant table a Gather indexes with `name` (through Cast/Unsqueeze/... nodes)."""
    tables = {init.name: init for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            tables[node.output[0]] = node.attribute[0].t
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for tensor in node.input:
            readers.setdefault(tensor, []).append(node)
    frontier, seen = [name], {name}
    while frontier:
        tensor = frontier.pop()
        for node in readers.get(tensor, []):
            if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] == tensor and node.input[0] in tables:
                axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
                dims = list(tables[node.input[0]].dims)
                if dims:
                    return int(dims[axis])
            if node.op_type in PASS_THROUGH_OPS and node.input[0] == tensor and node.output[0] not in seen:
                seen.add(node.output[0])
                frontier.append(node.output[0])
    return None


def integer_input(model: onnx.ModelProto, name: str, shape: tuple[int, ...], dtype: type, rng: np.random.Generator,
                  vocab: dict | None = None) -> np.ndarray:
    """A token-like value for one integer (or bool) input."""
    kind = role(name)
    if kind == "mask":
        return np.ones(shape, dtype=dtype)
    if kind == "position" and shape:
        return np.broadcast_to(np.arange(shape[-1]), shape).astype(dtype)
    if kind == "ids" and dtype != np.bool_:
        size = vocab.get(name) if vocab is not None and name in vocab else vocabulary_size(model, name)
        if vocab is not None:
            vocab[name] = size
        if size and size > 1:
            return rng.integers(0, size, shape).astype(dtype)
    return np.zeros(shape, dtype=dtype)


# Metadata key of the input shapes a model with symbolic input dims is timed at (see timing_twin).
TIMING_SHAPES = "lmopt.timing_shapes"


def with_timing_shapes(model: onnx.ModelProto, shapes: dict[str, list[int]]) -> onnx.ModelProto:
    """A copy of `model` (symbolic input dims) that carries the shapes its random feeds take, so that
    any backend times it at those shapes, and its structural signature differs from one at others."""
    copy = onnx.ModelProto.FromString(model.SerializeToString())
    kept = [p for p in copy.metadata_props if p.key != TIMING_SHAPES]
    del copy.metadata_props[:]
    copy.metadata_props.extend(kept)
    copy.metadata_props.add(key=TIMING_SHAPES, value=json.dumps(shapes, sort_keys=True))
    return copy


def timing_shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    return next((json.loads(p.value) for p in model.metadata_props if p.key == TIMING_SHAPES), {})


def random_feed(model: onnx.ModelProto, rng: np.random.Generator, vocab: dict | None = None) -> dict[str, np.ndarray]:
    """Random inputs for every graph input: floats ~ N(0,1), integers token-like (see the module's text),
    at the input's static shape or, where the model carries them, its timing shapes."""
    feed = {}
    shapes = timing_shapes(model)
    for vi in graph_inputs(model):
        dtype = input_dtype(vi)
        shape = tuple(shapes[vi.name]) if vi.name in shapes else static_shape(vi)
        if np.issubdtype(dtype, np.floating):
            feed[vi.name] = rng.standard_normal(shape).astype(dtype)
        else:
            feed[vi.name] = integer_input(model, vi.name, shape, dtype, rng, vocab)
    return feed


def random_feeds(model: onnx.ModelProto, count: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng, vocab = np.random.default_rng(seed), {}
    return [random_feed(model, rng, vocab) for _ in range(count)]


def _samples(array: np.ndarray, shape: tuple[int, ...], what: str) -> np.ndarray:
    """`array` as (N,) + shape: N samples of the input's whole shape, or N rows filling its batch."""
    item = tuple(shape[1:])
    if array.shape == tuple(shape):
        array = array[None]
    elif array.ndim == len(shape) + 1 and tuple(array.shape[1:]) == tuple(shape):
        pass
    elif array.ndim == len(shape) and tuple(array.shape[1:]) == item:
        rows = len(array) - len(array) % shape[0]
        if rows == 0:
            raise LmoptError(f"{what}: {len(array)} rows do not fill one batch of the input's shape {list(shape)}")
        array = array[:rows].reshape((-1,) + tuple(shape))
    else:
        raise LmoptError(f"{what}: an array of shape {list(array.shape)} does not match the input's shape "
                         f"{list(shape)} (expected N x {list(item)}; --input-shape sets the shape)")
    return array


def named_npz_feeds(path: str | Path, model: onnx.ModelProto, count: int | None = None) -> list[dict] | None:
    """Feeds from a .npz holding one array per input name (N samples each); None when the file's
    names are not the model's input names. Inputs left out get their token-like default (a mask of
    ones, type ids of zeros); token ids and float inputs cannot be left out."""
    try:
        with np.load(path, allow_pickle=False) as loaded:
            arrays = {key: loaded[key] for key in loaded.files}
    except Exception as exc:  # noqa: BLE001 - zip, pickle and format errors alike
        raise LmoptError(f"--calib {path}: not a readable .npz file ({type(exc).__name__})") from None
    specs = {vi.name: (static_shape(vi), input_dtype(vi)) for vi in graph_inputs(model)}
    if not set(arrays) & set(specs):
        return None
    unknown = sorted(set(arrays) - set(specs))
    if unknown:
        raise LmoptError(f"--calib {path}: arrays {unknown} name no input of the model (inputs: {sorted(specs)})")
    given = {}
    for name, (shape, dtype) in specs.items():
        if name in arrays:
            array = arrays[name]
            if np.issubdtype(dtype, np.integer) and not np.issubdtype(array.dtype, np.integer):
                raise LmoptError(f"--calib {path}: {name!r} holds {array.dtype} values, "
                                 f"the model reads {np.dtype(dtype)}")
            given[name] = _samples(array, shape, f"--calib {path} [{name!r}]").astype(dtype)
        elif np.issubdtype(dtype, np.floating) or role(name) in ("ids",):
            raise LmoptError(f"--calib {path}: no array for the model's input {name!r} (it holds {sorted(arrays)})")
    counts = {name: len(a) for name, a in given.items()}
    if len(set(counts.values())) > 1:
        raise LmoptError(f"--calib {path}: the arrays hold different numbers of samples {counts}")
    total = next(iter(counts.values()))
    total = min(total, count) if count else total
    rng = np.random.default_rng(0)
    feeds = []
    for index in range(total):
        feed = {}
        for name, (shape, dtype) in specs.items():
            feed[name] = given[name][index] if name in given else integer_input(model, name, shape, dtype, rng)
        feeds.append(feed)
    return feeds


def real_tokens(feeds: list[dict[str, np.ndarray]], shape: tuple[int, ...]) -> np.ndarray | None:
    """Where the attention mask is 1, for token values of `shape` (samples concatenated on the batch
    axis, tokens on the next): a refit on padding tokens would spend its unknowns on values nothing
    reads. None when the feeds have no mask of that batch and sequence size."""
    for name in feeds[0] if feeds else ():
        if role(name) == "mask" and feeds[0][name].ndim == 2:
            mask = np.concatenate([feed[name] for feed in feeds]).astype(bool)
            if len(shape) == 3 and mask.shape == tuple(shape[:2]) and mask.any():
                return mask
    return None
