"""Analysis: chains, units, residual spans and activation recognition, on the zoo and on tiny models."""
from __future__ import annotations

import functools
import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from lmopt.analysis import analyse
from lmopt.loader import canonicalise
from models import zoo

SIZE = 32


@functools.lru_cache(maxsize=None)
def canonical(name: str) -> onnx.ModelProto:
    return canonicalise(zoo.build(name, image_size=SIZE))[0]


def skips(chain):
    """(unit k, position the shortcut starts from, has a projection) for each residual unit."""
    return [(k, u.skip.position, u.skip.projection is not None) for k, u in enumerate(chain.units, 1) if u.skip]


# --------------------------------------------------------------------------- zoo structure


def test_resnet18_structure():
    a = analyse(canonical("resnet18"))
    assert [(c.kind, len(c)) for c in a.chains] == [("conv", 1), ("conv", 16), ("dense", 1)]
    body = a.chains[1]
    # 8 basic blocks: each residual spans two convs; blocks 3, 5, 7 (layer2-4 .0) have projections
    assert skips(body) == [(2, 0, False), (4, 2, False), (6, 4, True), (8, 6, False),
                           (10, 8, True), (12, 10, False), (14, 12, True), (16, 14, False)]
    assert all(u.act is not None and u.act.kind == "relu" for u in body.units)
    assert a.activations == {"relu": 17}  # stem + 16
    assert a.chains[2].units[0].act is None  # logits
    assert a.stops == {"MaxPool": 1, "GlobalAveragePool": 1, "Flatten": 1}
    assert a.unsupported == []
    # stride-1 same-shape convs are prunable, the strided ones and the channel-changers are not
    strided = {5, 9, 13}
    assert [k for k, u in enumerate(body.units, 1) if not u.prunable] == sorted(strided)
    # positions are the tensors between units; the chain starts at the MaxPool output
    graph_nodes = {n.name: n for n in canonical("resnet18").graph.node}
    first = graph_nodes[body.units[0].layer]
    assert body.positions[0] == first.input[0]
    assert len(body.positions) == 17


def test_mobilenetv2_structure():
    a = analyse(canonical("mobilenetv2_1.0"))
    assert [(c.kind, len(c)) for c in a.chains] == [("conv", 52), ("dense", 1)]
    chain = a.chains[0]
    spans = skips(chain)
    assert len(spans) == 10
    assert all(not proj and k - p == 3 for k, p, proj in spans)  # identity skip over expand-dw-project
    # only the linear 1x1 projection that ends each inverted-residual block has no activation
    no_act = [k for k, u in enumerate(chain.units, 1) if u.act is None]
    assert len(no_act) == 17  # 17 inverted-residual blocks, each ends with a linear 1x1
    assert a.activations == {"relu6": 35}
    groups = {n.name: next((at.i for at in n.attribute if at.name == "group"), 1)
              for n in canonical("mobilenetv2_1.0").graph.node if n.op_type == "Conv"}
    assert sum(1 for u in chain.units if groups[u.layer] > 1) == 17  # depthwise convs stay on the chain


def test_vit_tiny_mlp_structure():
    a = analyse(canonical("vit_tiny_mlp"))
    mlp = [c for c in a.chains if len(c) == 2]
    assert len(mlp) == 12 and all(c.kind == "dense" for c in mlp)
    for chain in mlp:
        fc1, fc2 = chain.units
        assert fc1.op == fc2.op == "MatMul"
        assert fc1.bias_add is not None and fc2.bias_add is not None
        assert fc1.act is not None and fc1.act.kind == "gelu" and len(fc1.act.nodes) == 5
        assert fc2.act is None
        # the residual Add's shortcut comes from before the chain (the block input, before LayerNorm)
        assert fc2.skip is not None and fc2.skip.position is None and fc2.skip.projection is None
        assert fc1.in_shape == (1, 5, 192) and fc1.out_shape == (1, 5, 768)
    assert a.activations == {"gelu": 12}
    assert a.stops.get("LayerNormalization") == 13


def test_vgg19_structure():
    a = analyse(canonical("vgg19_bn"))
    assert [(c.kind, len(c)) for c in a.chains] == [("conv", 2), ("conv", 2), ("conv", 4), ("conv", 4),
                                                     ("conv", 4), ("dense", 3)]
    assert a.stops == {"MaxPool": 5, "Flatten": 1}
    assert all(u.skip is None for c in a.chains for u in c.units)


def test_resnet50_bottleneck_projections():
    a = analyse(canonical("resnet50"))
    body = a.chains[1]
    assert len(body) == 48
    spans = skips(body)
    assert len(spans) == 16
    assert [k for k, _, proj in spans if proj] == [3, 12, 24, 42]  # first block of each stage
    assert all(k - p == 3 for k, p, _ in spans)


# --------------------------------------------------------------------------- activation forms

C = 4


def f32(name, value):
    return numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)


class _Act:
    """Builds conv -> <activation written some way> -> conv."""

    def __init__(self):
        self.nodes, self.inits, self.n = [], [], 0

    def const(self, value, as_node=False):
        self.n += 1
        name = f"k{self.n}"
        if as_node:
            self.nodes.append(helper.make_node("Constant", [], [name], value=f32(name, value)))
        else:
            self.inits.append(f32(name, value))
        return name

    def op(self, op, inputs, **attrs):
        self.n += 1
        out = f"t{self.n}"
        self.nodes.append(helper.make_node(op, inputs, [out], **attrs))
        return out


def _relu(b, x):
    return b.op("Relu", [x])


def _relu6_clip_inputs(b, x):  # opset >= 11: bounds as inputs, from Constant nodes as torch writes them
    return b.op("Clip", [x, b.const(0.0, True), b.const(6.0, True)])


def _relu_clip_min_only(b, x):
    return b.op("Clip", [x, b.const(0.0)])


def _hardswish_op(b, x):
    return b.op("HardSwish", [x])


def _x_times_hardsigmoid(b, x):
    return b.op("Mul", [x, b.op("HardSigmoid", [x], alpha=1 / 6, beta=0.5)])


def _x_clip_div6(b, x):  # x * Clip(x + 3, 0, 6) / 6
    t = b.op("Add", [x, b.const(3.0)])
    t = b.op("Clip", [t, b.const(0.0), b.const(6.0)])
    t = b.op("Mul", [x, t])
    return b.op("Div", [t, b.const(6.0)])


def _x_clip_mul_sixth(b, x):  # x * (Clip(x + 3, 0, 6) * (1/6))
    t = b.op("Add", [x, b.const(3.0)])
    t = b.op("Clip", [t, b.const(0.0), b.const(6.0)])
    t = b.op("Mul", [t, b.const(1 / 6)])
    return b.op("Mul", [x, t])


def _silu(b, x):
    return b.op("Mul", [x, b.op("Sigmoid", [x])])


def _gelu_op(b, x):  # opset 20
    return b.op("Gelu", [x])


def _gelu_erf_div(b, x):  # torch: x * 0.5 * (1 + erf(x / sqrt(2)))
    t = b.op("Div", [x, b.const(math.sqrt(2.0))])
    t = b.op("Erf", [t])
    t = b.op("Add", [t, b.const(1.0)])
    t = b.op("Mul", [x, t])
    return b.op("Mul", [t, b.const(0.5)])


def _gelu_erf_mul(b, x):  # x * (1 + erf(x * 1/sqrt(2))) * 0.5
    t = b.op("Mul", [x, b.const(1 / math.sqrt(2.0))])
    t = b.op("Erf", [t])
    t = b.op("Add", [t, b.const(1.0)])
    t = b.op("Mul", [x, t])
    return b.op("Mul", [t, b.const(0.5)])


def _leaky(b, x):
    return b.op("LeakyRelu", [x], alpha=0.1)


def _prelu(b, x):
    return b.op("PRelu", [x, b.const(np.linspace(0.05, 0.3, C).reshape(C, 1, 1))])


def _sigmoid(b, x):
    return b.op("Sigmoid", [x])


def _tanh(b, x):
    return b.op("Tanh", [x])


ACTIVATIONS = [
    (_relu, "relu", 17),
    (_relu6_clip_inputs, "relu6", 17),
    (_relu_clip_min_only, "relu", 17),
    (_hardswish_op, "hardswish", 17),
    (_x_times_hardsigmoid, "hardswish", 17),
    (_x_clip_div6, "hardswish", 17),
    (_x_clip_mul_sixth, "hardswish", 17),
    (_silu, "silu", 17),
    (_gelu_op, "gelu", 20),
    (_gelu_erf_div, "gelu", 17),
    (_gelu_erf_mul, "gelu", 17),
    (_leaky, "leaky_relu", 17),
    (_prelu, "prelu", 17),
    (_sigmoid, "sigmoid", 17),
    (_tanh, "tanh", 17),
]


def act_model(build_act, opset=17, seed=0):
    rng = np.random.default_rng(seed)
    b = _Act()
    b.inits += [f32("W1", rng.standard_normal((C, 3, 3, 3))), f32("B1", rng.standard_normal(C)),
                f32("W2", rng.standard_normal((5, C, 1, 1)))]
    b.nodes.append(helper.make_node("Conv", ["x", "W1", "B1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"))
    a = build_act(b, "c1")
    b.nodes.append(helper.make_node("Conv", [a, "W2"], ["y"], name="conv2"))
    graph = helper.make_graph(b.nodes, "act", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5, 8, 8])], b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize("build_act,kind,opset", ACTIVATIONS, ids=[a[0].__name__.strip("_") for a in ACTIVATIONS])
def test_activation_forms_are_recognised(build_act, kind, opset):
    model = act_model(build_act, opset)
    raw_act_nodes = len(model.graph.node) - 2 - sum(1 for n in model.graph.node if n.op_type == "Constant")
    canon, _ = canonicalise(model)
    a = analyse(canon)
    assert len(a.chains) == 1 and len(a.chains[0]) == 2, "the activation must not split the chain"
    unit = a.chains[0].units[0]
    assert unit.act is not None
    assert unit.act.kind == kind
    assert len(unit.act.nodes) == raw_act_nodes  # the whole region, no more
    names = {n.name: n for n in canon.graph.node}
    assert unit.act.output in names["conv2"].input[0:1]
    assert a.chains[0].units[1].act is None and a.activations == {kind: 1}


def test_clip_with_other_bounds_is_clip_not_relu6():
    model = act_model(lambda b, x: b.op("Clip", [x, b.const(-1.0), b.const(1.0)]))
    a = analyse(canonicalise(model)[0])
    assert a.chains[0].units[0].act.kind == "clip"


def test_preactivation_read_elsewhere_is_no_activation_unit():
    """conv1 -> Relu -> conv2 where conv1's output is also a graph output: the region has two exits."""
    model = act_model(_relu)
    model.graph.output.append(helper.make_tensor_value_info("c1", TensorProto.FLOAT, [1, C, 8, 8]))
    a = analyse(canonicalise(model)[0])
    first = next(c for c in a.chains if c.units[0].layer == "conv1")
    assert len(first) == 1 and first.units[0].act is None


def test_nonlinear_op_that_is_not_elementwise_stops_the_chain():
    model = act_model(lambda b, x: b.op("MaxPool", [x], kernel_shape=[1, 1]))
    a = analyse(canonicalise(model)[0])
    assert [len(c) for c in a.chains] == [1, 1]
    assert a.stops == {"MaxPool": 1}


def test_dynamic_weight_is_reported_unsupported():
    """A Conv whose weight is a graph input cannot be merged: reported, not on a chain."""
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], name="dyn")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8]),
                                           helper.make_tensor_value_info("w", TensorProto.FLOAT, [2, 3, 1, 1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 8, 8])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    a = analyse(canonicalise(model)[0])
    assert a.chains == [] and any("dyn" in r and "weight" in r for r in a.unsupported)


def mixed_model():
    """conv 1x1 -> Relu -> MatMul -> Relu -> MatMul on the 4-D map (a Linear over the last axis)."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "W1"], ["a"], name="conv"), helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("MatMul", ["r", "M1"], ["m1"], name="mm1"), helper.make_node("Relu", ["m1"], ["r2"]),
             helper.make_node("MatMul", ["r2", "M2"], ["y"], name="mm2")]
    inits = [f32("W1", rng.standard_normal((4, 3, 1, 1))), f32("M1", rng.standard_normal((8, 6)) / 3),
             f32("M2", rng.standard_normal((6, 5)) / 3)]
    graph = helper.make_graph(nodes, "mixed", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_mixed_conv_dense_run_splits_into_chains():
    """A Conv feeding MatMuls: the conv part and the dense part are separate chains, each labelled
    with its own kind, and no layer is lost."""
    a = analyse(canonicalise(mixed_model())[0])
    assert [(c.kind, [u.layer for u in c.units]) for c in a.chains] == [("conv", ["conv"]), ("dense", ["mm1", "mm2"])]
    assert a.stops == {}
    assert a.chains[1].units[0].act.kind == "relu"


@pytest.mark.parametrize("node,inits,x_shape,needle", [  # auto_pad and transA: canonicalised (test_canonical.py)
    (helper.make_node("MatMul", ["x", "W"], ["y"], name="batched"), [("W", (2, 4, 4))], [2, 3, 4], "2-D"),
], ids=["3-D weight"])
def test_linear_layers_lmopt_cannot_merge_are_reported(node, inits, x_shape, needle):
    rng = np.random.default_rng(1)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * len(x_shape))],
                              [f32(n, rng.standard_normal(s)) for n, s in inits])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    a = analyse(canonicalise(model)[0])
    assert a.chains == []
    assert any(node.name in r and needle in r for r in a.unsupported), a.unsupported
