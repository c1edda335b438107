"""Loader / canonicalisation: every rewrite it does keeps the outputs, and bad shapes fail clearly.

Numeric comparisons run both models in onnxruntime; the tolerance is 1e-4 relative to the
largest output magnitude (`chains.assert_close`) unless a test says otherwise.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from chains import assert_close, rel_err
from chains import run as _run
from onnx import TensorProto, helper, numpy_helper

from lmopt.errors import LmoptError
from lmopt.loader import canonicalise, parse_input_shapes
from lmopt.onnxio import DEFAULT_OPSET, max_ir_version
from models import zoo

TOL = 1e-4


def f32(name, array):
    return numpy_helper.from_array(np.asarray(array, dtype=np.float32), name)


def model_of(nodes, inits, x_shape=(1, 3, 8, 8), y_shape=None, opset=DEFAULT_OPSET, ir_version=None,
             x_name="x", y_name="y"):
    """A one-input one-output model; y's shape defaults to all-unknown dims of x's rank."""
    y_shape = [None] * len(x_shape) if y_shape is None else y_shape
    graph = helper.make_graph(nodes, "t", [helper.make_tensor_value_info(x_name, TensorProto.FLOAT, list(x_shape))],
                              [helper.make_tensor_value_info(y_name, TensorProto.FLOAT, list(y_shape))], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    if ir_version is not None:
        model.ir_version = ir_version
    return model


def run(model, x):
    """Run in onnxruntime (a copy clamped to an IR version it loads: onnx.helper writes a newer one)."""
    copy = onnx.ModelProto.FromString(model.SerializeToString())
    copy.ir_version = min(copy.ir_version, max_ir_version())
    return _run(copy, x)


def ops(model):
    return [n.op_type for n in model.graph.node]


def sample(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def conv_bn_model(eps, rng, groups=1, conv_bias=False, ir_version=None):
    cin, cout = 4, 4
    nodes, inits = [], []
    conv_in = ["x", "W"] + (["B"] if conv_bias else [])
    nodes.append(helper.make_node("Conv", conv_in, ["c"], pads=[1, 1, 1, 1], group=groups, name="conv"))
    inits.append(f32("W", rng.standard_normal((cout, cin // groups, 3, 3))))
    if conv_bias:
        inits.append(f32("B", rng.standard_normal(cout)))
    nodes.append(helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["y"], epsilon=eps, name="bn"))
    inits += [f32("g", rng.uniform(0.5, 1.5, cout)), f32("b", rng.standard_normal(cout)),
              f32("m", rng.standard_normal(cout)), f32("v", rng.uniform(0.001, 0.05, cout))]
    return model_of(nodes, inits, (1, cin, 8, 8), ir_version=ir_version)


# --------------------------------------------------------------------------- BatchNormalization


@pytest.mark.parametrize("groups,conv_bias", [(1, False), (1, True), (4, False), (2, True)])
def test_batchnorm_fold_uses_the_nodes_epsilon(groups, conv_bias):
    rng = np.random.default_rng(groups * 10 + conv_bias)
    eps = 0.37  # far from the 1e-5 default: a fold that ignores the attribute is visibly wrong
    model = conv_bn_model(eps, rng, groups, conv_bias)
    canon, steps = canonicalise(model)
    assert steps["batchnorm_folded"] == 1
    assert ops(canon) == ["Conv"]
    x = sample((1, 4, 8, 8))
    ref = run(model, x)
    assert_close(run(canon, x), ref, TOL, "BN folded")
    # the same fold with the default epsilon would be far off: the test can see a wrong epsilon
    wrong = conv_bn_model(1e-5, np.random.default_rng(groups * 10 + conv_bias), groups, conv_bias)
    assert rel_err(run(wrong, x), ref) > 100 * TOL


def test_batchnorm_kept_when_the_conv_output_has_other_readers():
    rng = np.random.default_rng(3)
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["n"], epsilon=0.1),
             helper.make_node("Add", ["n", "c"], ["y"])]
    inits = [f32("W", rng.standard_normal((4, 4, 3, 3))), f32("g", rng.uniform(0.5, 1.5, 4)),
             f32("b", rng.standard_normal(4)), f32("m", rng.standard_normal(4)), f32("v", rng.uniform(0.1, 1, 4))]
    model = model_of(nodes, inits, (1, 4, 8, 8))
    canon, steps = canonicalise(model)
    assert steps["batchnorm_folded"] == 0
    x = sample((1, 4, 8, 8))
    assert_close(run(canon, x), run(model, x), TOL)


@pytest.mark.parametrize("name", ["resnet18", "mobilenetv2_1.0", "vit_tiny_mlp"])
def test_zoo_canonical_equals_original(name):
    model = zoo.build(name, image_size=32)
    canon, steps = canonicalise(model)
    n_bn = sum(1 for n in model.graph.node if n.op_type == "BatchNormalization")
    assert steps["batchnorm_folded"] == n_bn
    assert "BatchNormalization" not in ops(canon) and "Constant" not in ops(canon)
    x = sample(zoo.input_shape(name, image_size=32), seed=1)
    assert_close(run(canon, x), run(model, x), TOL, name)
    onnx.checker.check_model(canon)


# --------------------------------------------------------------------------- pass-through nodes


def test_identity_and_dropout_removed_outputs_equal():
    rng = np.random.default_rng(4)
    nodes = [helper.make_node("Conv", ["x", "W1"], ["a"], pads=[1, 1, 1, 1]),
             helper.make_node("Identity", ["a"], ["b"]),
             helper.make_node("Relu", ["b"], ["c"]),
             helper.make_node("Dropout", ["c", "ratio", "train"], ["d"]),   # opset 12+ form, inference mode
             helper.make_node("Dropout", ["d"], ["e", "mask"]),              # with an unread mask output
             helper.make_node("Conv", ["e", "W2"], ["y"])]
    inits = [f32("W1", rng.standard_normal((4, 3, 3, 3))), f32("W2", rng.standard_normal((5, 4, 1, 1))),
             f32("ratio", 0.5), numpy_helper.from_array(np.array(False), "train")]
    model = model_of(nodes, inits)
    canon, steps = canonicalise(model)
    assert steps["passthrough_removed"] == 3
    assert ops(canon) == ["Conv", "Relu", "Conv"]
    x = sample((1, 3, 8, 8))
    assert_close(run(canon, x), run(model, x), TOL)


def test_identity_at_graph_output_keeps_the_output_name():
    rng = np.random.default_rng(5)
    nodes = [helper.make_node("Conv", ["x", "W"], ["a"]), helper.make_node("Identity", ["a"], ["y"])]
    model = model_of(nodes, [f32("W", rng.standard_normal((2, 3, 1, 1)))])
    canon, _ = canonicalise(model)
    assert [o.name for o in canon.graph.output] == ["y"]
    x = sample((1, 3, 8, 8))
    assert_close(run(canon, x), run(model, x), TOL)


# --------------------------------------------------------------------------- constants


def test_constant_node_feeding_conv_weight_is_folded():
    rng = np.random.default_rng(6)
    weight = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Constant", [], ["W"], value=numpy_helper.from_array(weight)),
             helper.make_node("Conv", ["x", "W"], ["y"], pads=[1, 1, 1, 1])]
    model = model_of(nodes, [])
    canon, _ = canonicalise(model)
    assert ops(canon) == ["Conv"]
    conv = canon.graph.node[0]
    inits = {i.name: numpy_helper.to_array(i) for i in canon.graph.initializer}
    np.testing.assert_array_equal(inits[conv.input[1]], weight)
    x = sample((1, 3, 8, 8))
    assert_close(run(canon, x), run(model, x), TOL)


@pytest.mark.parametrize("ir_version", [8, None])  # None: what onnx.helper writes (IR 14 with onnx 1.23)
def test_constant_subgraph_folded_at_new_ir_version(ir_version):
    """Constant -> Mul -> Conv weight folds to one initializer, also for a model whose IR version is
    newer than onnxruntime loads (the folder runs ORT, which refuses such a model: folding must not
    silently give up there)."""
    rng = np.random.default_rng(7)
    weight = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Constant", [], ["W0"], value=numpy_helper.from_array(weight)),
             helper.make_node("Constant", [], ["two"], value=numpy_helper.from_array(np.float32(2.0))),
             helper.make_node("Mul", ["W0", "two"], ["W"]),
             helper.make_node("Conv", ["x", "W"], ["y"], pads=[1, 1, 1, 1])]
    model = model_of(nodes, [], ir_version=ir_version)
    canon, _ = canonicalise(model)
    assert ops(canon) == ["Conv"]
    inits = {i.name: numpy_helper.to_array(i) for i in canon.graph.initializer}
    np.testing.assert_allclose(inits[canon.graph.node[0].input[1]], 2 * weight, rtol=1e-6)
    x = sample((1, 3, 8, 8))
    assert_close(run(canon, x), run(model, x), TOL)


# --------------------------------------------------------------------------- IR version, external data


def test_written_ir_version_is_loadable_by_onnxruntime():
    model = conv_bn_model(1e-3, np.random.default_rng(8), ir_version=onnx.IR_VERSION)
    canon, _ = canonicalise(model)
    assert canon.ir_version <= max_ir_version()
    run(canon, sample((1, 4, 8, 8)))  # onnxruntime accepts it


def test_external_data_model_loads(tmp_path, monkeypatch):
    rng = np.random.default_rng(9)
    model = conv_bn_model(1e-3, rng, ir_version=8)
    path = tmp_path / "sub" / "ext.onnx"
    path.parent.mkdir()
    # save_model moves the tensors of the object it is given to external data: save a copy
    onnx.save_model(onnx.ModelProto.FromString(model.SerializeToString()), str(path), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="ext.onnx.data", size_threshold=0)
    assert (path.parent / "ext.onnx.data").stat().st_size > 0
    stored = onnx.load(str(path), load_external_data=False)
    assert any(i.data_location == TensorProto.EXTERNAL for i in stored.graph.initializer)
    monkeypatch.chdir(tmp_path)  # the data file is found next to the model, not in the cwd
    canon, steps = canonicalise(path)
    assert steps["batchnorm_folded"] == 1
    x = sample((1, 4, 8, 8))
    assert_close(run(canon, x), run(model, x), TOL)


def test_missing_external_data_is_a_clear_error(tmp_path):
    model = conv_bn_model(1e-3, np.random.default_rng(10), ir_version=8)
    path = tmp_path / "ext.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, location="ext.data", size_threshold=0)
    (tmp_path / "ext.data").unlink()
    with pytest.raises(LmoptError, match="ext.onnx"):
        canonicalise(path)


# --------------------------------------------------------------------------- dynamic dims


def dynamic_model():
    """Conv with a symbolic batch and height, as exporters write them."""
    rng = np.random.default_rng(11)
    nodes = [helper.make_node("Conv", ["images", "W"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["out"])]
    graph = helper.make_graph(nodes, "dyn",
                              [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, "H", 32])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 4, "H", 32])],
                              [f32("W", rng.standard_normal((4, 3, 3, 3)))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", DEFAULT_OPSET)])
    model.ir_version = 8
    return model


def test_dynamic_dims_need_input_shape():
    with pytest.raises(LmoptError, match="--input-shape") as info:
        canonicalise(dynamic_model())
    assert "images" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("spec", ["images:1,3,32,32", "1,3,32,32", "images:2,3,16,32"])
def test_dynamic_dims_fixed_by_input_shape(spec):
    model = dynamic_model()
    canon, _ = canonicalise(model, parse_input_shapes([spec]))
    dims = [d.dim_value for d in canon.graph.input[0].type.tensor_type.shape.dim]
    want = [int(v) for v in spec.split(":")[-1].split(",")]
    assert dims == want
    out_dims = [d.dim_value for d in canon.graph.output[0].type.tensor_type.shape.dim]
    assert out_dims == [want[0], 4, want[2], 32]  # re-inferred with the static shape
    x = sample(want)
    assert_close(run(canon, x), run(model, x), TOL)


@pytest.mark.parametrize("specs,message", [
    (["images:1,3,32,31"], "conflicts"),              # width is static 32 in the model
    (["images:1,3,32"], "rank"),
    (["other:1,3,32,32"], "other"),
    (["images:1,3,x,32"], "expected"),
    (["images:1,3,0,32"], "positive"),
    (["images:-1,3,32,32"], "expected"),
    (["images:"], "expected"),
    (["images:1,3,32,32", "images:2,3,32,32"], "conflicts"),
    (["1,3,32,32", "images:2,3,32,32"], "conflicts"),
])
def test_bad_input_shape_specs(specs, message):
    with pytest.raises(LmoptError, match=message) as info:
        canonicalise(dynamic_model(), parse_input_shapes(specs))
    assert "\n" not in str(info.value)


def test_repeated_identical_input_shape_is_fine():
    canon, _ = canonicalise(dynamic_model(), parse_input_shapes(["images:1,3,8,32", "images:1,3,8,32"]))
    assert [d.dim_value for d in canon.graph.input[0].type.tensor_type.shape.dim] == [1, 3, 8, 32]


def test_bare_shape_is_ambiguous_with_two_inputs():
    nodes = [helper.make_node("Add", ["a", "b"], ["y"])]
    graph = helper.make_graph(nodes, "two", [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 4]),
                                             helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", DEFAULT_OPSET)])
    with pytest.raises(LmoptError, match="ambiguous"):
        canonicalise(model, parse_input_shapes(["2,4"]))
    with pytest.raises(LmoptError, match="'b'"):  # one input fixed, the other still dynamic
        canonicalise(model, parse_input_shapes(["a:2,4"]))
    canon, _ = canonicalise(model, parse_input_shapes(["a:2,4", "b:2,4"]))
    assert [[d.dim_value for d in i.type.tensor_type.shape.dim] for i in canon.graph.input] == [[2, 4], [2, 4]]


def test_caller_model_is_not_modified():
    model = dynamic_model()
    before = model.SerializeToString()
    canonicalise(model, parse_input_shapes(["images:1,3,32,32"]))
    assert model.SerializeToString() == before


def test_large_models_are_written_with_external_data(tmp_path, monkeypatch, capfd):
    """The > 2 GB path at a lowered threshold: `lmopt merge` reads a model whose weights are external
    and writes its result with the weights in OUT.data; the written model loads and runs."""
    from lmopt import onnxio
    from lmopt.cli import main

    rng = np.random.default_rng(12)
    nodes = [helper.make_node("Conv", ["x", "W1"], ["a"], pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["a", "W2"], ["y"])]
    inits = [f32("W1", rng.standard_normal((8, 3, 3, 3))), f32("W2", rng.standard_normal((6, 8, 1, 1)))]
    model = model_of(nodes, inits, ir_version=8)
    source = tmp_path / "in.onnx"
    onnx.save_model(onnx.ModelProto.FromString(model.SerializeToString()), str(source), save_as_external_data=True,
                    location="in.onnx.data", size_threshold=0)
    monkeypatch.setattr(onnxio, "EXTERNAL_DATA_BYTES", 500)
    out = tmp_path / "out" / "merged.onnx"
    assert main(["merge", str(source), "-o", str(out)]) == 0, capfd.readouterr().err
    assert sorted(p.name for p in out.parent.iterdir()) == ["merged.onnx", "merged.onnx.data"]  # no temp left
    stored = onnx.load(str(out), load_external_data=False)
    assert any(i.data_location == TensorProto.EXTERNAL for i in stored.graph.initializer)
    assert out.stat().st_size < 500 < (out.parent / "merged.onnx.data").stat().st_size
    x = sample((1, 3, 8, 8))
    assert_close(run(onnx.load(str(out)), x), run(model, x), TOL)
    # the in-memory model handed to save_model keeps its weights
    kept = onnx.ModelProto.FromString(model.SerializeToString())
    onnxio.save_model(kept, tmp_path / "again.onnx")
    assert all(i.data_location != TensorProto.EXTERNAL and i.raw_data for i in kept.graph.initializer)


def test_missing_shapes_come_from_one_run_except_data_dependent_ones():
    from lmopt.graph import infer_shapes
    from lmopt.passes.canonical import fill_missing_shapes

    nodes = [helper.make_node("Gelu", ["x"], ["g"], domain="com.microsoft"),  # no onnx shape inference
             helper.make_node("NonZero", ["x"], ["nz"]),                      # (2, number of non-zeros)
             helper.make_node("Cast", ["nz"], ["y"], to=TensorProto.FLOAT),
             helper.make_node("Relu", ["g"], ["r"])]
    graph = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, None]),
                               helper.make_tensor_value_info("r", TensorProto.FLOAT, [None, None])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", DEFAULT_OPSET),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    model = infer_shapes(model)
    assert fill_missing_shapes(model) == 2  # g and r; nz and y vary with the data
    shapes = {vi.name: [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
              for vi in [*model.graph.value_info, *model.graph.output]}
    assert shapes["g"] == [1, 4] and shapes["r"] == [1, 4]
    assert shapes["y"] == [2, None] and shapes.get("nz", [2, None]) == [2, None]


def test_shape_inference_of_large_models_goes_through_a_file(monkeypatch):
    """Past protobuf's 2 GiB, onnx infers shapes from a file with external data: the same answer."""
    from lmopt import onnxio

    model = conv_bn_model(1e-3, np.random.default_rng(13), ir_version=8)
    small, _ = canonicalise(model)
    calls = []
    original = onnx.shape_inference.infer_shapes_path
    monkeypatch.setattr(onnx.shape_inference, "infer_shapes_path", lambda *a, **k: calls.append(a) or original(*a, **k))
    monkeypatch.setattr(onnxio, "EXTERNAL_DATA_BYTES", 100)
    large, steps = canonicalise(model)
    assert calls and steps["batchnorm_folded"] == 1
    assert [vi.name for vi in large.graph.value_info] == [vi.name for vi in small.graph.value_info]
    x = sample((1, 4, 8, 8))
    assert_close(run(large, x), run(model, x), TOL)
