"""Test helpers: small ONNX models built from lmopt.algebra.linear specs, run in onnxruntime.

Import from tests as ``from chains import ...`` (pytest puts tests/ on sys.path).
"""
from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from lmopt.algebra.linear import ConvSpec
from lmopt.onnxio import DEFAULT_OPSET, runtime_compatible

__all__ = [
    "assert_close",
    "chain_output_sizes",
    "conv_chain_model",
    "conv_node",
    "dense_matmul_model",
    "gemm_chain_model",
    "make_model",
    "moved_padding_chain",
    "random_conv",
    "rel_err",
    "run",
    "single_conv_model",
]


# --------------------------------------------------------------------------- model building


def make_model(nodes, inputs, outputs, initializers, name="test") -> onnx.ModelProto:
    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", DEFAULT_OPSET)])
    runtime_compatible(model)
    onnx.checker.check_model(model)
    return model


def _f32(name: str, array) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array, dtype=np.float32), name)


def conv_node(spec: ConvSpec, x: str, y: str, prefix: str, force_bias: bool = False):
    """One Conv node plus its initializers; the bias input is left out when the bias is all zero."""
    inits = [_f32(f"{prefix}_W", spec.weight)]
    inputs = [x, f"{prefix}_W"]
    if force_bias or np.any(spec.bias != 0):
        inits.append(_f32(f"{prefix}_B", spec.bias))
        inputs.append(f"{prefix}_B")
    node = helper.make_node("Conv", inputs, [y], name=prefix, **spec.onnx_attrs())
    return node, inits


def conv_chain_model(specs: list[ConvSpec], input_shape, skip: ConvSpec | str | None = None) -> onnx.ModelProto:
    """x -> conv_0 -> ... -> conv_{n-1} [+ skip(x)] -> y  (no activations between).

    skip: None (plain chain), "identity" (y = chain(x) + x) or a ConvSpec (y = chain(x) + conv(x)).
    """
    nodes, inits = [], []
    cur = "x"
    for i, spec in enumerate(specs):
        out = f"h{i}"
        node, w = conv_node(spec, cur, out, f"conv{i}")
        nodes.append(node)
        inits += w
        cur = out
    if skip is not None:
        if isinstance(skip, str):
            if skip != "identity":
                raise ValueError(skip)
            branch = "x"
        else:
            node, w = conv_node(skip, "x", "skip", "skipconv")
            nodes.append(node)
            inits += w
            branch = "skip"
        nodes.append(helper.make_node("Add", [cur, branch], ["sum"], name="residual"))
        cur = "sum"
    nodes.append(helper.make_node("Identity", [cur], ["y"], name="out"))
    return make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(input_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * len(input_shape))],
        inits,
        "conv_chain",
    )


def single_conv_model(spec: ConvSpec, input_shape) -> onnx.ModelProto:
    return conv_chain_model([spec], input_shape)


def moved_padding_chain(specs: list[ConvSpec], merged: ConvSpec) -> list[ConvSpec]:
    """The chain with all padding moved to the first conv: first conv gets the merged conv's
    pads, every later conv none.  A merged conv must equal this chain exactly."""
    zero = (0,) * specs[0].ndim
    first = specs[0]
    out = [ConvSpec(first.weight, first.bias, first.strides, merged.pads_begin, merged.pads_end,
                    first.dilations, first.group)]
    for s in specs[1:]:
        out.append(ConvSpec(s.weight, s.bias, s.strides, zero, zero, s.dilations, s.group))
    return out


def gemm_chain_model(layers, n_rows: int, in_features: int) -> onnx.ModelProto:
    """A chain of Gemm nodes on x (n_rows, in_features); each layer is a dict with keys
    B, C (or None), transB, alpha, beta."""
    nodes, inits = [], []
    cur = "x"
    for i, layer in enumerate(layers):
        inputs = [cur, f"B{i}"]
        inits.append(_f32(f"B{i}", layer["B"]))
        if layer.get("C") is not None:
            inits.append(_f32(f"C{i}", layer["C"]))
            inputs.append(f"C{i}")
        out = f"g{i}"
        nodes.append(helper.make_node("Gemm", inputs, [out], name=f"gemm{i}", transB=int(layer.get("transB", 0)),
                                      alpha=float(layer.get("alpha", 1.0)), beta=float(layer.get("beta", 1.0))))
        cur = out
    nodes.append(helper.make_node("Identity", [cur], ["y"], name="out"))
    return make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n_rows, in_features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, None])],
        inits,
        "gemm_chain",
    )


def dense_matmul_model(layers, input_shape, residual: bool = False) -> onnx.ModelProto:
    """MatMul(x, W) + b per layer on an N-d input (e.g. (1, T, in) tokens); layers are
    (W (in, out), b (out,) or None).  residual=True adds x to the result."""
    nodes, inits = [], []
    cur = "x"
    for i, (w, b) in enumerate(layers):
        inits.append(_f32(f"W{i}", w))
        nodes.append(helper.make_node("MatMul", [cur, f"W{i}"], [f"m{i}"], name=f"matmul{i}"))
        cur = f"m{i}"
        if b is not None:
            inits.append(_f32(f"b{i}", b))
            nodes.append(helper.make_node("Add", [cur, f"b{i}"], [f"a{i}"], name=f"bias{i}"))
            cur = f"a{i}"
    if residual:
        nodes.append(helper.make_node("Add", [cur, "x"], ["res"], name="residual"))
        cur = "res"
    nodes.append(helper.make_node("Identity", [cur], ["y"], name="out"))
    return make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(input_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * len(input_shape))],
        inits,
        "matmul_chain",
    )


# --------------------------------------------------------------------------- running


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """Run a one-input one-output model on the CPU (one thread, no graph rewrites)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: np.asarray(x, dtype=np.float32)})[0]


def rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    """max |got - ref| / max |ref| (0 for two empty arrays)."""
    if ref.size == 0:
        return 0.0
    scale = float(np.abs(ref).max())
    return float(np.abs(got.astype(np.float64) - ref).max()) / max(scale, 1e-12)


def assert_close(got: np.ndarray, ref: np.ndarray, tol: float = 1e-4, what: str = "") -> None:
    assert got.shape == ref.shape, f"{what}: shape {got.shape} != {ref.shape}"
    if ref.size == 0:
        return
    err = rel_err(got, ref)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol}"
    scale = float(np.abs(ref).max())
    np.testing.assert_allclose(got, ref, rtol=tol, atol=tol * scale, err_msg=what)


# --------------------------------------------------------------------------- random specs


def random_conv(rng: np.random.Generator, cin: int, cout: int, kernel, *, strides=None, dilations=None,
                pads_begin=None, pads_end=None, group: int = 1, bias: bool = True) -> ConvSpec:
    kernel = tuple(kernel)
    n = len(kernel)
    fan_in = (cin // group) * math.prod(kernel)
    weight = rng.uniform(-1.0, 1.0, (cout, cin // group) + kernel) * math.sqrt(3.0 / fan_in)
    b = rng.uniform(-1.0, 1.0, cout) if bias else np.zeros(cout)
    one, zero = (1,) * n, (0,) * n
    return ConvSpec(weight, b, strides or one, pads_begin or zero, pads_end or zero, dilations or one, group)


def chain_output_sizes(specs: list[ConvSpec], in_spatial) -> list[tuple[int, ...]] | None:
    """Spatial size after each conv, or None when some conv would get an empty output."""
    sizes, cur = [], tuple(in_spatial)
    for spec in specs:
        try:
            cur = spec.output_spatial(cur)
        except ValueError:
            return None
        sizes.append(cur)
    return sizes
