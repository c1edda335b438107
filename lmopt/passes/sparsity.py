"""2:4 structured sparsity: in every group of 4 consecutive weights along a layer's reduction
(input-channel) dimension, the 2 of smallest magnitude are set to zero, the pattern the sparse
Tensor Cores of Ampere and later GPUs execute at up to twice the dense rate.

The axis is the one TensorRT's sparse kernels group along, as NVIDIA's own pruner
(polygraphy.tools.sparse.SparsityPruner) prunes it: Conv weights (M, C/group, k...) along axis 1
(for each output channel and kernel position, every 4 input channels of the group), a MatMul's
constant second operand (K, N) along axis 0, a Gemm's B along K (axis 1 with transB=1, else 0).
TensorRT uses sparse kernels for such weights when the builder is given
BuilderFlag.SPARSE_WEIGHTS (polygraphy CreateConfig(sparse_weights=True), trtexec --sparsity=enable).

Magnitude pruning without retraining is an approximation: it keeps the weights that matter most
in each group, but the model's outputs change (NVIDIA's workflow fine-tunes afterwards). Weights
lmopt cannot prune safely are left byte-identical and listed with the reason.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from ..graph import copy_model
from .base import ModelPass

GROUP = 4  # consecutive weights per group along the reduction dimension
KEEP = 2   # weights kept in each group
FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}


def reduction_axis(node: onnx.NodeProto, conv: bool = True) -> int | None:
    """The axis of input 1 (the weight) that the layer sums over, None for an op this pass leaves alone."""
    if node.op_type == "MatMul":
        return 0
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 1 if trans_b else 0
    if node.op_type == "Conv" and conv:
        return 1
    return None


def prune_2_4(weight: np.ndarray, axis: int) -> np.ndarray:
    """A copy of `weight` with the 2 smallest-magnitude values of each group of 4 along `axis` set to 0.

    Ties keep the earlier position (a stable sort); kept values are copied bit for bit."""
    moved = np.moveaxis(weight, axis, -1)
    groups = moved.reshape(*moved.shape[:-1], moved.shape[-1] // GROUP, GROUP).copy()
    smallest = np.argsort(np.abs(groups), axis=-1, kind="stable")[..., :GROUP - KEEP]
    np.put_along_axis(groups, smallest, 0, axis=-1)
    return np.ascontiguousarray(np.moveaxis(groups.reshape(moved.shape), -1, axis))


def _weights(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """Constant tensors by name: initializers, and the `value` tensors of Constant nodes (changed in place)."""
    found = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is not None:
                found[node.output[0]] = value
    return found


def _layer_name(node: onnx.NodeProto) -> str:
    return node.name or f"{node.op_type}->{node.output[0]}"


def _reason(node: onnx.NodeProto, axis: int, tensor: onnx.TensorProto | None, producers: dict[str, str],
            min_params: int) -> str | None:
    """Why this layer's weight is not pruned, None when it is prunable."""
    name = node.input[1]
    if tensor is None:
        producer = producers.get(name)
        if producer == "DequantizeLinear":
            return "weight is quantized (behind DequantizeLinear): sparsify the float model before quantizing"
        return "weight is not a constant" + (f" (computed by {producer})" if producer else "")
    dims = list(tensor.dims)
    if tensor.data_type not in FLOAT_TYPES:
        return f"weight type {onnx.TensorProto.DataType.Name(tensor.data_type)} is not a float type"
    if node.op_type in ("MatMul", "Gemm") and len(dims) != 2:
        return f"weight has rank {len(dims)}, not 2"
    if node.op_type == "Conv" and len(dims) < 3:
        return f"weight has rank {len(dims)}"
    params = int(np.prod(dims))
    if params < min_params:
        return f"{params} weights, fewer than {min_params}"
    if dims[axis] % GROUP:
        return f"reduction dimension {dims[axis]} (axis {axis} of {dims}) is not a multiple of {GROUP}"
    return None


def _plan(model: onnx.ModelProto, min_params: int, conv: bool) -> tuple[dict[str, tuple[int, list]], list[dict]]:
    """(weight name -> (axis, the layers using it)) for the weights to prune, and the skipped layers."""
    weights = _weights(model)
    producers = {out: n.op_type for n in model.graph.node for out in n.output}
    outputs = {o.name for o in model.graph.output}
    inputs = {i.name for i in model.graph.input}
    uses: dict[str, list[tuple[onnx.NodeProto, int | None]]] = {}
    for node in model.graph.node:
        axis = reduction_axis(node, conv) if len(node.input) > 1 else None
        for k, name in enumerate(node.input):
            uses.setdefault(name, []).append((node, axis if k == 1 else None))
    plan: dict[str, tuple[int, list]] = {}
    skipped: list[dict] = []
    for node in model.graph.node:
        axis = reduction_axis(node, conv) if len(node.input) > 1 else None
        if axis is None:
            continue
        name = node.input[1]
        reason = _reason(node, axis, weights.get(name), producers, min_params)
        if reason is None:
            others = sorted({n.op_type for n, a in uses[name] if a != axis})
            if name in inputs:  # an initializer that is also a graph input is a default the caller may replace
                reason = "weight is also a graph input (it can be fed at run time)"
            elif others or name in outputs:
                # Zeroing a weight another op reads (tied embeddings, another reduction axis) would change
                # that op too, or leave this layer's groups broken along the other axis.
                reason = "weight is shared with " + (", ".join(others) or "a graph output")
        entry = {"layer": _layer_name(node), "op": node.op_type, "weight": name}
        if reason is not None:
            skipped.append(entry | {"reason": reason})
            continue
        plan.setdefault(name, (axis, []))[1].append(entry)
    return plan, skipped


def sparsify_2_4(model: onnx.ModelProto, min_params: int = 4096, conv: bool = True) -> tuple[onnx.ModelProto, dict]:
    """A copy of `model` with 2:4 structured sparsity in the constant weights of its MatMul, Gemm and
    (conv=True) Conv layers of at least `min_params` weights; `model` is not changed.

    Returns (model, info): info["sparsified"] lists each layer whose weight was pruned (layer, op,
    weight, shape, axis, params, zeroed: values set to zero that were not zero before; layers sharing
    a weight name it once each), info["skipped"] each layer
    left alone with its reason, and the counts params_model (weights of every float constant),
    params_sparsified, params_pruned (positions forced to zero: half of params_sparsified) and
    params_zeroed (of those, the values that were not zero already)."""
    result = copy_model(model)
    plan, skipped = _plan(result, min_params, conv)
    weights = _weights(result)
    sparsified = []
    for name, (axis, layers) in plan.items():
        tensor = weights[name]
        before = numpy_helper.to_array(tensor)
        after = prune_2_4(before, axis)
        tensor.CopyFrom(numpy_helper.from_array(after, tensor.name))  # in its place: initializer or Constant
        for layer in layers:
            sparsified.append(layer | {"shape": list(before.shape), "axis": axis, "params": int(before.size),
                                       "zeroed": int(np.count_nonzero(before) - np.count_nonzero(after))})
    params_model = sum(int(np.prod(t.dims)) for t in weights.values() if t.data_type in FLOAT_TYPES)
    params_sparsified = sum(int(np.prod(weights[name].dims)) for name in plan)
    info = {
        "pattern": f"{KEEP}:{GROUP}",
        "min_params": min_params,
        "sparsified": sparsified,
        "skipped": skipped,
        "params_model": params_model,
        "params_sparsified": params_sparsified,
        "params_pruned": params_sparsified * (GROUP - KEEP) // GROUP,
        "params_zeroed": sum(e["zeroed"] for e in {e["weight"]: e for e in sparsified}.values()),
    }
    return result, info


def _run(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    pruned, info = sparsify_2_4(model)
    return pruned, len({e["weight"] for e in info["sparsified"]})


SPARSIFY_2_4 = ModelPass("sparsify_2_4", _run)
