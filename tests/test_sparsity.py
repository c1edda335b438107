"""2:4 structured sparsity (lmopt.passes.sparsity).

The exact part is tested exactly: the pattern along each layer's reduction axis (derived here from
the ONNX operator definitions, not from the pass), kept weights bit-identical and the largest of
their group, untouched layers byte-identical. The approximation is measured: onnxruntime runs the
pruned model, the output error is finite and nonzero, and clearly below what pruning the largest
weights of each group would cost.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from lmopt.onnxio import DEFAULT_OPSET, runtime_compatible
from lmopt.passes.base import run_passes
from lmopt.passes.sparsity import SPARSIFY_2_4, prune_2_4, sparsify_2_4

FAST = settings(deadline=None, max_examples=40, suppress_health_check=[HealthCheck.too_slow])


def model_of(nodes, inputs, initializers=(), outputs=("y",)):
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs], list(initializers))
    return runtime_compatible(helper.make_model(graph, opset_imports=[helper.make_opsetid("", DEFAULT_OPSET)]))


def init(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def layer(kind: str, k: int, n: int, rng: np.random.Generator, weights=None, groups: int = 1, kernel: int = 1):
    """A one-layer model of `kind` summing over k inputs into n outputs, and the weight's reduction axis
    according to the operator's definition: Gemm Y = A B (B is (K, N)) or A B^T with transB=1 (B is
    (N, K)); MatMul B is (K, N); Conv W is (M, C/group, kH, kW), summed over C/group and the kernel."""
    draw = weights or (lambda shape: rng.standard_normal(shape).astype(np.float32))
    if kind == "conv":
        w = draw((n * groups, k, kernel, kernel))
        node = helper.make_node("Conv", ["x", "w"], ["y"], group=groups, name="layer")
        return model_of([node], [("x", [1, k * groups, 5, 5])], [init("w", w)]), 1
    if kind == "matmul":
        return model_of([helper.make_node("MatMul", ["x", "w"], ["y"], name="layer")], [("x", [2, 3, k])],
                        [init("w", draw((k, n)))]), 0
    trans_b = int(kind == "gemm-transB")
    w = draw((n, k) if trans_b else (k, n))
    return model_of([helper.make_node("Gemm", ["x", "w"], ["y"], transB=trans_b, name="layer")], [("x", [3, k])],
                    [init("w", w)]), int(trans_b)


def groups_along(array: np.ndarray, axis: int) -> np.ndarray:
    """The groups of 4 consecutive values along `axis`: shape (number of groups, 4)."""
    moved = np.moveaxis(array, axis, -1)
    return moved.reshape(-1, 4)


def assert_2_4(before: np.ndarray, after: np.ndarray, axis: int) -> None:
    """The 2:4 pattern along `axis`, group by group: 2 nonzero values (fewer only where the group had
    fewer), kept values bit-identical to the original, no dropped value larger in magnitude than a kept one."""
    old, new = groups_along(before, axis), groups_along(after, axis)
    np.testing.assert_array_equal(np.count_nonzero(new, axis=1), np.minimum(2, np.count_nonzero(old, axis=1)))
    kept = new != 0
    bits = np.dtype(f"u{old.dtype.itemsize}")
    np.testing.assert_array_equal(new.view(bits)[kept], old.view(bits)[kept])
    magnitude = np.abs(old)
    kept_min = np.where(kept, magnitude, np.inf).min(axis=1)
    dropped_max = np.where(kept, -np.inf, magnitude).max(axis=1)
    assert (dropped_max <= kept_min).all()


def weight(model: onnx.ModelProto, name: str = "w") -> np.ndarray:
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))


@FAST
@given(kind=st.sampled_from(["gemm", "gemm-transB", "matmul", "conv"]), k4=st.integers(1, 12),
       n=st.integers(1, 12), groups=st.integers(1, 3), kernel=st.integers(1, 3), ties=st.booleans(),
       seed=st.integers(0, 2 ** 32 - 1))
def test_pattern_holds_along_the_reduction_axis(kind, k4, n, groups, kernel, ties, seed):
    rng = np.random.default_rng(seed)
    # ties: small integers, so groups hold equal magnitudes and zeros; otherwise distinct normal values
    draw = (lambda shape: rng.integers(-2, 3, shape).astype(np.float32)) if ties else None
    model, axis = layer(kind, 4 * k4, n, rng, draw, groups, kernel)
    original = model.SerializeToString()
    pruned, info = sparsify_2_4(model, min_params=0)
    assert model.SerializeToString() == original  # the input model is not changed
    (entry,) = info["sparsified"]
    assert entry["axis"] == axis and entry["weight"] == "w" and info["skipped"] == []
    before, after = weight(model), weight(pruned)
    assert after.shape == before.shape and after.dtype == before.dtype
    assert_2_4(before, after, axis)
    assert entry["zeroed"] == np.count_nonzero(before) - np.count_nonzero(after)
    assert info["params_pruned"] == before.size // 2 == info["params_sparsified"] // 2


def test_the_pattern_check_fails_along_another_axis():
    """assert_2_4 is not vacuous: weights pruned along the wrong axis fail it along the right one."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 16)).astype(np.float32)
    with pytest.raises(AssertionError):
        assert_2_4(w, prune_2_4(w, 1), 0)
    assert_2_4(w, prune_2_4(w, 0), 0)


def test_float16_weights_keep_their_bits():
    w = np.random.default_rng(1).standard_normal((64, 96)).astype(np.float16)
    pruned = prune_2_4(w, 0)
    assert pruned.dtype == np.float16
    assert_2_4(w, pruned, 0)


def mlp(rng: np.random.Generator) -> onnx.ModelProto:
    """x (16, 128) -> Gemm transB=1 (128 -> 64) -> Relu -> MatMul (64 -> 32)."""
    return model_of(
        [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], transB=1, name="fc1"),
         helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")],
        [("x", [16, 128])],
        [init("w1", rng.standard_normal((64, 128)).astype(np.float32) / 11),
         init("b1", rng.standard_normal(64).astype(np.float32)),
         init("w2", rng.standard_normal((64, 32)).astype(np.float32) / 8)])


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def keep_smallest(model: onnx.ModelProto, info: dict) -> onnx.ModelProto:
    """The same layers with the 2 LARGEST magnitudes of each group set to zero instead."""
    result = onnx.ModelProto()
    result.CopyFrom(model)
    for entry in info["sparsified"]:
        tensor = next(t for t in result.graph.initializer if t.name == entry["weight"])
        w = numpy_helper.to_array(tensor)
        moved = np.moveaxis(w, entry["axis"], -1)
        groups = moved.reshape(*moved.shape[:-1], -1, 4).copy()
        np.put_along_axis(groups, np.argsort(-np.abs(groups), axis=-1)[..., :2], 0, axis=-1)
        pruned = np.moveaxis(groups.reshape(moved.shape), -1, entry["axis"])
        tensor.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(pruned), tensor.name))
    return result


def nrmse(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.sqrt(np.mean((got - ref) ** 2)) / np.sqrt(np.mean(ref ** 2)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pruned_model_runs_and_its_error_is_measured(seed):
    rng = np.random.default_rng(seed)
    model = mlp(rng)
    pruned, info = sparsify_2_4(model)
    assert sorted(e["layer"] for e in info["sparsified"]) == ["fc1"]  # fc2: 2048 weights < min_params
    pruned_both, info_both = sparsify_2_4(model, min_params=1024)
    assert sorted(e["layer"] for e in info_both["sparsified"]) == ["fc1", "fc2"]
    x = rng.standard_normal((16, 128)).astype(np.float32)
    ref = run(model, x)
    for candidate, details in [(pruned, info), (pruned_both, info_both)]:
        error = nrmse(run(candidate, x), ref)
        worst = nrmse(run(keep_smallest(model, details), x), ref)
        assert np.isfinite(error) and error > 0
        # Gaussian weights keep about 87% of their energy in the 2 largest of 4. Measured here (seeds 0-2):
        # nrmse 0.22-0.26 (fc1 pruned) and 0.35-0.43 (both) against 0.57-0.60 and 0.94-0.98 for pruning
        # the largest; pruning 2 of 4 at random fails this bound too.
        assert error < worst / 2, (error, worst)


def test_conv_with_groups_runs_in_onnxruntime():
    rng = np.random.default_rng(3)
    model, _ = layer("conv", 16, 8, rng, groups=2, kernel=3)
    pruned, info = sparsify_2_4(model, min_params=0)
    x = rng.standard_normal((1, 32, 5, 5)).astype(np.float32)
    ref = run(model, x)
    error, worst = nrmse(run(pruned, x), ref), nrmse(run(keep_smallest(model, info), x), ref)
    assert np.isfinite(error) and 0 < error < worst / 2


def left_alone_model(rng: np.random.Generator) -> onnx.ModelProto:
    f = np.float32
    q = rng.integers(-100, 100, (64, 64)).astype(np.int8)
    return model_of(
        [helper.make_node("Gemm", ["x", "odd"], ["a"], transB=1, name="odd_k"),       # K = 126
         helper.make_node("MatMul", ["a", "small"], ["b"], name="small"),             # 4096 weights
         helper.make_node("Conv", ["img", "dw"], ["c"], group=64, name="depthwise"),  # C/group = 1
         helper.make_node("MatMul", ["b", "b2"], ["d"], name="activations"),          # no constant
         helper.make_node("DequantizeLinear", ["q", "qs"], ["qw"]),
         helper.make_node("MatMul", ["d", "qw"], ["e"], name="quantized"),
         helper.make_node("Gather", ["shared", "idx"], ["g"]),
         helper.make_node("MatMul", ["e", "shared"], ["y"], name="tied")],
        [("x", [2, 126]), ("img", [1, 64, 4, 4]), ("b2", [32, 64])],
        [init("odd", rng.standard_normal((128, 126)).astype(f)),
         init("small", rng.standard_normal((128, 32)).astype(f)),
         init("dw", rng.standard_normal((64, 1, 3, 3)).astype(f)), init("q", q), init("qs", f(0.01)),
         init("shared", rng.standard_normal((64, 128)).astype(f)), init("idx", np.array([1, 2], np.int64))],
        outputs=("y", "c", "g"))


def test_layers_it_cannot_prune_are_left_byte_identical():
    model = left_alone_model(np.random.default_rng(4))
    pruned, info = sparsify_2_4(model, min_params=8192)
    assert info["sparsified"] == [] and info["params_sparsified"] == 0
    reasons = {e["layer"]: e["reason"] for e in info["skipped"]}
    assert "126" in reasons["odd_k"] and "not a multiple of 4" in reasons["odd_k"]
    assert "4096 weights, fewer than 8192" in reasons["small"]
    assert "fewer than" in reasons["depthwise"]
    assert reasons["activations"] == "weight is not a constant"
    assert "DequantizeLinear" in reasons["quantized"]
    assert "shared with Gather" in reasons["tied"]
    assert [t.SerializeToString() for t in pruned.graph.initializer] == \
        [t.SerializeToString() for t in model.graph.initializer]
    # With no size floor the depthwise conv is still left alone: its reduction dimension is 1.
    pruned, info = sparsify_2_4(model, min_params=0)
    reasons = {e["layer"]: e["reason"] for e in info["skipped"]}
    assert "reduction dimension 1" in reasons["depthwise"]
    assert [e["layer"] for e in info["sparsified"]] == ["small"]
    untouched = {t.name: t.SerializeToString() for t in model.graph.initializer if t.name != "small"}
    assert {t.name: t.SerializeToString() for t in pruned.graph.initializer if t.name != "small"} == untouched


def test_constant_node_weights_and_the_pass_object():
    rng = np.random.default_rng(5)
    w = rng.standard_normal((128, 64)).astype(np.float32)
    model = model_of([helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(w)),
                      helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")], [("x", [2, 128])])
    pruned, counts = run_passes([SPARSIFY_2_4], model)
    assert counts == {"sparsify_2_4": 1}
    value = next(a.t for a in pruned.graph.node[0].attribute if a.name == "value")
    assert_2_4(w, numpy_helper.to_array(value), 0)
    assert np.count_nonzero(numpy_helper.to_array(value)) == w.size // 2
    _, info = sparsify_2_4(model, conv=False)
    assert info["params_model"] == w.size


def test_shared_weights_and_overridable_initializers():
    w = np.random.default_rng(6).standard_normal((64, 64)).astype(np.float32)
    # Two MatMuls reading one weight along the same axis: pruned once, both layers listed.
    model = model_of([helper.make_node("MatMul", ["x", "w"], ["h"], name="a"),
                      helper.make_node("MatMul", ["h", "w"], ["y"], name="b")], [("x", [2, 64])], [init("w", w)])
    pruned, info = sparsify_2_4(model)
    assert [e["layer"] for e in info["sparsified"]] == ["a", "b"] and info["skipped"] == []
    assert info["params_sparsified"] == w.size and info["params_zeroed"] == w.size // 2
    assert_2_4(w, weight(pruned), 0)
    # The same weight read along another axis (transB=1) would break one layer's groups: both are left alone.
    model.graph.node[1].CopyFrom(helper.make_node("Gemm", ["h", "w"], ["y"], transB=1, name="b"))
    pruned, info = sparsify_2_4(model)
    assert info["sparsified"] == [] and {e["layer"] for e in info["skipped"]} == {"a", "b"}
    assert pruned.graph.initializer[0].SerializeToString() == model.graph.initializer[0].SerializeToString()
    # An initializer that is also a graph input is a default the caller can replace.
    model = model_of([helper.make_node("MatMul", ["x", "w"], ["y"], name="a")], [("x", [2, 64]), ("w", [64, 64])],
                     [init("w", w)])
    _, info = sparsify_2_4(model)
    assert "graph input" in info["skipped"][0]["reason"]
