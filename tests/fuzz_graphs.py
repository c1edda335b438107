"""Random linear-layer graphs for fuzzing the merge (tests/test_fuzz.py), seeded numpy only.

Each graph is a run of layers with no activation between them, so everything in it is a merge
candidate: convs over kernel, stride, padding (symmetric or not, as pads, auto_pad or a zero Pad
node), dilation and groups (dense, grouped after dense, depthwise), per-channel Mul + Add after a
conv, an optional residual (identity or 1x1 projection) over the run, an optional ReLU that splits
it, and dense tails (Flatten + Gemm with transA/transB/alpha/beta, or MatMul + bias Add on tokens,
maybe inside a Reshape round trip). Some graphs also output an intermediate tensor.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from lmopt.onnxio import DEFAULT_OPSET, runtime_compatible


def _f32(name: str, array) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array, dtype=np.float32), name)


class GraphBuilder:
    def __init__(self, rng: np.random.Generator):
        self.rng, self.nodes, self.inits, self.count = rng, [], [], 0

    def name(self, stem: str) -> str:
        self.count += 1
        return f"{stem}{self.count}"

    def weight(self, shape, fan_in: int) -> str:
        name = self.name("w")
        self.inits.append(_f32(name, self.rng.uniform(-1, 1, shape) * np.sqrt(3.0 / max(fan_in, 1))))
        return name

    def node(self, op: str, inputs: list[str], **attrs) -> str:
        out = self.name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out


def random_conv(b: GraphBuilder, x: str, cin: int, size: tuple[int, int],
                allow_groups: bool) -> tuple[str, int, tuple[int, int]] | None:
    """One random Conv on (1, cin, *size): (output, cout, output size), None when it would be empty."""
    rng = b.rng
    kernel = int(rng.choice([1, 1, 2, 3, 3, 5]))
    stride = int(rng.choice([1, 1, 1, 2]))
    dilation = int(rng.choice([1, 1, 1, 2])) if kernel > 1 else 1
    extent = dilation * (kernel - 1) + 1
    pads = [int(rng.integers(0, extent // 2 + 2)) if rng.random() < 0.6 else 0 for _ in range(4)]
    if rng.random() < 0.5:
        pads[2:] = pads[:2]  # symmetric, as most exporters write
    auto_pad = str(rng.choice(["SAME_UPPER", "SAME_LOWER", "VALID"])) if rng.random() < 0.1 else "NOTSET"
    if auto_pad.startswith("SAME") and dilation > 1:
        auto_pad = "NOTSET"  # onnxruntime runs no dilated SAME conv
    if auto_pad == "VALID":
        pads = [0, 0, 0, 0]
    if auto_pad.startswith("SAME"):
        out_size = tuple(-(-size[i] // stride) for i in range(2))
    else:
        out_size = tuple((size[i] + pads[i] + pads[i + 2] - extent) // stride + 1 for i in range(2))
    if min(out_size) < 1:
        return None
    group = 1
    cout = int(rng.choice([2, 4, 6, 8]))
    if allow_groups and rng.random() < 0.4:
        group = int(rng.choice([g for g in (2, cin) if cin % g == 0]))
        cout = group * int(rng.integers(1, 3)) if group == cin else 2 * int(rng.integers(1, 4))
        if cout % group:
            cout = group
    if auto_pad == "NOTSET" and any(pads) and rng.random() < 0.2:  # TF-style: the padding as a Pad node
        amounts = b.name("pads")
        b.inits.append(numpy_helper.from_array(np.array([0, 0, *pads[:2], 0, 0, *pads[2:]], np.int64), amounts))
        x, pads = b.node("Pad", [x, amounts]), [0, 0, 0, 0]
    inputs = [x, b.weight((cout, cin // group, kernel, kernel), cin // group * kernel * kernel)]
    if rng.random() < 0.8:
        bias = b.name("b")
        b.inits.append(_f32(bias, rng.standard_normal(cout)))
        inputs.append(bias)
    placement = {"pads": pads} if auto_pad == "NOTSET" else {"auto_pad": auto_pad}
    out = b.node("Conv", inputs, kernel_shape=[kernel, kernel], strides=[stride, stride],
                 dilations=[dilation, dilation], group=group, **placement)
    if rng.random() < 0.15:  # BatchNormalization as exporters sometimes spell it: Mul + Add per channel
        scale, shift = b.name("scale"), b.name("shift")
        b.inits += [_f32(scale, rng.uniform(0.5, 1.5, (1, cout, 1, 1))), _f32(shift, rng.standard_normal((cout, 1, 1)))]
        out = b.node("Add", [shift, b.node("Mul", [out, scale])])
    return out, cout, out_size


def conv_run(b: GraphBuilder, x: str, cin: int, size: tuple[int, int]) -> tuple[str, int, tuple[int, int]]:
    """2-4 convs with no activation between (maybe one ReLU), maybe a residual over the run."""
    rng = b.rng
    cur, channels, spatial = x, cin, size
    layers = int(rng.integers(2, 5))
    for i in range(layers):
        made = random_conv(b, cur, channels, spatial, allow_groups=i > 0 or rng.random() < 0.3)
        if made is None:
            break
        cur, channels, spatial = made
        if i < layers - 1 and rng.random() < 0.1:
            cur = b.node("Relu", [cur])
    if rng.random() < 0.3 and spatial == size and cur != x:
        if channels == cin:
            cur = b.node("Add", [cur, x])
        else:
            proj = b.node("Conv", [x, b.weight((channels, cin, 1, 1), cin)])
            cur = b.node("Add", [cur, proj])
    return cur, channels, spatial


def dense_tail(b: GraphBuilder, x: str, features: int, rows: int | None) -> str:
    """2-3 Gemm (2-D input) or MatMul + bias (3-D tokens) layers with no activation between."""
    rng = b.rng
    cur = x
    for _ in range(int(rng.integers(2, 4))):
        out = int(rng.choice([3, 5, 8, 12]))
        if rows is None:  # Gemm on (1, features)
            trans_b = int(rng.integers(0, 2))
            shape = (out, features) if trans_b else (features, out)
            inputs = [cur, b.weight(shape, features)]
            if rng.random() < 0.8:
                bias = b.name("c")
                b.inits.append(_f32(bias, rng.standard_normal((1, out) if rng.random() < 0.5 else out)))
                inputs.append(bias)
            trans_a = int(rng.random() < 0.2)  # A given transposed: Transpose, then Gemm transA=1
            if trans_a:
                inputs[0] = b.node("Transpose", [cur], perm=[1, 0])
            cur = b.node("Gemm", inputs, transA=trans_a, transB=trans_b,
                         alpha=float(rng.choice([1.0, 0.5, 2.0])), beta=float(rng.choice([1.0, 0.5])))
        else:  # MatMul (+ bias Add) on (1, rows, features), maybe wrapped in a Reshape round trip
            wrapped = rng.random() < 0.25
            if wrapped:
                flat = b.name("shape")
                b.inits.append(numpy_helper.from_array(np.array([rows, features], np.int64), flat))
                cur = b.node("Reshape", [cur, flat])
            cur = b.node("MatMul", [cur, b.weight((features, out), features)])
            if rng.random() < 0.7:
                bias = b.name("c")
                b.inits.append(_f32(bias, rng.standard_normal(out)))
                cur = b.node("Add", [cur, bias])
            if wrapped:
                back = b.name("shape")
                b.inits.append(numpy_helper.from_array(np.array([1, rows, out], np.int64), back))
                cur = b.node("Reshape", [cur, back])
        features = out
    return cur


def random_graph(seed: int) -> tuple[onnx.ModelProto, tuple[int, ...]]:
    """(model, input shape) for one seed; always a valid model that onnxruntime runs."""
    rng = np.random.default_rng(seed)
    b = GraphBuilder(rng)
    kind = rng.choice(["conv", "conv", "conv+gemm", "tokens"])
    if kind == "tokens":
        rows, features = int(rng.integers(1, 5)), int(rng.choice([4, 6, 8]))
        shape = (1, rows, features)
        cur = dense_tail(b, "x", features, rows)
    else:
        cin, size = int(rng.choice([1, 2, 3, 4])), int(rng.integers(5, 15))
        shape = (1, cin, size, size)
        cur, channels, spatial = conv_run(b, "x", cin, (size, size))
        if kind == "conv+gemm":
            cur = b.node("Flatten", [cur], axis=1)
            cur = dense_tail(b, cur, channels * spatial[0] * spatial[1], None)
    cur = b.node("Identity", [cur])
    rank = {"conv": 4, "conv+gemm": 2, "tokens": 3}[str(kind)]
    graph = helper.make_graph(b.nodes, f"fuzz{seed}",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
                              [helper.make_tensor_value_info(cur, TensorProto.FLOAT, [None] * rank)], b.inits)
    if rng.random() < 0.2 and len(b.nodes) > 2:  # an intermediate tensor that is a graph output too
        inner = b.nodes[int(rng.integers(0, len(b.nodes) - 2))].output[0]
        graph.output.append(helper.make_tensor_value_info(inner, TensorProto.FLOAT, None))
        graph.output[-1].type.tensor_type.shape.SetInParent()
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", DEFAULT_OPSET)])
    return runtime_compatible(model), shape
