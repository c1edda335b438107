"""Exporter patterns made plain by lmopt.passes.canonical: each rewrite keeps the outputs
(onnxruntime before and after, 1e-4 relative to the largest output) and really happens."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from chains import assert_close
from chains import run as _run
from onnx import TensorProto, helper, numpy_helper

from lmopt.analysis import analyse
from lmopt.loader import canonicalise
from lmopt.onnxio import DEFAULT_OPSET, max_ir_version

TOL = 1e-4


def f32(name, array):
    return numpy_helper.from_array(np.asarray(array, dtype=np.float32), name)


def i64(name, array):
    return numpy_helper.from_array(np.asarray(array, dtype=np.int64), name)


def model_of(nodes, inits, x_shape, y_rank=4, opset=DEFAULT_OPSET):
    graph = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * y_rank)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = min(model.ir_version, max_ir_version())
    onnx.checker.check_model(model)
    return model


def ops(model):
    return [n.op_type for n in model.graph.node]


def same_outputs(model, canon, x_shape, seed=0):
    x = np.random.default_rng(seed).standard_normal(x_shape).astype(np.float32)
    assert_close(_run(canon, x), _run(model, x), TOL)


# --------------------------------------------------------------------------- auto_pad


@pytest.mark.parametrize("mode", ["SAME_UPPER", "SAME_LOWER", "VALID"])
@pytest.mark.parametrize("kernel,stride,dilation,size", [(3, 1, 1, 9), (4, 2, 1, 9), (3, 2, 2, 10), (2, 3, 1, 8)])
def test_auto_pad_becomes_explicit_pads(mode, kernel, stride, dilation, size):
    if dilation > 1 and mode != "VALID":
        pytest.skip("onnxruntime runs no dilated SAME conv to compare with")
    rng = np.random.default_rng(kernel * 10 + stride)
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["y"], auto_pad=mode, strides=[stride, stride],
                              dilations=[dilation, dilation])]
    model = model_of(nodes, [f32("W", rng.standard_normal((4, 3, kernel, kernel))), f32("B", rng.standard_normal(4))],
                     (1, 3, size, size))
    canon, steps = canonicalise(model)
    assert steps["auto_pad_resolved"] == 1
    conv = canon.graph.node[0]
    attrs = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
    assert attrs.get("auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET") and "pads" in attrs
    same_outputs(model, canon, (1, 3, size, size))
    assert not analyse(canon).unsupported  # the conv is a layer now


# --------------------------------------------------------------------------- Pad before Conv


def pad_conv_model(pads, value=0.0, mode="constant", conv_pads=(0, 0, 0, 0), opset=DEFAULT_OPSET, two_readers=False):
    rng = np.random.default_rng(1)
    inits = [f32("W", rng.standard_normal((4, 3, 3, 3))), f32("B", rng.standard_normal(4))]
    if opset >= 11:
        inits += [i64("pads", pads), f32("value", value)]
        pad = helper.make_node("Pad", ["x", "pads", "value"], ["p"], mode=mode)
    else:
        pad = helper.make_node("Pad", ["x"], ["p"], mode=mode, pads=list(pads), value=value)
    nodes = [pad, helper.make_node("Conv", ["p", "W", "B"], ["c"], pads=list(conv_pads)),
             helper.make_node("Relu", ["c"], ["y" if not two_readers else "r"])]
    if two_readers:
        inits.append(f32("W2", rng.standard_normal((4, 3, 3, 3))))
        nodes += [helper.make_node("Conv", ["p", "W2"], ["c2"]), helper.make_node("Add", ["r", "c2"], ["y"])]
    return model_of(nodes, inits, (1, 3, 8, 8), opset=opset)


@pytest.mark.parametrize("pads,conv_pads,opset", [
    ([0, 0, 1, 1, 0, 0, 1, 1], (0, 0, 0, 0), DEFAULT_OPSET),   # symmetric
    ([0, 0, 0, 0, 0, 0, 1, 1], (0, 0, 0, 0), DEFAULT_OPSET),   # TF "same" for stride 2: end only
    ([0, 0, 2, 0, 0, 0, 1, 3], (1, 1, 1, 1), DEFAULT_OPSET),   # added to the conv's own pads
    ([0, 0, 1, 1, 0, 0, 1, 1], (0, 0, 0, 0), 10),              # pads as an attribute
])
def test_zero_pad_folds_into_the_conv(pads, conv_pads, opset):
    model = pad_conv_model(pads, conv_pads=conv_pads, opset=opset)
    canon, steps = canonicalise(model)
    assert steps["pad_folded"] == 1 and "Pad" not in ops(canon)
    same_outputs(model, canon, (1, 3, 8, 8))


def test_zero_pad_read_by_two_convs_folds_into_both():
    model = pad_conv_model([0, 0, 1, 1, 0, 0, 1, 1], two_readers=True)
    canon, steps = canonicalise(model)
    assert steps["pad_folded"] == 1 and "Pad" not in ops(canon)
    same_outputs(model, canon, (1, 3, 8, 8))


@pytest.mark.parametrize("kwargs", [{"value": 1.5}, {"mode": "reflect"}, {"pads": [1, 0, 1, 1, 0, 0, 1, 1]},
                                    {"pads": [0, 0, -1, 0, 0, 0, 1, 1]}])
def test_pads_that_are_not_conv_padding_stay(kwargs):
    kwargs = {"pads": [0, 0, 1, 1, 0, 0, 1, 1]} | kwargs
    model = pad_conv_model(**kwargs)
    canon, steps = canonicalise(model)
    assert steps["pad_folded"] == 0 and "Pad" in ops(canon)
    same_outputs(model, canon, (1, 3, 8, 8))


def test_efficientnet_lite_style_pads_no_longer_end_chains():
    """Pad -> Conv 3x3 s2 -> Relu6 -> Pad -> depthwise 3x3 -> Relu6 -> Conv 1x1: one chain, no Pad stop."""
    rng = np.random.default_rng(2)
    inits = [i64("p_end", [0, 0, 0, 0, 0, 0, 1, 1]), i64("p_both", [0, 0, 1, 1, 0, 0, 1, 1]),
             f32("W1", rng.standard_normal((8, 3, 3, 3))), f32("W2", rng.standard_normal((8, 1, 3, 3))),
             f32("W3", rng.standard_normal((4, 8, 1, 1))), f32("lo", 0.0), f32("hi", 6.0)]
    nodes = [helper.make_node("Pad", ["x", "p_end"], ["p1"]),
             helper.make_node("Conv", ["p1", "W1"], ["c1"], strides=[2, 2]),
             helper.make_node("Clip", ["c1", "lo", "hi"], ["a1"]),
             helper.make_node("Pad", ["a1", "p_both"], ["p2"]),
             helper.make_node("Conv", ["p2", "W2"], ["c2"], group=8),
             helper.make_node("Clip", ["c2", "lo", "hi"], ["a2"]),
             helper.make_node("Conv", ["a2", "W3"], ["y"])]
    model = model_of(nodes, inits, (1, 3, 16, 16))
    canon, steps = canonicalise(model)
    assert steps["pad_folded"] == 2
    analysis = analyse(canon)
    assert "Pad" not in analysis.stops and [len(c) for c in analysis.chains] == [3]
    same_outputs(model, canon, (1, 3, 16, 16))


# --------------------------------------------------------------------------- per-channel Mul/Add after Conv


@pytest.mark.parametrize("chain", [
    [("Mul", (1, 4, 1, 1))], [("Add", (4, 1, 1))], [("Mul", (4, 1, 1)), ("Add", (1, 4, 1, 1))],
    [("Div", (1, 4, 1, 1)), ("Sub", ())], [("Mul", (1,))], [("Add", (1, 1, 1, 1))],
])
@pytest.mark.parametrize("group,bias", [(1, True), (1, False), (2, True)])
def test_per_channel_affine_folds_into_the_conv(chain, group, bias):
    rng = np.random.default_rng(len(chain) + group)
    inits = [f32("W", rng.standard_normal((4, 4 // group, 3, 3)))]
    conv_inputs = ["x", "W"]
    if bias:
        inits.append(f32("B", rng.standard_normal(4)))
        conv_inputs.append("B")
    nodes = [helper.make_node("Conv", conv_inputs, ["t0"], pads=[1, 1, 1, 1], group=group)]
    for k, (op, shape) in enumerate(chain):
        inits.append(f32(f"k{k}", rng.uniform(0.5, 1.5, shape)))
        args = [f"t{k}", f"k{k}"] if op in ("Div", "Sub") or k % 2 == 0 else [f"k{k}", f"t{k}"]
        nodes.append(helper.make_node(op, args, [f"t{k + 1}"]))
    nodes.append(helper.make_node("Relu", [f"t{len(chain)}"], ["y"]))
    model = model_of(nodes, inits, (1, 4, 6, 6))
    canon, steps = canonicalise(model)
    assert steps["channel_affine_folded"] == len(chain)
    assert ops(canon) == ["Conv", "Relu"]
    same_outputs(model, canon, (1, 4, 6, 6))


@pytest.mark.parametrize("op,shape,first", [("Mul", (1, 4, 6, 6), True), ("Add", (1, 1, 1, 6), True),
                                            ("Sub", (1, 4, 1, 1), False), ("Div", (1, 4, 1, 1), False)])
def test_non_channel_constants_stay(op, shape, first):
    rng = np.random.default_rng(3)
    inits = [f32("W", rng.standard_normal((4, 4, 3, 3))), f32("k", rng.uniform(0.5, 1.5, shape))]
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node(op, ["c", "k"] if first else ["k", "c"], ["y"])]
    model = model_of(nodes, inits, (1, 4, 6, 6))
    canon, steps = canonicalise(model)
    assert steps["channel_affine_folded"] == 0 and op in ops(canon)
    same_outputs(model, canon, (1, 4, 6, 6))


# --------------------------------------------------------------------------- Gemm


@pytest.mark.parametrize("alpha,beta,trans_a,trans_b,c_shape", [
    (0.5, 2.0, 0, 0, (5,)), (1.0, 0.25, 1, 0, (1, 5)), (3.0, 1.0, 1, 1, None), (1.0, 1.0, 1, 1, (5,)),
])
def test_gemm_alpha_beta_trans_a_are_made_plain(alpha, beta, trans_a, trans_b, c_shape):
    rng = np.random.default_rng(4)
    x_shape = (6, 2) if trans_a else (2, 6)
    inits = [f32("B1", rng.standard_normal((5, 6) if trans_b else (6, 5))), f32("B2", rng.standard_normal((5, 3)))]
    inputs = ["x", "B1"]
    if c_shape is not None:
        inits.append(f32("C1", rng.standard_normal(c_shape)))
        inputs.append("C1")
    nodes = [helper.make_node("Gemm", inputs, ["g"], alpha=alpha, beta=beta, transA=trans_a, transB=trans_b),
             helper.make_node("Gemm", ["g", "B2"], ["y"], alpha=0.5)]
    model = model_of(nodes, inits, x_shape, y_rank=2)
    canon, steps = canonicalise(model)
    assert steps["gemm_normalised"] == 2
    for node in canon.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Gemm":
            assert attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0 and not attrs.get("transA", 0)
    analysis = analyse(canon)
    assert not analysis.unsupported and sum(len(c) for c in analysis.chains) == 2
    same_outputs(model, canon, x_shape)


# --------------------------------------------------------------------------- wrapped MatMul / Gemm


@pytest.mark.parametrize("flatten", [False, True])
def test_reshape_wrapped_matmuls_become_one_chain(flatten):
    """(1, 4, 8) -> Reshape (4, 8) -> MatMul -> Reshape (1, 4, 16) -> Reshape or Flatten (4, 16) -> MatMul."""
    rng = np.random.default_rng(5)
    inits = [i64("s2", [4, -1]), i64("s3", [1, 4, 16]), i64("s3b", [1, 4, 6]),
             f32("W1", rng.standard_normal((8, 16))), f32("W2", rng.standard_normal((16, 6))),
             f32("b2", rng.standard_normal(6))]
    back = (helper.make_node("Flatten", ["r2"], ["r3"], axis=2) if flatten
            else helper.make_node("Reshape", ["r2", "s2"], ["r3"]))
    nodes = [helper.make_node("Reshape", ["x", "s2"], ["r1"]), helper.make_node("MatMul", ["r1", "W1"], ["m1"]),
             helper.make_node("Reshape", ["m1", "s3"], ["r2"]), back,
             helper.make_node("MatMul", ["r3", "W2"], ["m2"]), helper.make_node("Add", ["m2", "b2"], ["a2"]),
             helper.make_node("Reshape", ["a2", "s3b"], ["y"])]
    model = model_of(nodes, inits, (1, 4, 8), y_rank=3)
    canon, steps = canonicalise(model)
    assert steps["layout_round_trips_removed"] >= 1
    assert [len(c) for c in analyse(canon).chains] == [2]
    same_outputs(model, canon, (1, 4, 8))


def test_transpose_wrapped_matmuls_become_one_chain():
    """(1, C, T) -> Transpose -> MatMul -> Transpose, twice (channels-first token mixers)."""
    rng = np.random.default_rng(6)
    inits = [f32("W1", rng.standard_normal((6, 10))), f32("W2", rng.standard_normal((10, 6)))]
    nodes = [helper.make_node("Transpose", ["x"], ["t1"], perm=[0, 2, 1]),
             helper.make_node("MatMul", ["t1", "W1"], ["m1"]),
             helper.make_node("Transpose", ["m1"], ["t2"], perm=[0, 2, 1]),
             helper.make_node("Transpose", ["t2"], ["t3"], perm=[0, 2, 1]),
             helper.make_node("MatMul", ["t3", "W2"], ["m2"]),
             helper.make_node("Transpose", ["m2"], ["y"], perm=[0, 2, 1])]
    model = model_of(nodes, inits, (1, 6, 5), y_rank=3)
    canon, steps = canonicalise(model)
    assert steps["layout_round_trips_removed"] == 1
    assert [len(c) for c in analyse(canon).chains] == [2]
    same_outputs(model, canon, (1, 6, 5))


def test_transposes_that_do_not_cancel_stay():
    rng = np.random.default_rng(7)
    nodes = [helper.make_node("Transpose", ["x"], ["t1"], perm=[0, 2, 3, 1]),
             helper.make_node("Transpose", ["t1"], ["t2"], perm=[0, 2, 3, 1]),
             helper.make_node("MatMul", ["t2", "W"], ["y"])]
    model = model_of(nodes, [f32("W", rng.standard_normal((5, 3)))], (1, 3, 5, 4))
    canon, steps = canonicalise(model)
    assert steps["layout_round_trips_removed"] == 0
    same_outputs(model, canon, (1, 3, 5, 4))
