"""Reading and writing ONNX files: clear errors for bad files, atomic writes, an IR version ORT accepts."""
from __future__ import annotations

import contextlib
import functools
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx

from .errors import LmoptError, one_line

# Opset used for every model lmopt builds itself (blocks, test chains, the model zoo).
# 17 is accepted by onnxruntime >= 1.14 and by TensorRT 10.3 (JetPack 6).
DEFAULT_OPSET = 17


@functools.lru_cache(maxsize=1)
def max_ir_version() -> int:
    """Highest ONNX IR version the installed onnxruntime loads (onnx may write a newer one)."""
    import onnxruntime as ort
    from onnx import helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "probe",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", DEFAULT_OPSET)])
    for ir in range(onnx.IR_VERSION, 6, -1):
        model.ir_version = ir
        try:
            ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
            return ir
        except Exception:  # ORT raises its own Fail type for "unsupported IR version"
            continue
    return 7


def runtime_compatible(model: onnx.ModelProto) -> onnx.ModelProto:
    """Clamp the IR version so the installed onnxruntime accepts the model (in place, returned)."""
    model.ir_version = min(model.ir_version or onnx.IR_VERSION, max_ir_version())
    return model


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Load an ONNX file with its external data; one clear LmoptError for anything that is not ONNX."""
    path = Path(path)
    if path.is_dir():
        raise LmoptError(f"{path}: is a directory, not an ONNX file")
    if not path.is_file():
        raise LmoptError(f"{path}: no such file")
    try:
        model = onnx.load(str(path), load_external_data=True)
    except Exception as exc:  # protobuf DecodeError, missing external data, ...
        raise LmoptError(f"{path}: not a readable ONNX model ({type(exc).__name__}: "
                         f"{one_line(exc, 'truncated or corrupt')})") from None
    if not model.graph.node:
        raise LmoptError(f"{path}: not a readable ONNX model (the graph has no nodes)")
    return model


@contextlib.contextmanager
def atomic_target(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success it replaces `path`, on any failure it is removed,
    so a reader never sees a half-written file and an existing file is never truncated."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        umask = os.umask(0)  # mkstemp makes 0600 files: give the mode a plain open() would
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def check_writable(path: str | os.PathLike, what: str) -> Path:
    """Fail now, before any work, when `path` cannot be written: it names a directory, or its
    nearest existing folder is not a writable folder. Probes by creating and removing a file."""
    path = Path(path)
    if path.is_dir():
        raise LmoptError(f"{what} {path}: is a directory; give a file path")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise LmoptError(f"{what} {path}: {folder} is not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=folder)
    except OSError as exc:
        raise LmoptError(f"{what} {path}: cannot write in {folder} ({exc.strerror})") from None
    os.close(fd)
    os.unlink(probe)
    return path


# Models larger than this are written with their weights in PATH.data (protobuf stops at 2 GiB).
EXTERNAL_DATA_BYTES = 1_900_000_000


def save_model(model: onnx.ModelProto, path: str | os.PathLike) -> Path:
    """Write atomically, at an IR version the installed onnxruntime accepts; models past protobuf's
    2 GiB limit get their weights in PATH.data beside them (written first, also atomically)."""
    path = Path(path)
    runtime_compatible(model)
    if model.ByteSize() <= EXTERNAL_DATA_BYTES:
        with atomic_target(path) as tmp:
            onnx.save_model(model, tmp)
        return path
    external = onnx.ModelProto()
    external.CopyFrom(model)  # saving moves the weights out of the proto it is given
    data = path.with_name(path.name + ".data")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent) as folder:
        onnx.save_model(external, str(Path(folder) / path.name), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=data.name, size_threshold=0)
        os.replace(Path(folder) / data.name, data)  # the weights first: the model file appears last
        os.replace(Path(folder) / path.name, path)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_target(path) as tmp:
        Path(tmp).write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


NP_TYPES = {
    onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16,
    onnx.TensorProto.DOUBLE: np.float64, onnx.TensorProto.INT64: np.int64,
    onnx.TensorProto.INT32: np.int32, onnx.TensorProto.INT8: np.int8,
    onnx.TensorProto.UINT8: np.uint8, onnx.TensorProto.BOOL: np.bool_,
}


def without_value_info(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` (in place, returned) without the shapes of its inner tensors. With them, ONNX Runtime
    makes fusions it does not make on the exported model (Add + LayerNormalization into
    SkipLayerNormalization on a symbolic-dim transformer), which ran slower: all-MiniLM-L6-v2 at
    sequence length 32 took 4.77 ms with lmopt's inferred shapes and 4.28 ms without, as exported
    4.30 ms (ORT 1.32, 2 threads)."""
    del model.graph.value_info[:]
    return model


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The model's real inputs (graph inputs that are not initializers)."""
    initializers = {t.name for t in model.graph.initializer}
    return [vi for vi in model.graph.input if vi.name not in initializers]


def static_shape(value_info: onnx.ValueInfoProto) -> tuple[int, ...]:
    """The input's shape; LmoptError if any dimension is not a fixed positive number."""
    dims = []
    for d in value_info.type.tensor_type.shape.dim:
        if not (d.HasField("dim_value") and d.dim_value > 0):
            raise LmoptError(f"input {value_info.name!r} has a dynamic dimension "
                             f"{d.dim_param or '?'!r}: fix it with --input-shape")
        dims.append(d.dim_value)
    return tuple(dims)


def input_dtype(value_info: onnx.ValueInfoProto) -> type:
    elem = value_info.type.tensor_type.elem_type
    if elem not in NP_TYPES:
        raise LmoptError(f"input {value_info.name!r} has element type "
                         f"{onnx.TensorProto.DataType.Name(elem)}, which lmopt does not feed")
    return NP_TYPES[elem]


def input_specs(model: onnx.ModelProto) -> list[tuple[str, tuple[int, ...], type]]:
    """(name, static shape, numpy dtype) of each graph input."""
    return [(vi.name, static_shape(vi), input_dtype(vi)) for vi in graph_inputs(model)]
