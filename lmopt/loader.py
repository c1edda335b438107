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
import tempfile

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from . import onnxio
from .errors import LmoptError, one_line
from .inputs import random_feeds
from .onnxio import graph_inputs, load_model, max_ir_version, runtime_compatible

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
        # Fix: a second spec for the same input used to replace the first silently.
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
        # Fix: a bare shape and a named one for the same input used to be resolved silently.
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
                raise LmoptError(f"--input-shape {vi.name}: rank {len(new)} given, the model's input has rank {len(dims)} {dims}")
            for old, want in zip(dims, new):
                if isinstance(old, int) and old != want:
                    raise LmoptError(f"--input-shape {vi.name}:{','.join(map(str, new))} conflicts with the model's static shape {dims}")
            shape = vi.type.tensor_type.shape
            for dim, value in zip(shape.dim, new):
                dim.Clear()
                dim.dim_value = value
        elif not all(isinstance(d, int) for d in dims):
            example = ",".join(str(d) if isinstance(d, int) else "N" for d in dims)
            raise LmoptError(f"input {vi.name!r} has dynamic dims {dims}: pass --input-shape {vi.name}:{example} with numbers")
    # Intermediate and output shapes were inferred with the symbolic dims: infer them again.
    del model.graph.value_info[:]
    for out in model.graph.output:
        out.type.tensor_type.ClearField("shape")


def check_opsets(model: onnx.ModelProto) -> None:
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version > MAX_KNOWN_OPSET:
            raise LmoptError(f"opset {opset.version} is newer than this onnx supports ({MAX_KNOWN_OPSET}); upgrade onnx or re-export at a lower opset")
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


def check_not_quantized(model: onnx.ModelProto) -> None:
    """A quantized model has integer weights lmopt cannot merge: say so instead of finding no chain."""
    found: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type in QUANTIZED_OPS:
            found[node.op_type] = found.get(node.op_type, 0) + 1
    if found:
        ops = ", ".join(f"{op} x{n}" for op, n in sorted(found.items()))
        raise LmoptError(f"the model is quantized ({ops}): lmopt compresses float models; run it on the float "
                         "model and quantize afterwards")


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


def copy_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """A deep copy (CopyFrom, which also works past protobuf's 2 GiB serialisation limit)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def _shape_known(value_info: onnx.ValueInfoProto) -> bool:
    tensor = value_info.type.tensor_type
    return (value_info.type.HasField("tensor_type") and tensor.HasField("shape")
            and all(d.HasField("dim_value") for d in tensor.shape.dim))


DATA_DEPENDENT_OPS = {"NonZero", "Unique", "NonMaxSuppression", "Compress", "TopK", "Range", "Loop", "If", "Scan"}


def fill_missing_shapes(model: onnx.ModelProto) -> int:
    """Shapes onnx inference leaves unknown (ops it has no inference for, Paddle's reshapes), taken
    from one onnxruntime run of the model with those tensors as extra outputs; returns how many.
    The model's inputs must be static. Shapes ORT cannot give either stay unknown."""
    import onnxruntime as ort

    known = {vi.name for vi in [*model.graph.value_info, *model.graph.input] if _shape_known(vi)}
    known |= {t.name for t in model.graph.initializer}
    varying: set[str] = set()  # shapes that depend on the data: one run cannot tell them
    for node in model.graph.node:  # topological order
        if node.op_type in DATA_DEPENDENT_OPS or any(t in varying for t in node.input):
            varying.update(node.output)
    missing = list(dict.fromkeys(t for n in model.graph.node for t in n.output
                                 if t and t not in known and t not in varying))
    if not missing:
        return 0
    probe = copy_model(model)
    outputs = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=name) for name in missing if name not in outputs)
    options = ort.SessionOptions()
    options.log_severity_level = 4  # a failure here is not the user's concern: the shapes stay unknown
    try:
        session = ort.InferenceSession(runtime_compatible(probe).SerializeToString(), options,
                                       providers=["CPUExecutionProvider"])
        values = session.run(missing, random_feeds(model, 1)[0])
    except Exception:  # noqa: BLE001 - without ORT's help the shapes stay unknown, as before
        return 0
    by_name = {vi.name: vi for vi in [*model.graph.value_info, *model.graph.output]}
    for name, value in zip(missing, values):
        value = np.asarray(value)
        elem = onnx.helper.np_dtype_to_tensor_dtype(value.dtype)
        filled = onnx.helper.make_tensor_value_info(name, elem, list(value.shape))
        if name in by_name:
            by_name[name].type.CopyFrom(filled.type)
        else:
            model.graph.value_info.append(filled)
    return len(missing)


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


def replace_uses(old: gs.Tensor, new: gs.Tensor) -> None:
    """Every node that reads `old` reads `new` instead."""
    for consumer in list(old.outputs):
        for index, tensor in enumerate(consumer.inputs):
            if tensor is old:
                consumer.inputs[index] = new


def _is_false_constant(tensor) -> bool:
    return isinstance(tensor, gs.Constant) and not bool(np.asarray(tensor.values).any())


def constant_values(tensor) -> np.ndarray | None:
    """Values of a constant tensor (an initializer or a Constant node's output), else None."""
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values)
    if len(tensor.inputs) == 1 and tensor.inputs[0].op == "Constant":
        value = tensor.inputs[0].attrs.get("value")
        if isinstance(value, gs.Constant):
            return np.asarray(value.values)
    return None


def fold_batchnorms(graph: gs.Graph) -> int:
    """Fold BatchNormalization(Conv(x)) into the Conv when the Conv output feeds only the BN."""
    folded = 0
    for bn in list(graph.nodes):
        if bn.op != "BatchNormalization" or len(bn.outputs) != 1 or not bn.inputs[0].inputs:
            continue
        conv = bn.inputs[0].inputs[0]
        if conv.op != "Conv" or len(bn.inputs[0].outputs) != 1 or bn.inputs[0] in graph.outputs:
            continue
        params = [constant_values(t) for t in bn.inputs[1:5]]
        weight = constant_values(conv.inputs[1])
        bias = constant_values(conv.inputs[2]) if len(conv.inputs) > 2 else None
        if any(p is None for p in params) or weight is None or (len(conv.inputs) > 2 and bias is None):
            continue
        gamma, beta, mean, var = (p.astype(np.float64) for p in params)
        eps = float(bn.attrs.get("epsilon", 1e-5))
        scale = gamma / np.sqrt(var + eps)
        if bias is None:
            bias = np.zeros(weight.shape[0])
        new_weight = weight.astype(np.float64) * scale.reshape(-1, *[1] * (weight.ndim - 1))
        new_bias = (bias.astype(np.float64) - mean) * scale + beta
        dtype = weight.dtype
        while len(conv.inputs) > 1:
            conv.inputs.pop()
        conv.inputs.append(gs.Constant(f"{conv.name}.weight_bnfold", new_weight.astype(dtype)))
        conv.inputs.append(gs.Constant(f"{conv.name}.bias_bnfold", new_bias.astype(dtype)))
        conv.outputs = [bn.outputs[0]]
        bn.outputs.clear()
        folded += 1
    return folded


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


def to_graph(model: onnx.ModelProto) -> gs.Graph:
    graph = gs.import_onnx(model)
    # Fix (tests/test_loader.py::test_constant_subgraph_folded_at_new_ir_version): gs exports the
    # graph at this IR version and runs onnxruntime to fold constants; a model written by a newer
    # onnx (IR 14 with onnx 1.23) made ORT refuse it, and folding then silently did nothing.
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


def canonicalise(source: str | os.PathLike | onnx.ModelProto,
                 input_shapes: dict[str, list[int]] | None = None) -> tuple[onnx.ModelProto, dict]:
    """Load and canonicalise; returns the model and a dict of what was done (for reports)."""
    from .passes.canonical import (cancel_layout_round_trips, fold_channel_affine, fold_pads_into_convs,
                                   normalise_gemms, resolve_auto_pad)

    model = source if isinstance(source, onnx.ModelProto) else load_model(source)
    model = copy_model(model)  # never touch the caller's object
    check_opsets(model)
    check_not_quantized(model)
    fix_input_shapes(model, dict(input_shapes or {}))
    model = infer_shapes(model)
    graph = to_graph(model)
    check_conv_sizes(graph)
    steps = {"nodes_in": len(graph.nodes)}
    for _ in range(3):  # a fold can settle shapes (Range, Expand in mask arithmetic) that let the next one fold more
        before = len(graph.nodes)
        try:
            graph.fold_constants(error_ok=True)
        except Exception as exc:  # the folder runs onnxruntime; a failure there is not fatal for us
            steps["fold_constants_error"] = one_line(exc, type(exc).__name__)
        graph.cleanup()
        if len(graph.nodes) == before or "fold_constants_error" in steps:
            break
        graph = to_graph(infer_shapes(to_model(graph, like=model)))
    steps["passthrough_removed"] = remove_passthrough_nodes(graph)
    unique_node_names(graph)  # the rewrites below name new weights after their node
    steps["auto_pad_resolved"] = resolve_auto_pad(graph)
    steps["pad_folded"] = fold_pads_into_convs(graph)
    steps["batchnorm_folded"] = fold_batchnorms(graph)
    steps["channel_affine_folded"] = fold_channel_affine(graph)
    steps["gemm_normalised"] = normalise_gemms(graph)
    steps["layout_round_trips_removed"] = cancel_layout_round_trips(graph)
    unique_node_names(graph)
    model = infer_shapes(to_model(graph, like=model))
    steps["shapes_from_onnxruntime"] = fill_missing_shapes(model)
    steps["nodes_out"] = len(model.graph.node)
    return model, steps
