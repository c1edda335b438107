"""Rewrites of what exporters write into the plain layers the analysis reads, each output-preserving.

- Conv auto_pad SAME_UPPER / SAME_LOWER / VALID -> explicit pads (needs the input's spatial shape);
- a constant zero Pad before Convs -> the Convs' own pads (TF-style "same" padding, tf2onnx, timm tf_);
- a per-channel constant Mul / Div / Add / Sub after a Conv -> the Conv's weight and bias
  (BatchNormalization written as Mul + Add, layer scales);
- Gemm alpha / beta folded into constant B / C; transA=1 -> an explicit Transpose and transA=0;
- Reshape/Flatten round trips and inverse Transpose pairs between layers bypassed.

Each function takes an onnx-graphsurgeon graph with shapes, changes it in place and returns how
many rewrites it made; `CANONICAL` runs them as passes (see lmopt.passes.base), with constant
folding, BatchNormalization folding and shape filling around them.
"""
from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..errors import one_line
from ..graph import (
    constant_values,
    copy_model,
    infer_shapes,
    remove_passthrough_nodes,
    replace_uses,
    shape_known,
    to_graph,
    to_model,
    unique_node_names,
)
from ..inputs import random_feeds
from ..onnxio import runtime_compatible
from .base import GraphPass, ModelPass

logger = logging.getLogger(__name__)


def _static(values) -> bool:
    return values is not None and all(isinstance(v, int) and v > 0 for v in values)


def resolve_auto_pad(graph: gs.Graph) -> int:
    """Conv auto_pad -> explicit pads, where the input's spatial shape is known."""
    changed = 0
    for node in graph.nodes:
        mode = node.attrs.get("auto_pad", "NOTSET") if node.op == "Conv" else "NOTSET"
        mode = mode.decode() if isinstance(mode, bytes) else mode
        if mode == "NOTSET":
            continue
        shape = node.inputs[0].shape
        weight = constant_values(node.inputs[1])
        if shape is None or weight is None or not _static(list(shape)[2:]):
            continue
        spatial, kernel = list(shape)[2:], list(weight.shape[2:])
        n = len(kernel)
        strides = node.attrs.get("strides", [1] * n)
        dilations = node.attrs.get("dilations", [1] * n)
        begin, end = [0] * n, [0] * n
        if mode in ("SAME_UPPER", "SAME_LOWER"):
            for i in range(n):
                out = -(-spatial[i] // strides[i])
                total = max(0, (out - 1) * strides[i] + dilations[i] * (kernel[i] - 1) + 1 - spatial[i])
                small, large = total // 2, total - total // 2
                begin[i], end[i] = (small, large) if mode == "SAME_UPPER" else (large, small)
        elif mode != "VALID":
            continue
        node.attrs["auto_pad"] = "NOTSET"
        node.attrs["pads"] = begin + end
        changed += 1
    return changed


def _zero_pad_amounts(pad: gs.Node) -> list[int] | None:
    """The Pad's per-dim amounts [begin..., end...] over all dims when it is a constant zero pad."""
    mode = pad.attrs.get("mode", "constant")
    if (mode.decode() if isinstance(mode, bytes) else mode) != "constant":
        return None
    rank = len(pad.inputs[0].shape) if pad.inputs[0].shape is not None else None
    if len(pad.inputs) == 1:  # opset < 11: attributes
        amounts, value = pad.attrs.get("pads"), pad.attrs.get("value", 0.0)
    else:
        amounts = constant_values(pad.inputs[1])
        value = constant_values(pad.inputs[2]) if len(pad.inputs) > 2 and pad.inputs[2].name else 0.0
    if amounts is None or value is None or rank is None or np.any(np.asarray(value) != 0):
        return None
    amounts = [int(v) for v in np.asarray(amounts).reshape(-1)]
    if len(pad.inputs) > 3 and pad.inputs[3].name:  # opset 18 axes: pads for those axes only
        axes = constant_values(pad.inputs[3])
        if axes is None:
            return None
        full = [0] * 2 * rank
        for k, axis in enumerate(int(a) % rank for a in np.asarray(axes).reshape(-1)):
            full[axis], full[axis + rank] = amounts[k], amounts[k + len(amounts) // 2]
        amounts = full
    if len(amounts) != 2 * rank or min(amounts) < 0:
        return None
    return amounts


def fold_pads_into_convs(graph: gs.Graph) -> int:
    """Constant zero Pad whose readers are all Convs (explicit pads) -> those Convs' pads."""
    outputs = {id(t) for t in graph.outputs}
    folded = 0
    for pad in list(graph.nodes):
        if pad.op != "Pad" or not pad.outputs or id(pad.outputs[0]) in outputs:
            continue
        amounts = _zero_pad_amounts(pad)
        readers = list(pad.outputs[0].outputs)
        if amounts is None or not readers:
            continue
        rank = len(amounts) // 2
        if any(amounts[d] or amounts[d + rank] for d in (0, 1)):
            continue  # pads batch or channels: not a conv's padding
        if not all(c.op == "Conv" and c.inputs[0] is pad.outputs[0]
                   and c.attrs.get("auto_pad", "NOTSET") in ("NOTSET", b"NOTSET") for c in readers):
            continue
        spatial = rank - 2
        for conv in readers:
            pads = list(conv.attrs.get("pads", [0] * 2 * spatial))
            conv.attrs["pads"] = ([pads[i] + amounts[2 + i] for i in range(spatial)]
                                  + [pads[spatial + i] + amounts[rank + 2 + i] for i in range(spatial)])
            conv.inputs[0] = pad.inputs[0]
        pad.outputs.clear()
        folded += 1
    return folded


def _per_channel(values: np.ndarray, rank: int, channels: int) -> np.ndarray | None:
    """A constant that broadcasts over an N x C x ... tensor per channel only, as a (C,) vector."""
    if values.ndim > rank:
        return None
    shape = (1,) * (rank - values.ndim) + values.shape
    if any(d != 1 for i, d in enumerate(shape) if i != 1) or shape[1] not in (1, channels):
        return None
    return np.broadcast_to(values.reshape(-1), (channels,)).astype(np.float64)


def fold_channel_affine(graph: gs.Graph) -> int:
    """Conv -> Mul/Div/Add/Sub by a per-channel constant -> one Conv (repeated while one follows)."""
    outputs = {id(t) for t in graph.outputs}
    folded = 0
    for conv in list(graph.nodes):
        if conv.op != "Conv" or not conv.outputs:
            continue
        while True:
            out = conv.outputs[0]
            if id(out) in outputs or len(out.outputs) != 1 or out.shape is None:
                break
            op = out.outputs[0]
            if op.op not in ("Mul", "Div", "Add", "Sub") or len(op.inputs) != 2:
                break
            other = op.inputs[1] if op.inputs[0] is out else op.inputs[0]
            if other is out or (op.op in ("Div", "Sub") and op.inputs[0] is not out):
                break
            weight, values = constant_values(conv.inputs[1]), constant_values(other)
            if weight is None or values is None or not np.issubdtype(weight.dtype, np.floating):
                break
            bias = constant_values(conv.inputs[2]) if len(conv.inputs) > 2 and conv.inputs[2].name else None
            if len(conv.inputs) > 2 and conv.inputs[2].name and bias is None:
                break
            vector = _per_channel(values, len(out.shape), weight.shape[0])
            if vector is None or (op.op == "Div" and not vector.all()):
                break
            w = weight.astype(np.float64)
            b = np.zeros(weight.shape[0]) if bias is None else bias.astype(np.float64)
            if op.op in ("Mul", "Div"):
                scale = vector if op.op == "Mul" else 1.0 / vector
                w, b = w * scale.reshape(-1, *[1] * (w.ndim - 1)), b * scale
            else:
                b = b + vector if op.op == "Add" else b - vector
            while len(conv.inputs) > 1:
                conv.inputs.pop()
            conv.inputs.append(gs.Constant(f"{conv.name}.weight_affine{folded}", w.astype(weight.dtype)))
            conv.inputs.append(gs.Constant(f"{conv.name}.bias_affine{folded}", b.astype(weight.dtype)))
            conv.outputs = [op.outputs[0]]
            op.outputs.clear()
            folded += 1
    return folded


def normalise_gemms(graph: gs.Graph) -> int:
    """Gemm alpha/beta folded into constant B/C, and transA=1 made an explicit Transpose."""
    changed = 0
    for node in list(graph.nodes):
        if node.op != "Gemm":
            continue
        alpha, beta = float(node.attrs.get("alpha", 1.0)), float(node.attrs.get("beta", 1.0))
        b = constant_values(node.inputs[1])
        has_c = len(node.inputs) > 2 and node.inputs[2].name
        c = constant_values(node.inputs[2]) if has_c else None
        touched = False
        if alpha != 1.0 and b is not None and np.issubdtype(b.dtype, np.floating):
            node.inputs[1] = gs.Constant(f"{node.name}.B_alpha", (b.astype(np.float64) * alpha).astype(b.dtype))
            node.attrs["alpha"] = 1.0
            touched = True
        if beta != 1.0 and (not has_c or (c is not None and np.issubdtype(c.dtype, np.floating))):
            if has_c:
                node.inputs[2] = gs.Constant(f"{node.name}.C_beta", (c.astype(np.float64) * beta).astype(c.dtype))
            node.attrs["beta"] = 1.0
            touched = True
        if node.attrs.get("transA", 0):
            a = node.inputs[0]
            shape = list(a.shape)[::-1] if a.shape is not None else None
            transposed = gs.Variable(f"{node.name}.A_transposed", dtype=a.dtype, shape=shape)
            graph.nodes.append(gs.Node("Transpose", f"{node.name}.transA", {"perm": [1, 0]}, [a], [transposed]))
            node.inputs[0] = transposed
            node.attrs["transA"] = 0
            touched = True
        changed += touched
    return changed


SHAPE_OPS = ("Reshape", "Flatten", "Squeeze", "Unsqueeze")


def cancel_layout_round_trips(graph: gs.Graph) -> int:
    """Reshape/Flatten/Squeeze/Unsqueeze runs that end in the shape they started from, and Transpose
    pairs that compose to the identity, are bypassed: layers wrapped in them (x -> Reshape -> MatMul
    -> Reshape -> Reshape -> MatMul, Transpose -> MatMul -> Transpose on each side) become adjacent."""
    outputs = {id(t) for t in graph.outputs}
    bypassed = 0
    for node in list(graph.nodes):
        if not node.outputs or id(node.outputs[0]) in outputs or not node.outputs[0].outputs:
            continue
        end = node.outputs[0]
        start = None
        if node.op == "Transpose":
            inner = node.inputs[0].inputs[0] if len(node.inputs[0].inputs) == 1 else None
            if inner is not None and inner.op == "Transpose":
                outer_perm, inner_perm = node.attrs.get("perm"), inner.attrs.get("perm")
                if outer_perm is not None and inner_perm is not None and \
                        [inner_perm[p] for p in outer_perm] == list(range(len(outer_perm))):
                    start = inner.inputs[0]
        elif node.op in SHAPE_OPS and end.shape is not None and _static(list(end.shape)):
            current = node.inputs[0]
            while current.shape is not None and list(current.shape) != list(end.shape):
                if len(current.inputs) != 1 or current.inputs[0].op not in SHAPE_OPS:
                    break
                current = current.inputs[0].inputs[0]
            if current is not node.inputs[0] and current.shape is not None and list(current.shape) == list(end.shape):
                start = current
        if start is not None:
            replace_uses(end, start)
            bypassed += 1
    return bypassed


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


DATA_DEPENDENT_OPS = {"NonZero", "Unique", "NonMaxSuppression", "Compress", "TopK", "Range", "Loop", "If", "Scan"}


def fill_missing_shapes(model: onnx.ModelProto) -> int:
    """Shapes onnx inference leaves unknown (ops it has no inference for, Paddle's reshapes), taken
    from one onnxruntime run of the model with those tensors as extra outputs; returns how many.
    The model's inputs must be static. Shapes ORT cannot give either stay unknown."""
    import onnxruntime as ort

    known = {vi.name for vi in [*model.graph.value_info, *model.graph.input] if shape_known(vi)}
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


def fold_constants(graph: gs.Graph) -> tuple[gs.Graph, int]:
    """onnx-graphsurgeon's constant folder (which runs onnxruntime), repeated while it removes nodes:
    a fold can settle shapes (Range, Expand in mask arithmetic) that let the next one fold more."""
    removed = 0
    for _ in range(3):
        before = len(graph.nodes)
        try:
            graph.fold_constants(error_ok=True)
        except Exception as exc:  # noqa: BLE001 - unfolded constants are still correct, only slower to analyse
            logger.info("lmopt: constant folding stopped early: %s", one_line(exc, type(exc).__name__))
            graph.cleanup()
            return graph, removed + before - len(graph.nodes)
        graph.cleanup()
        removed += before - len(graph.nodes)
        if len(graph.nodes) == before:
            break
        graph = to_graph(infer_shapes(to_model(graph)))
    return graph, removed


def name_nodes(graph: gs.Graph) -> int:
    unique_node_names(graph)
    return 0  # names are bookkeeping: not a rewrite the report counts


def _infer(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    return infer_shapes(model), 0


CANONICAL = [
    GraphPass("constants_folded", fold_constants),
    GraphPass("passthrough_removed", remove_passthrough_nodes),
    GraphPass("names", name_nodes),  # the rewrites below name new weights after their node
    GraphPass("auto_pad_resolved", resolve_auto_pad),
    GraphPass("pad_folded", fold_pads_into_convs),
    GraphPass("batchnorm_folded", fold_batchnorms),
    GraphPass("channel_affine_folded", fold_channel_affine),
    GraphPass("gemm_normalised", normalise_gemms),
    GraphPass("layout_round_trips_removed", cancel_layout_round_trips),
    GraphPass("names", name_nodes),
    ModelPass("shapes_inferred", _infer),
    ModelPass("shapes_from_onnxruntime", lambda model: (model, fill_missing_shapes(model))),
]

# For a model whose inputs keep their symbolic dims (lmopt.symbolic): the passes that need no
# static shape, so that the plan made at fixed shapes applies to it node by node.
CANONICAL_SYMBOLIC = [
    GraphPass("constants_folded", fold_constants),
    GraphPass("passthrough_removed", remove_passthrough_nodes),
    GraphPass("batchnorm_folded", fold_batchnorms),
    GraphPass("names", name_nodes),
    ModelPass("shapes_inferred", _infer),
]
