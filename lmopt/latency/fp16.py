"""A small float32 -> float16 ONNX converter for strongly typed runtimes.

TensorRT 11 has no FP16 builder flag: precision travels in the ONNX file and the network is
strongly typed, so an fp16 engine needs an fp16 model; ort-cuda's fp16 timing needs one too.
The models lmopt times (convolutions, Gemm/MatMul, activations, pooling, normalisation, reshapes)
need only this much: every float tensor (initializers, Constant values, Cast targets, graph
I/O, value_info) becomes float16, except what must stay float32: inputs that ONNX requires to be
float32 (Resize/Upsample scales), and the float shape arithmetic that computes them or an integer
(Shape -> Cast(to=FLOAT) -> Mul -> Cast(to=INT64), as exporters write interpolation sizes), whose
Casts keep their FLOAT target. An initializer also listed as a graph input is retyped with it.
With keep_io_types the graph's float inputs and outputs stay float32, with Casts at the boundary
(what a deployed engine with fp32 I/O does).

Why not onnxconverter-common's float16.convert_float_to_float16 (which polygraphy's ConvertToFp16
wraps), checked with 1.16.0, the newest release:
  - it retypes a Cast(to=FLOAT)'s output to float16 but leaves the Cast's target FLOAT, so any
    model with an integer -> float Cast (an encoder's attention mask, an exporter's interpolation
    sizes) comes out invalid: onnxruntime refuses to load it ("Type (tensor(float16)) of output
    arg ... does not match expected type (tensor(float))"); tests/test_latency.py has both cases;
  - it keeps whole Resize, Upsample, Range, Min and Max nodes in float32 behind Casts (its default
    block list), adding Cast kernels to the block being timed, where only their float32-only inputs
    need to stay float32;
  - polygraphy's ConvertToFp16 always keeps float32 I/O, and block timing needs float16 I/O;
  - it is a separate package that JetPack does not ship.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import LmoptError

FLOAT, FLOAT16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
FP16_MAX = float(np.finfo(np.float16).max)

# (op_type, input index) that must stay float32 whatever T is.
_KEEP_FP32_INPUTS = {("Resize", 2), ("Upsample", 1)}
_UNSUPPORTED = {"If", "Loop", "Scan"}
# Ops whose `dtype` attribute names their output type.
_DTYPE_OPS = {"EyeLike", "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "ConstantOfShape"}
_FLOAT_TYPES = {FLOAT, FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}


def _fp32_tensors(model: onnx.ModelProto) -> set[str]:
    """Float tensors that must stay float32 (see the module docstring)."""
    graph = model.graph
    try:
        inferred = onnx.shape_inference.infer_shapes(model).graph
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError):
        inferred = graph  # the types the model declares
    types = {vi.name: vi.type.tensor_type.elem_type for vi in [*inferred.input, *inferred.output, *inferred.value_info]}
    types.update({t.name: t.data_type for t in graph.initializer})
    constants = {t.name for t in graph.initializer} | {n.output[0] for n in graph.node if n.op_type == "Constant"}
    sinks = {node.input[i] for node in graph.node for (op, i) in _KEEP_FP32_INPUTS
             if node.op_type == op and len(node.input) > i and node.input[i]}
    # Forward: tensors computed from integers (and constants) only.
    from_ints: set[str] = set()
    for node in graph.node:
        inputs = [name for name in node.input if name and name not in constants]
        if inputs and all(name in from_ints or types.get(name, FLOAT) not in _FLOAT_TYPES for name in inputs):
            from_ints.update(node.output)
    # Backward: tensors that feed a float32-only input or a Cast to a non-float type.
    needed = set(sinks)
    for node in graph.node:
        if node.op_type == "Cast" and any(a.name == "to" and a.i not in _FLOAT_TYPES for a in node.attribute):
            needed.add(node.input[0])
    for node in reversed(graph.node):
        if any(name in needed for name in node.output):
            needed.update(name for name in node.input if name)
    keep = sinks | (needed & from_ints)
    # The constants the kept shape arithmetic reads stay float32 with it.
    return keep | {name for node in graph.node if any(out in keep for out in node.output)
                   for name in node.input if name in constants}


def _to_fp16_tensor(tensor: onnx.TensorProto) -> onnx.TensorProto:
    array = np.clip(numpy_helper.to_array(tensor), -FP16_MAX, FP16_MAX).astype(np.float16)
    return numpy_helper.from_array(array, tensor.name)


def _retype(value_info: onnx.ValueInfoProto) -> None:
    if value_info.type.tensor_type.elem_type == FLOAT:
        value_info.type.tensor_type.elem_type = FLOAT16


def _convert_constants(node: onnx.NodeProto) -> None:
    """Float32 attribute values and dtype/Cast targets of `node` become float16."""
    for attr in node.attribute:
        if node.op_type == "Cast" and attr.name == "to" and attr.i == FLOAT:
            attr.i = FLOAT16
        elif node.op_type == "Constant":
            if attr.name == "value" and attr.t.data_type == FLOAT:
                attr.t.CopyFrom(_to_fp16_tensor(attr.t))
            elif attr.name in ("value_float", "value_floats"):
                values = attr.f if attr.name == "value_float" else list(attr.floats)
                attr.CopyFrom(helper.make_attribute("value", numpy_helper.from_array(np.array(values, np.float16))))
        elif node.op_type in _DTYPE_OPS and attr.name == "dtype" and attr.i == FLOAT:
            attr.i = FLOAT16
        elif node.op_type == "ConstantOfShape" and attr.name == "value" and attr.t.data_type == FLOAT:
            attr.t.CopyFrom(_to_fp16_tensor(attr.t))


def _rename_everywhere(graph: onnx.GraphProto, name: str, new: str, outputs: bool) -> None:
    """Nodes read `name` as `new` (and write it, with outputs=True)."""
    for node in graph.node:
        for k, value in enumerate(node.input):
            if value == name:
                node.input[k] = new
        if outputs:
            for k, value in enumerate(node.output):
                if value == name:
                    node.output[k] = new


def _cast_io(graph: onnx.GraphProto, inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto]) -> None:
    """Keep these float32 graph inputs and outputs: the graph works in float16 between Casts."""
    casts_in, casts_out = [], []
    for vi in inputs:
        inner = vi.name + "__fp16"
        _rename_everywhere(graph, vi.name, inner, outputs=False)
        casts_in.append(helper.make_node("Cast", [vi.name], [inner], to=FLOAT16, name=inner + "_cast"))
    for vi in outputs:
        inner = vi.name + "__fp16"
        _rename_everywhere(graph, vi.name, inner, outputs=True)  # an output may also feed later nodes
        casts_out.append(helper.make_node("Cast", [inner], [vi.name], to=FLOAT, name=inner + "_cast"))
    nodes = casts_in + list(graph.node) + casts_out
    del graph.node[:]
    graph.node.extend(nodes)


def convert_to_fp16(model: onnx.ModelProto, keep_io_types: bool = False) -> onnx.ModelProto:
    """A float16 copy of `model` (the original is untouched); see the module docstring for what stays float32."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    for node in graph.node:
        if node.op_type in _UNSUPPORTED:
            raise LmoptError(f"fp16 conversion does not handle control flow ({node.op_type} node {node.name!r})")

    keep_fp32 = _fp32_tensors(out)
    for i, tensor in enumerate(graph.initializer):
        if tensor.data_type == FLOAT and tensor.name not in keep_fp32:
            graph.initializer[i].CopyFrom(_to_fp16_tensor(tensor))
    for node in graph.node:
        if not any(name in keep_fp32 for name in node.output):
            _convert_constants(node)
    for vi in graph.value_info:
        if vi.name not in keep_fp32:
            _retype(vi)

    initializer_names = {t.name for t in graph.initializer}
    for vi in graph.input:  # initializers listed as graph inputs (IR < 4 models) take their new type
        if vi.name in initializer_names and vi.name not in keep_fp32:
            _retype(vi)
    float_inputs = [vi for vi in graph.input if vi.name not in initializer_names
                    and vi.type.tensor_type.elem_type == FLOAT]
    float_outputs = [vi for vi in graph.output if vi.type.tensor_type.elem_type == FLOAT]
    if keep_io_types:
        _cast_io(graph, float_inputs, float_outputs)
    else:
        for vi in float_inputs + float_outputs:
            _retype(vi)
    return out
