"""Run models in onnxruntime (CPU): sessions, and outputs over many feeds, batched where the model allows."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from .errors import LmoptError, one_line
from .onnxio import runtime_compatible

BATCH = 32  # feeds run together when the model allows it
# ONNX Runtime's default logger severity has a setter and no getter: lmopt sets it through
# set_ort_log_severity and keeps what it set here, so that a temporary change is undone to it.
_ort_log_severity = 2  # ORT's own default (warnings)


def set_ort_log_severity(level: int) -> None:
    """ONNX Runtime's default logger severity (0 verbose .. 4 fatal), remembered for ort_log_severity."""
    global _ort_log_severity
    ort.set_default_logger_severity(level)
    _ort_log_severity = level


def ort_log_severity() -> int:
    """The default logger severity lmopt last set (ORT's default, 2, before that)."""
    return _ort_log_severity


@contextlib.contextmanager
def ort_log_severity_at(level: int) -> Iterator[None]:
    """ONNX Runtime's default logger at `level` for a while, then back at what it was."""
    previous = _ort_log_severity
    set_ort_log_severity(level)
    try:
        yield
    finally:
        set_ort_log_severity(previous)


def session(model: onnx.ModelProto, threads: int | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    ir_version = model.ir_version
    runtime_compatible(model)  # only lowers the IR version field; restored below
    try:
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise LmoptError(f"onnxruntime cannot load the model: {one_line(exc)}") from None
    finally:
        model.ir_version = ir_version


def free_batch(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of a batch-1 model whose leading dim is free: inputs and outputs get a symbolic batch,
    inner shapes are dropped, and constant Reshape targets copy the batch dim (0) instead of fixing it."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for value in list(model.graph.input) + list(model.graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value == 1:
            dims[0].dim_param = "batch"
    del model.graph.value_info[:]
    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Reshape" and node.input[1] in inits:
            shape = numpy_helper.to_array(inits[node.input[1]]).copy()
            if shape.size and shape[0] == 1:
                shape[0] = 0
                inits[node.input[1]].CopyFrom(numpy_helper.from_array(shape, node.input[1]))
    return model


def separable_batch(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]],
                    single: list[list[np.ndarray]] | None = None) -> ort.InferenceSession | None:
    """A session of free_batch(model) when the model runs a batch as it runs each sample (checked
    on the first two batch-1 feeds against `single`, their outputs one by one), else None: some
    exports fix the batch in reshapes that free_batch cannot see through."""
    if len(feeds) < 2 or any(v.shape[:1] != (1,) for v in feeds[0].values()):
        return None
    if single is None:
        sess = session(model)
        single = [sess.run(None, feed) for feed in feeds[:2]]
    try:
        batched = session(free_batch(model))
        quiet = ort.RunOptions()
        quiet.log_severity_level = 4  # a failed trial is an answer, not an error to print
        pair = batched.run(None, {name: np.concatenate([f[name] for f in feeds[:2]]) for name in feeds[0]}, quiet)
        fits = all(out.shape[:1] == (2,) and np.allclose(out[i:i + 1], single[i][j], rtol=1e-4, atol=1e-5)
                   for j, out in enumerate(pair) for i in range(2))
    except Exception:  # the model is not batch-separable
        fits = False
    return batched if fits else None


def run_each(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]) -> list[list[np.ndarray]]:
    """Every graph output for each feed. Feeds of batch 1 run BATCH at a time where the model
    allows it (see separable_batch), else one by one."""
    sess = session(model)
    if len(feeds) < 3 or any(v.shape[:1] != (1,) for v in feeds[0].values()):
        return [sess.run(None, feed) for feed in feeds]
    single = [sess.run(None, feed) for feed in feeds[:2]]
    batched = separable_batch(model, feeds, single)
    if batched is None:
        return single + [sess.run(None, feed) for feed in feeds[2:]]
    results = list(single)
    for begin in range(2, len(feeds), BATCH):
        chunk = feeds[begin:begin + BATCH]
        outs = batched.run(None, {name: np.concatenate([f[name] for f in chunk]) for name in feeds[0]})
        results += [[out[i:i + 1] for out in outs] for i in range(len(chunk))]
    return results


def run_outputs(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]) -> np.ndarray:
    """First graph output for each feed, stacked along a new leading axis."""
    return np.stack([outs[0] for outs in run_each(model, feeds)])


def run_named(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]],
              names: list[str] | None = None) -> dict[str, np.ndarray]:
    """The graph outputs `names` (default: all) by name, each stacked over the feeds."""
    runs = run_each(model, feeds)
    index = {out.name: i for i, out in enumerate(model.graph.output)}
    return {name: np.stack([r[index[name]] for r in runs]) for name in (names or list(index))}
