"""Load any exported ONNX model and canonicalise it for analysis.

Canonical form: static input shapes, shapes inferred for every tensor, constants folded
(onnx-graphsurgeon's folder, which runs onnxruntime), Identity/Dropout removed, every
BatchNormalization that follows a Conv folded into it with the node's own epsilon, and what
exporters write around layers made plain (lmopt.passes.canonical: auto_pad, zero Pad before a
Conv, per-channel Mul/Add after one, Gemm alpha/beta/transA, Reshape and Transpose round trips).
Shapes onnx cannot infer come from one onnxruntime run.
"""
from __future__ import annotations

import os
import re

import onnx
import onnx_graphsurgeon as gs

from .errors import LmoptError, one_line
from .graph import copy_model, infer_shapes, to_graph
from .onnxio import graph_inputs, load_model

# Newest default-domain opset this onnx build knows; newer models cannot be checked or run here.
MAX_KNOWN_OPSET = onnx.defs.onnx_opset_version()


def parse_input_shapes(specs: list[str] | None) -> dict[str, list[int]]:
    """Parse onnxsim-style `name:1,3,224,224` specs (a bare `1,3,224,224` names the single input)."""
    shapes: dict[str, list[int]] = {}
    for spec in specs or []:
        name, _, dims = spec.rpartition(":")
        if not re.fullmatch(r"\d+(,\d+)*", dims.strip()):
            raise LmoptError(f"--input-shape {spec!r}: expected NAME:D1,D2,... with positive integers")
        new = [int(d) for d in dims.split(",")]
        if 0 in new:
            raise LmoptError(f"--input-shape {spec!r}: dims must be positive")
        # two different specs for one input: refuse rather than let the last one win silently
        if name in shapes and shapes[name] != new:
            raise LmoptError(f"--input-shape {spec!r} conflicts with an earlier --input-shape for the same input "
                             f"({','.join(map(str, shapes[name]))})")
        shapes[name] = new
    return shapes


def _dims(value_info: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or "?")
            for d in value_info.type.tensor_type.shape.dim]


def fix_input_shapes(model: onnx.ModelProto, shapes: dict[str, list[int]]) -> None:
    """Make every graph input static, from `shapes` where given; a clear error where a dim stays dynamic."""
    inputs = graph_inputs(model)
    names = [vi.name for vi in inputs]
    if "" in shapes:  # a bare shape: only unambiguous with one input
        if len(inputs) != 1:
            raise LmoptError(f"--input-shape without a name is ambiguous: the model has inputs {names}")
        bare = shapes.pop("")
        # a bare shape and a named one for the same input must agree
        if names[0] in shapes and shapes[names[0]] != bare:
            raise LmoptError(f"--input-shape {','.join(map(str, bare))} conflicts with --input-shape "
                             f"{names[0]}:{','.join(map(str, shapes[names[0]]))}")
        shapes = {names[0]: bare} | shapes
    for name in shapes:
        if name not in names:
            raise LmoptError(f"--input-shape names {name!r}, but the model's inputs are {names}")
    for vi in inputs:
        dims = _dims(vi)
        if vi.name in shapes:
            new = shapes[vi.name]
            if len(new) != len(dims):
                raise LmoptError(f"--input-shape {vi.name}: rank {len(new)} given, the model's input has rank "
                                 f"{len(dims)} {dims}")
            for old, want in zip(dims, new):
                if isinstance(old, int) and old != want:
                    raise LmoptError(f"--input-shape {vi.name}:{','.join(map(str, new))} conflicts with the "
                                     f"model's static shape {dims}")
            shape = vi.type.tensor_type.shape
            for dim, value in zip(shape.dim, new):
                dim.Clear()
                dim.dim_value = value
        elif not all(isinstance(d, int) for d in dims):
            example = ",".join(str(d) if isinstance(d, int) else "N" for d in dims)
            raise LmoptError(f"input {vi.name!r} has dynamic dims {dims}: "
                             f"pass --input-shape {vi.name}:{example} with numbers")
    # Intermediate and output shapes were inferred with the symbolic dims: infer them again.
    del model.graph.value_info[:]
    for out in model.graph.output:
        out.type.tensor_type.ClearField("shape")


def check_opsets(model: onnx.ModelProto) -> None:
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version > MAX_KNOWN_OPSET:
            raise LmoptError(f"opset {opset.version} is newer than this onnx supports ({MAX_KNOWN_OPSET}); "
                             "upgrade onnx or re-export at a lower opset")
        if opset.domain not in ("", "ai.onnx", "ai.onnx.ml", "com.microsoft", "ai.onnx.preview.training"):
            raise LmoptError(f"unknown operator domain {opset.domain!r} (custom ops cannot be analysed or timed)")
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise LmoptError(f"invalid ONNX model: {one_line(exc, 'invalid model')}") from None


# Ops of quantized graphs (QDQ, QOperator, integer ops; com.microsoft's QLinear* too).
QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul",
                 "ConvInteger", "MatMulInteger", "QLinearAdd", "QLinearMul", "QLinearSigmoid",
                 "QLinearLeakyRelu", "QLinearAveragePool", "QLinearGlobalAveragePool", "QLinearConcat",
                 "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QGemm"}


def quantized_ops(model: onnx.ModelProto) -> dict[str, int]:
    """Counts of the model's quantization ops by type (empty for a float model)."""
    found: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type in QUANTIZED_OPS:
            found[node.op_type] = found.get(node.op_type, 0) + 1
    return dict(sorted(found.items()))


def check_not_quantized(model: onnx.ModelProto) -> None:
    """A quantized model has integer weights lmopt cannot merge: say so instead of finding no chain."""
    found = quantized_ops(model)
    if found:
        ops = ", ".join(f"{op} x{n}" for op, n in found.items())
        raise LmoptError(f"the model is quantized ({ops}): lmopt compresses float models; run it on the float "
                         "model and quantize afterwards")


def check_conv_sizes(graph: gs.Graph) -> None:
    """A Conv whose output would be empty passes onnx shape inference, but onnxruntime refuses it."""
    for node in graph.nodes:
        if node.op != "Conv" or node.attrs.get("auto_pad", "NOTSET") != "NOTSET":
            continue
        spatial = list(node.inputs[0].shape or [])[2:]
        kernel = list(node.attrs.get("kernel_shape") or (node.inputs[1].shape or [])[2:])
        if not spatial or len(kernel) != len(spatial) or not all(isinstance(v, int) for v in spatial + kernel):
            continue
        n = len(kernel)
        pads = node.attrs.get("pads", [0] * 2 * n)
        dilations = node.attrs.get("dilations", [1] * n)
        for i in range(n):
            if spatial[i] + pads[i] + pads[i + n] < dilations[i] * (kernel[i] - 1) + 1:
                raise LmoptError(f"Conv {node.name or '?'}: its {'x'.join(map(str, kernel))} kernel gives an empty "
                                 f"output on its {'x'.join(map(str, spatial))} input (onnxruntime cannot run it)")


def canonicalise(source: str | os.PathLike | onnx.ModelProto,
                 input_shapes: dict[str, list[int]] | None = None) -> tuple[onnx.ModelProto, dict]:
    """Load, check and canonicalise (lmopt.passes.canonical.CANONICAL); returns the model and the
    rewrites each pass made (for reports)."""
    from .passes.base import run_passes
    from .passes.canonical import CANONICAL

    model = source if isinstance(source, onnx.ModelProto) else load_model(source)
    model = copy_model(model)  # never touch the caller's object
    check_opsets(model)
    check_not_quantized(model)
    fix_input_shapes(model, dict(input_shapes or {}))
    model = infer_shapes(model)
    check_conv_sizes(to_graph(model))
    nodes_in = len(model.graph.node)
    model, steps = run_passes(CANONICAL, model)
    return model, {"nodes_in": nodes_in, **steps, "nodes_out": len(model.graph.node)}
