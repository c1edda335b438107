"""Give an optimized model back the symbolic batch dim its source had (lmopt works on static shapes)."""
from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime as ort

from .inputs import random_feeds
from .onnxio import graph_inputs, runtime_compatible

TOLERANCE = 1e-4  # relative to the largest output magnitude


def quiet_session(model: onnx.ModelProto) -> ort.InferenceSession:
    """A CPU session that logs nothing: a failure at another batch is an expected answer here."""
    options = ort.SessionOptions()
    options.log_severity_level = 4
    copy = runtime_compatible(onnx.ModelProto.FromString(model.SerializeToString()))
    return ort.InferenceSession(copy.SerializeToString(), options, providers=["CPUExecutionProvider"])


def source_batch_names(source: str | os.PathLike) -> dict[str, str]:
    """input name -> the symbolic name of its first dim, for the source's inputs whose batch is dynamic."""
    model = onnx.load(str(source), load_external_data=False)
    names = {}
    for vi in graph_inputs(model):
        dims = vi.type.tensor_type.shape.dim
        if dims and not (dims[0].HasField("dim_value") and dims[0].dim_value > 0):
            names[vi.name] = dims[0].dim_param or "batch"
    return names


def keep_dynamic_batch(model: onnx.ModelProto, source: str | os.PathLike) -> tuple[onnx.ModelProto, str]:
    """(model, note): the model with the source's symbolic batch dim on its inputs and outputs when it
    then runs at twice the batch with the same per-sample outputs, else the static model unchanged."""
    names = source_batch_names(source)
    if not names:
        return model, "static batch (as in the source model)"
    inputs = {vi.name: vi for vi in graph_inputs(model)}
    if any(name not in inputs for name in names):
        return model, "batch kept static: the inputs changed"
    if all(not inputs[name].type.tensor_type.shape.dim[0].HasField("dim_value") for name in names):
        return model, "dynamic batch kept (with the source's symbolic dims)"
    batch = inputs[next(iter(names))].type.tensor_type.shape.dim[0].dim_value
    dynamic = onnx.ModelProto()
    dynamic.CopyFrom(model)
    del dynamic.graph.value_info[:]
    for vi in graph_inputs(dynamic):
        if vi.name in names:
            vi.type.tensor_type.shape.dim[0].Clear()
            vi.type.tensor_type.shape.dim[0].dim_param = names[vi.name]
    label = next(iter(names.values()))
    for out in dynamic.graph.output:
        dims = out.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value == batch:
            dims[0].Clear()
            dims[0].dim_param = label
    halves = random_feeds(model, 2)
    try:
        static_run = quiet_session(model)
        expected = [np.concatenate(parts) for parts in zip(*(static_run.run(None, feed) for feed in halves))]
        doubled = {name: np.concatenate([feed[name] for feed in halves]) for name in halves[0]}
        got = quiet_session(dynamic).run(None, doubled)
    except Exception:  # noqa: BLE001 - onnxruntime's own error types: a shape is baked in
        return model, f"batch kept at {batch}: a shape in the model fixes it (it does not run at batch {2 * batch})"
    for want, have in zip(expected, got):
        scale = max(float(np.abs(want).max()), 1e-12) if want.size else 1.0
        if want.shape != have.shape or float(np.abs(have - want).max()) > TOLERANCE * scale:
            return model, f"batch kept at {batch}: outputs at another batch differ (a shape is baked in)"
    return dynamic, f"dynamic batch {label!r} kept"
