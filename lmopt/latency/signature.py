"""Structural signatures: one hash per distinct block structure, so identical blocks are timed once.

The signature covers what decides a block's run time: op types and domains, attributes,
the dtypes and shapes of inputs, outputs and initializers, the values of integer tensors
(shapes, axes, indices: they change what a node computes), the topology, and the opsets.
It leaves out tensor and node names and the values of floating-point tensors (weights).

model_fingerprint() is the same walk with the floating-point values included: it identifies
one model's weights too (used to check that a latency table belongs to the model).
"""
from __future__ import annotations

import hashlib
import json

import numpy as np
import onnx
from onnx import numpy_helper

from ..inputs import TIMING_SHAPES

_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                onnx.TensorProto.BFLOAT16}


def _dims(type_proto: onnx.TypeProto) -> list | None:
    if not type_proto.tensor_type.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else "?" for d in type_proto.tensor_type.shape.dim]


def _tensor(tensor: onnx.TensorProto, with_values: bool) -> list:
    desc = ["tensor", tensor.data_type, list(tensor.dims)]
    if with_values or tensor.data_type not in _FLOAT_TYPES:
        array = numpy_helper.to_array(tensor)
        desc.append(hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest())
    return desc


class _Walker:
    def __init__(self, with_values: bool):
        self.with_values = with_values

    def attribute(self, attr: onnx.AttributeProto) -> object:
        A = onnx.AttributeProto
        if attr.type == A.FLOAT:
            return attr.f
        if attr.type == A.INT:
            return attr.i
        if attr.type == A.STRING:
            return attr.s.decode("utf-8", "replace")
        if attr.type == A.FLOATS:
            return list(attr.floats)
        if attr.type == A.INTS:
            return list(attr.ints)
        if attr.type == A.STRINGS:
            return [s.decode("utf-8", "replace") for s in attr.strings]
        if attr.type == A.TENSOR:
            return _tensor(attr.t, self.with_values)
        if attr.type == A.TENSORS:
            return [_tensor(t, self.with_values) for t in attr.tensors]
        if attr.type == A.GRAPH:
            return self.graph(attr.g)
        if attr.type == A.GRAPHS:
            return [self.graph(g) for g in attr.graphs]
        return ["attr-type", attr.type]

    def graph(self, graph: onnx.GraphProto) -> list:
        """Describe a graph with tensors numbered by first appearance instead of named."""
        ids: dict[str, str] = {}
        initializers = {t.name: t for t in graph.initializer}
        desc_inputs, desc_inits = [], []

        def ref(name: str) -> str:
            if name == "":
                return ""  # an omitted optional input
            if name not in ids:
                if name in initializers:
                    ids[name] = f"w{len(desc_inits)}"
                    desc_inits.append(_tensor(initializers[name], self.with_values))
                else:
                    ids[name] = f"t{len(ids)}"
            return ids[name]

        for vi in graph.input:
            if vi.name not in initializers:
                ids[vi.name] = f"in{len(desc_inputs)}"
                desc_inputs.append([vi.type.tensor_type.elem_type, _dims(vi.type)])
        nodes = []
        for node in graph.node:
            inputs = [ref(name) for name in node.input]
            attrs = sorted((a.name, self.attribute(a)) for a in node.attribute)
            outputs = []
            for name in node.output:
                if name == "":
                    outputs.append("")
                    continue
                ids[name] = f"t{len(ids)}"
                outputs.append(ids[name])
            nodes.append([node.domain or "ai.onnx", node.op_type, inputs, outputs, attrs])
        outputs = [[ref(vi.name), vi.type.tensor_type.elem_type, _dims(vi.type)] for vi in graph.output]
        return [desc_inputs, desc_inits, nodes, outputs]


def _digest(model: onnx.ModelProto, with_values: bool) -> str:
    opsets = sorted((o.domain or "ai.onnx", o.version) for o in model.opset_import)
    desc = [opsets, _Walker(with_values).graph(model.graph)]
    # the shapes a model with symbolic input dims is timed at decide its time
    desc += [[p.key, p.value] for p in model.metadata_props if p.key == TIMING_SHAPES]
    text = json.dumps(desc, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def structural_signature(model: onnx.ModelProto) -> str:
    """sha256 of the model's structure, independent of names and of floating-point weight values."""
    return _digest(model, with_values=False)


def model_fingerprint(model: onnx.ModelProto) -> str:
    """sha256 of the model's structure and all its weight values (names still left out)."""
    return _digest(model, with_values=True)
