"""Helpers for ONNX graphs, shared by the passes and the stages: copies, graphsurgeon round trips,
shape inference, constants, rewiring, naming."""
from __future__ import annotations

import os
import tempfile

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from . import onnxio
from .errors import LmoptError, one_line
from .onnxio import max_ir_version, runtime_compatible


def copy_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """A deep copy (CopyFrom, which also works past protobuf's 2 GiB serialisation limit)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def to_graph(model: onnx.ModelProto) -> gs.Graph:
    graph = gs.import_onnx(model)
    # gs exports the graph at this IR version and runs onnxruntime to fold constants: a model
    # written by a newer onnx (IR 14 with onnx 1.23) would be refused, and folding do nothing.
    graph.ir_version = min(model.ir_version or onnx.IR_VERSION, max_ir_version())
    return graph


def to_model(graph: gs.Graph, like: onnx.ModelProto | None = None) -> onnx.ModelProto:
    """Export a graph (after cleanup and toposort) at an IR version the installed onnxruntime accepts."""
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    model = gs.export_onnx(graph, do_type_check=False)
    if like is not None:
        model.producer_name = like.producer_name or "lmopt"
        model.ir_version = like.ir_version
        del model.opset_import[:]
        model.opset_import.extend(like.opset_import)
    return runtime_compatible(model)


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    try:
        if model.ByteSize() <= onnxio.EXTERNAL_DATA_BYTES:
            return onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
        with tempfile.TemporaryDirectory(prefix="lmopt-shapes-") as folder:  # past protobuf's 2 GiB: by file
            source, target = os.path.join(folder, "in.onnx"), os.path.join(folder, "out.onnx")
            onnxio.save_model(model, source)
            onnx.shape_inference.infer_shapes_path(source, target, strict_mode=True, data_prop=True)
            inferred = onnx.load(target, load_external_data=False)
            onnx.external_data_helper.load_external_data_for_model(inferred, folder)
            return inferred
    except Exception as exc:
        raise LmoptError(f"shape inference failed: {one_line(exc, type(exc).__name__)}") from None


def shape_known(value_info: onnx.ValueInfoProto) -> bool:
    tensor = value_info.type.tensor_type
    return (value_info.type.HasField("tensor_type") and tensor.HasField("shape")
            and all(d.HasField("dim_value") for d in tensor.shape.dim))


def constant_values(tensor: gs.Tensor) -> np.ndarray | None:
    """Values of a constant tensor (an initializer or a Constant node's output), else None."""
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values)
    if len(tensor.inputs) == 1 and tensor.inputs[0].op == "Constant":
        value = tensor.inputs[0].attrs.get("value")
        if isinstance(value, gs.Constant):
            return np.asarray(value.values)
    return None


def _is_false_constant(tensor) -> bool:
    return isinstance(tensor, gs.Constant) and not bool(np.asarray(tensor.values).any())


def replace_uses(old: gs.Tensor, new: gs.Tensor) -> None:
    """Every node that reads `old` reads `new` instead."""
    for consumer in list(old.outputs):
        for index, tensor in enumerate(consumer.inputs):
            if tensor is old:
                consumer.inputs[index] = new


def remove_passthrough_nodes(graph: gs.Graph) -> int:
    """Drop Identity and (inference-mode) Dropout nodes by rewiring their consumers."""
    removed = 0
    outputs = set(id(t) for t in graph.outputs)
    for node in list(graph.nodes):
        if node.op not in ("Identity", "Dropout"):
            continue
        if node.op == "Dropout" and len(node.inputs) >= 3 and not _is_false_constant(node.inputs[2]):
            continue  # training_mode may be on: keep it, it is not a pass-through
        src, dst = node.inputs[0], node.outputs[0]
        if id(dst) in outputs:
            continue  # the graph output keeps its name; an Identity there costs nothing
        if len(node.outputs) > 1 and node.outputs[1].outputs:
            continue  # someone reads the Dropout mask
        replace_uses(dst, src)
        node.outputs.clear()
        removed += 1
    return removed


def unique_node_names(graph: gs.Graph) -> None:
    """Give every node a unique, non-empty name: the analysis refers to nodes by name."""
    seen: set[str] = set()
    for index, node in enumerate(graph.nodes):
        if not node.name or node.name in seen:
            name, suffix = f"{node.op}_{index}", 0
            while name in seen:
                suffix += 1
                name = f"{node.op}_{index}_{suffix}"
            node.name = name
        seen.add(node.name)
