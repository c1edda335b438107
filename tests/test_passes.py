"""Graph passes, checked numerically in onnxruntime.

Tolerance: TOL = 1e-4 relative to the largest output magnitude (`chains.assert_close`) for every
rewrite that should be exact. References are built independently of lmopt's passes, by editing
the ONNX protobuf directly (an activation's nodes dropped, a Conv turned into an Identity, a
residual Add turned into an Identity of its shortcut).
"""
from __future__ import annotations

import functools
import random

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from chains import assert_close, conv_chain_model, dense_matmul_model, gemm_chain_model, random_conv, rel_err
from onnx import TensorProto, helper, numpy_helper

from lmopt.algebra.linear import border_band
from lmopt.analysis import Chain, analyse
from lmopt.candidates import Candidate, branch_start, enumerate_candidates, removed_activations, removed_branches
from lmopt.loader import canonicalise
from lmopt.onnxio import max_ir_version
from lmopt.passes.activations import without_activations
from lmopt.passes.cleanup import finish
from lmopt.passes.merge import rewrite_block
from lmopt.passes.merge_runs import merge_linear_runs
from models import zoo

TOL = 1e-4
SIZE = 32


# --------------------------------------------------------------------------- helpers


@functools.lru_cache(maxsize=None)
def canonical(name: str) -> onnx.ModelProto:
    return canonicalise(zoo.build(name, image_size=SIZE))[0]


@functools.lru_cache(maxsize=None)
def feed_of(name: str) -> np.ndarray:
    return np.random.default_rng(123).standard_normal(zoo.input_shape(name, image_size=SIZE)).astype(np.float32)


def run(model: onnx.ModelProto | bytes, x: np.ndarray) -> np.ndarray:
    """First output in onnxruntime (one thread); accepts serialized bytes to save a copy."""
    if not isinstance(model, bytes):
        if model.ir_version > max_ir_version():
            model = onnx.ModelProto.FromString(model.SerializeToString())
            model.ir_version = max_ir_version()
        model = model.SerializeToString()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def checked_run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """onnx.checker, then run: one serialization for both."""
    data = model.SerializeToString()
    onnx.checker.check_model(data)
    return run(data, x)


@functools.lru_cache(maxsize=None)
def original_output(name: str) -> np.ndarray:
    return run(canonical(name), feed_of(name))




# -- pruning by lmopt's own rewrite, for comparison with surgery by hand

def prune_layer(graph: gs.Graph, chain: Chain, k: int) -> None:
    """Replace the layer of unit k by an identity (needs the same shape in and out)."""
    if not chain.units[k - 1].prunable:
        raise ValueError(f"layer {chain.units[k - 1].layer} changes the tensor shape: it cannot become an identity")
    rewrite_block(graph, chain, Candidate(chain.index, k - 1, k, (k,)))


def prune_branch(graph: gs.Graph, chain: Chain, k: int) -> None:
    """Remove the residual branch that ends at unit k: the unit's output becomes its shortcut."""
    start = branch_start(chain, k)
    if start is None:
        raise ValueError(f"unit {k} of chain {chain.index} ends no removable residual branch")
    rewrite_block(graph, chain, Candidate(chain.index, start, k, tuple(range(start + 1, k + 1))))


# -- independent references: protobuf surgery


def _rename_uses(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
    for out in graph.output:
        if out.name == old:  # keep the graph output's name: an Identity produces it
            graph.node.append(helper.make_node("Identity", [new], [old], name=f"ref/out/{old}"))


def _to_identity(node: onnx.NodeProto, source: str) -> None:
    out = list(node.output)[:1]
    node.Clear()
    node.op_type = "Identity"
    node.name = f"ref/{out[0]}"
    node.input.append(source)
    node.output.extend(out)


def reference_model(model: onnx.ModelProto, analysis, cand: Candidate) -> onnx.ModelProto:
    """What a candidate means, written without lmopt's passes: inner activations dropped, pruned
    layers replaced by Identity, fully pruned residual branches replaced by their shortcut."""
    ref = onnx.ModelProto.FromString(model.SerializeToString())
    graph = ref.graph
    nodes = {n.name: n for n in graph.node}
    chain = analysis.chains[cand.chain]
    branches = removed_branches(chain, cand)
    for k in removed_activations(chain, cand):
        act = chain.units[k - 1].act
        for name in act.nodes:
            graph.node.remove(nodes[name])
        _rename_uses(graph, act.output, act.input)
    in_branch = set()
    for k in branches:
        in_branch.update(range(branch_start(chain, k) + 1, k + 1))
        skip = chain.units[k - 1].skip
        _to_identity(nodes[skip.add], skip.tensor)
    for k in cand.pruned:
        if k in in_branch:
            continue  # dead after its branch's Add became the shortcut
        unit = chain.units[k - 1]
        layer = nodes[unit.layer]
        layer_out = layer.output[0]
        _to_identity(layer, layer.input[0])
        if unit.bias_add:
            _to_identity(nodes[unit.bias_add], layer_out)
    onnx.checker.check_model(ref)
    return ref


def _pads(node) -> list[int]:
    return list(next((a.ints for a in node.attribute if a.name == "pads"), []))


def candidate_is_exact(model, analysis, cand: Candidate) -> bool:
    """Dense blocks always; conv blocks when no kept conv after the first kept one is padded."""
    chain = analysis.chains[cand.chain]
    if chain.kind != "conv":
        return True
    nodes = {n.name: n for n in model.graph.node}
    branches = removed_branches(chain, cand)
    kept = []  # kept layers in composition order (projections of folded shortcuts included)
    for k in range(cand.start + 1, cand.end + 1):
        unit = chain.units[k - 1]
        if k not in cand.pruned:
            kept.append(unit.layer)
        if unit.skip is not None and unit.skip.projection and (k in branches or (
                unit.skip.position is not None and unit.skip.position >= cand.start)):
            kept.append(unit.skip.projection)
    return all(not any(_pads(nodes[name])) for name in kept[1:])


# --------------------------------------------------------------------------- activation removal


def _conv_act_conv(act_nodes, act_in="c1", act_out="a", with_act=True, output_act=False, seed=0):
    """conv1 -> [activation] -> conv2 (or conv1 -> activation as the graph output)."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "W1"),
             numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "B1"),
             numpy_helper.from_array(rng.standard_normal((5, 4, 1, 1)).astype(np.float32), "W2"),
             numpy_helper.from_array(np.float32(3.0), "three"), numpy_helper.from_array(np.float32(6.0), "six"),
             numpy_helper.from_array(np.float32(0.0), "zero")]
    nodes = [helper.make_node("Conv", ["x", "W1", "B1"], ["c1"], pads=[1, 1, 1, 1], name="conv1")]
    if with_act:
        nodes += act_nodes
    mid = act_out if with_act else act_in
    if output_act:
        y_name, shape = mid, [1, 4, 8, 8]
    else:
        nodes.append(helper.make_node("Conv", [mid, "W2"], ["y"], name="conv2"))
        y_name, shape = "y", [1, 5, 8, 8]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info(y_name, TensorProto.FLOAT, shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


ACT_FORMS = {
    "relu": [helper.make_node("Relu", ["c1"], ["a"])],
    "relu6": [helper.make_node("Clip", ["c1", "zero", "six"], ["a"])],
    "hardswish_decomposed": [helper.make_node("Add", ["c1", "three"], ["h1"]),
                             helper.make_node("Clip", ["h1", "zero", "six"], ["h2"]),
                             helper.make_node("Mul", ["c1", "h2"], ["h3"]),
                             helper.make_node("Div", ["h3", "six"], ["a"])],
    "silu": [helper.make_node("Sigmoid", ["c1"], ["s"]), helper.make_node("Mul", ["c1", "s"], ["a"])],
}


@pytest.mark.parametrize("form", sorted(ACT_FORMS))
@pytest.mark.parametrize("output_act", [False, True], ids=["inner", "graph-output"])
def test_remove_activation_equals_model_without_it(form, output_act):
    model = canonicalise(_conv_act_conv(ACT_FORMS[form], output_act=output_act))[0]
    reference = _conv_act_conv(ACT_FORMS[form], with_act=False, output_act=output_act)
    a = analyse(model)
    unit = a.chains[0].units[0]
    assert unit.act is not None
    removed = without_activations(model, a)
    onnx.checker.check_model(removed)
    x = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)
    with_act = run(model, x)
    got = run(removed, x)
    assert_close(got, run(reference, x), TOL, form)
    assert rel_err(with_act, got) > 100 * TOL  # the activation did something: the test can tell
    assert not {n.op_type for n in removed.graph.node} & {"Relu", "Clip", "Sigmoid", "Div"}
    if output_act:
        assert [o.name for o in removed.graph.output] == [o.name for o in model.graph.output]


@pytest.mark.parametrize("name,unit", [("resnet18", (1, 3)), ("resnet18", (1, 2)), ("mobilenetv2_1.0", (0, 5)),
                                       ("vit_tiny_mlp", (4, 1))])
def test_remove_one_zoo_activation_equals_surgery_reference(name, unit):
    model = canonical(name)
    a = analyse(model)
    chain, k = unit
    removed = without_activations(model, a, {unit})
    ref = reference_model(model, a, Candidate(chain, k - 1, k + 1))  # the block whose inner act is unit k's
    assert removed_activations(a.chains[chain], Candidate(chain, k - 1, k + 1)) == [k]
    x = feed_of(name)
    got = run(removed, x)
    assert_close(got, run(ref, x), TOL, f"{name} unit {unit}")
    assert rel_err(got, original_output(name)) > 10 * TOL
    assert len(removed.graph.node) == len(model.graph.node) - len(a.chains[chain].units[k - 1].act.nodes)


# --------------------------------------------------------------------------- merge (`lmopt merge`)

MERGE_EXPECT = {  # model -> (runs merged exactly, runs left alone) once every chain activation is gone
    "resnet18": (0, 8),          # one run per basic block (the shortcut ends it); a padded 3x3 follows
                                 # the first conv in each: all inexact
    "mobilenetv2_1.0": (17, 11),  # idem (1x1 -> padded dw 3x3); cut before each padded dw, the
                                  # exact parts that remain (dw -> 1x1 project -> 1x1 expand) merge
    "vit_tiny_mlp": (12, 0),     # fc1 + fc2 of every block (the shortcut stays an explicit Add)
}  # (VGG's classifier Gemms are one more dense run: covered by the small Gemm chains below, faster)


@pytest.mark.parametrize("name", sorted(MERGE_EXPECT))
def test_merge_exact_on_activation_free_zoo_models(name):
    model = canonical(name)
    noact = without_activations(model, analyse(model))
    merged, chosen, skipped = merge_linear_runs(noact, allow_inexact=False)
    assert (len(chosen), len(skipped)) == MERGE_EXPECT[name]
    assert all(r["exact"] for r in chosen) and not any(r["exact"] for r in skipped)
    if not skipped:  # every run exact: --allow-inexact changes nothing
        merged_too, chosen_too, _ = merge_linear_runs(noact, allow_inexact=True)
        assert chosen_too == chosen
        assert merged_too.SerializeToString() == merged.SerializeToString()
    onnx.checker.check_model(merged)
    x = feed_of(name)
    reference = run(noact, x)
    assert_close(run(merged, x), reference, TOL, name)
    assert rel_err(reference, original_output(name)) > 10 * TOL  # activations were really removed
    merged_layers = sum(len(r["layers"]) for r in chosen)

    def linear(m):
        return sum(1 for n in m.graph.node if n.op_type in ("Conv", "Gemm", "MatMul"))

    assert linear(merged) == linear(noact) - merged_layers + len(chosen)


def _acts_after(model, analysis, predicate):
    nodes = {n.name: n for n in model.graph.node}
    return {(c.index, k) for c in analysis.chains for k, u in enumerate(c.units, 1)
            if u.act and predicate(nodes[u.layer])}


def _group(node):
    return next((a.i for a in node.attribute if a.name == "group"), 1)


def _kernel(node):
    return next((list(a.ints) for a in node.attribute if a.name == "kernel_shape"), None)


@pytest.mark.parametrize("name,predicate,runs", [
    # MobileNetV2 without the depthwise convs' ReLU6: dw 3x3 -> project 1x1 (-> next expand 1x1)
    ("mobilenetv2_1.0", lambda n: _group(n) > 1, 17),
])
def test_merge_exact_conv_runs_equal_the_unmerged_model(name, predicate, runs):
    model = canonical(name)
    a = analyse(model)
    partial = without_activations(model, a, _acts_after(model, a, predicate))
    merged, chosen, skipped = merge_linear_runs(partial, allow_inexact=False)
    assert len(chosen) == runs and all(r["exact"] for r in chosen)
    onnx.checker.check_model(merged)
    x = feed_of(name)
    assert_close(run(merged, x), run(partial, x), TOL, name)

    def convs(m):
        return sum(1 for n in m.graph.node if n.op_type == "Conv")

    assert convs(merged) == convs(partial) - sum(len(r["layers"]) - 1 for r in chosen)


def test_merge_on_the_exported_models():
    """The zoo models as exported: MobileNetV2 has exact runs (project 1x1 -> next expand 1x1)."""
    model = canonical("mobilenetv2_1.0")
    merged, chosen, skipped = merge_linear_runs(model, allow_inexact=False)
    assert chosen and all(len(r["layers"]) == 2 for r in chosen)
    x = feed_of("mobilenetv2_1.0")
    assert_close(run(merged, x), original_output("mobilenetv2_1.0"), TOL)
    merged18, chosen18, skipped18 = merge_linear_runs(canonical("resnet18"), allow_inexact=True)
    assert chosen18 == skipped18 == []  # a ReLU after every conv: no run at all
    assert merged18.SerializeToString() == canonical("resnet18").SerializeToString()


EXACT_CHAINS = [
    # (label, specs builder, input shape, skip builder)
    ("3x3p1-1x1-1x1", lambda r: [random_conv(r, 3, 8, (3, 3), pads_begin=(1, 1), pads_end=(1, 1)),
                                 random_conv(r, 8, 6, (1, 1)), random_conv(r, 6, 5, (1, 1))], (1, 3, 9, 9), None),
    ("1x1-1x1+identity", lambda r: [random_conv(r, 6, 12, (1, 1)), random_conv(r, 12, 6, (1, 1))],
     (1, 6, 7, 7), lambda r: "identity"),
    ("3x3s2p1-1x1+projection", lambda r: [random_conv(r, 4, 8, (3, 3), strides=(2, 2), pads_begin=(1, 1),
                                                      pads_end=(1, 1)),
                                          random_conv(r, 8, 8, (1, 1))],
     (1, 4, 10, 10), lambda r: random_conv(r, 4, 8, (1, 1), strides=(2, 2))),
    ("dw3x3p1-dw1x1-1x1", lambda r: [random_conv(r, 8, 8, (3, 3), pads_begin=(1, 1), pads_end=(1, 1), group=8),
                                     random_conv(r, 8, 8, (1, 1), group=8), random_conv(r, 8, 4, (1, 1))],
     (1, 8, 6, 6), None),
    ("3x3 dilated 2 - 1x1 strided", lambda r: [random_conv(r, 3, 4, (3, 3), dilations=(2, 2), pads_begin=(2, 2),
                                                           pads_end=(2, 2)),
                                               random_conv(r, 4, 4, (1, 1), strides=(2, 2))], (1, 3, 11, 11), None),
]


@pytest.mark.parametrize("label,make,shape,skip", EXACT_CHAINS, ids=[c[0] for c in EXACT_CHAINS])
def test_exact_merge_of_small_conv_chains(label, make, shape, skip):
    rng = np.random.default_rng(7)
    specs = make(rng)
    model = canonicalise(conv_chain_model(specs, shape, skip=skip(rng) if skip else None))[0]
    merged, chosen, skipped = merge_linear_runs(model, allow_inexact=False)
    assert len(chosen) == 1 and chosen[0]["exact"] and skipped == []
    ops = [n.op_type for n in merged.graph.node if n.op_type != "Identity"]  # (the output's Identity stays)
    assert ops == ["Conv"], ops  # the shortcut (identity or projection) is folded into the kernel
    x = rng.standard_normal(shape).astype(np.float32)
    assert_close(checked_run(merged, x), run(model, x), TOL, label)


def _gemm_layers(rng, sizes, trans_b, alpha=1.0, beta=1.0, bias_shape="vector"):
    layers = []
    for fin, fout in zip(sizes, sizes[1:]):
        b = rng.standard_normal((fout, fin) if trans_b else (fin, fout)) / np.sqrt(fin)
        c = {"vector": rng.standard_normal(fout), "row": rng.standard_normal((1, fout)), None: None}[bias_shape]
        layers.append({"B": b, "C": c, "transB": trans_b, "alpha": alpha, "beta": beta})
    return layers


@pytest.mark.parametrize("trans_b,alpha,beta,bias_shape", [(1, 1.0, 1.0, "vector"), (0, 0.5, 2.0, "row"),
                                                           (1, 1.0, 1.0, None)])
def test_exact_merge_of_gemm_chains(trans_b, alpha, beta, bias_shape):
    """Three Gemms (as torch writes Linear layers, transB=1) collapse into one Gemm, exactly."""
    rng = np.random.default_rng(trans_b + 3)
    model = canonicalise(gemm_chain_model(_gemm_layers(rng, [16, 24, 20, 8], trans_b, alpha, beta, bias_shape),
                                          2, 16))[0]
    merged, chosen, _ = merge_linear_runs(model, allow_inexact=False)
    assert len(chosen) == 1 and len(chosen[0]["layers"]) == 3
    assert [n.op_type for n in merged.graph.node if n.op_type != "Identity"] == ["Gemm"]
    x = rng.standard_normal((2, 16)).astype(np.float32)
    assert_close(checked_run(merged, x), run(model, x), TOL)


def test_exact_merge_of_matmul_chain_with_residual():
    """MatMul + Add(bias) on tokens (1, T, C) with a residual from the chain input: folded as + I."""
    rng = np.random.default_rng(11)
    layers = [(rng.standard_normal((12, 20)) / 4, rng.standard_normal(20)),
              (rng.standard_normal((20, 12)) / 4, rng.standard_normal(12))]
    model = canonicalise(dense_matmul_model(layers, (1, 5, 12), residual=True))[0]
    merged, chosen, _ = merge_linear_runs(model, allow_inexact=False)
    assert len(chosen) == 1
    # x @ (W1 W2 + I) + b
    assert sorted(n.op_type for n in merged.graph.node if n.op_type != "Identity") == ["Add", "MatMul"]
    x = rng.standard_normal((1, 5, 12)).astype(np.float32)
    assert_close(checked_run(merged, x), run(model, x), TOL)


INEXACT_CHAINS = [
    # (specs builder, input shape, skip)
    ("3x3p1-3x3p1", lambda r: [random_conv(r, 4, 6, (3, 3), pads_begin=(1, 1), pads_end=(1, 1)),
                               random_conv(r, 6, 5, (3, 3), pads_begin=(1, 1), pads_end=(1, 1))], (1, 4, 12, 12), None),
    ("basic-block", lambda r: [random_conv(r, 4, 4, (3, 3), pads_begin=(1, 1), pads_end=(1, 1)),
                               random_conv(r, 4, 4, (3, 3), pads_begin=(1, 1), pads_end=(1, 1))],
     (1, 4, 12, 12), "identity"),
    ("1x1-dw3x3s2-1x1", lambda r: [random_conv(r, 4, 8, (1, 1)),
                                   random_conv(r, 8, 8, (3, 3), strides=(2, 2), pads_begin=(1, 1), pads_end=(1, 1),
                                               group=8),
                                   random_conv(r, 8, 4, (1, 1))], (1, 4, 13, 13), None),
    ("5x5p2-3x3s2p1", lambda r: [random_conv(r, 3, 4, (5, 5), pads_begin=(2, 2), pads_end=(2, 2)),
                                 random_conv(r, 4, 4, (3, 3), strides=(2, 2), pads_begin=(1, 1), pads_end=(1, 1))],
     (1, 3, 16, 16), None),
]


@pytest.mark.parametrize("label,make,shape,skip", INEXACT_CHAINS, ids=[c[0] for c in INEXACT_CHAINS])
def test_inexact_merge_matches_in_the_interior(label, make, shape, skip):
    rng = np.random.default_rng(42)
    specs = make(rng)
    model = canonicalise(conv_chain_model(specs, shape, skip=skip))[0]
    x = rng.standard_normal(shape).astype(np.float32)
    ref = run(model, x)
    same, chosen, skipped = merge_linear_runs(model, allow_inexact=False)
    # by default the run is left alone, but its exact parts (cut before each padded conv) merge
    assert len(skipped) == 1 and all(r["exact"] for r in chosen)
    assert_close(run(same, x), ref, TOL, f"{label} exact parts")
    merged, chosen, _ = merge_linear_runs(model, allow_inexact=True)
    assert len(chosen) == 1 and not chosen[0]["exact"]
    assert sum(1 for n in merged.graph.node if n.op_type == "Conv") == 1
    assert "Add" not in {n.op_type for n in merged.graph.node}  # the identity shortcut is folded in
    got = run(merged, x)
    assert got.shape == ref.shape
    (b0, b1), (e0, e1) = border_band(specs)
    assert (b0, b1) != (0, 0)
    inner = (slice(None), slice(None), slice(b0, ref.shape[2] - e0), slice(b1, ref.shape[3] - e1))
    assert_close(got[inner], ref[inner], TOL, f"{label} interior")
    assert rel_err(got, ref) > 10 * TOL  # the border really differs: the band is not vacuous


# --------------------------------------------------------------------------- pruning


@pytest.mark.parametrize("name,chain,k", [("resnet18", 1, 2), ("resnet18", 1, 3), ("resnet18", 1, 16),
                                          ("mobilenetv2_1.0", 0, 8), ("vit_tiny_mlp", 0, 2)])
def test_prune_layer_equals_identity_surgery(name, chain, k):
    model = canonical(name)
    a = analyse(model)
    unit = a.chains[chain].units[k - 1]
    if name == "vit_tiny_mlp":  # fc2 changes 768 -> 192: not prunable
        assert not unit.prunable
        alone = Candidate(chain, k - 1, k, (k,)).key  # pruned by itself (a whole branch may still go)
        assert alone not in {c.key for c in enumerate_candidates(a, gs.import_onnx(model))}
        return
    assert unit.prunable
    graph = gs.import_onnx(model)
    prune_layer(graph, a.chains[chain], k)
    pruned = finish(graph, like=model)
    onnx.checker.check_model(pruned)
    ref = reference_model(model, a, Candidate(chain, k - 1, k, (k,)))
    assert not any(n.name == unit.layer for n in ref.graph.node)
    x = feed_of(name)
    got = run(pruned, x)
    assert_close(got, run(ref, x), TOL, f"{name} prune unit {k}")
    assert rel_err(got, original_output(name)) > 10 * TOL
    assert sum(1 for n in pruned.graph.node if n.op_type == "Conv") == \
        sum(1 for n in model.graph.node if n.op_type == "Conv") - 1


@pytest.mark.parametrize("name,chain,k,projection", [
    ("resnet18", 1, 4, False), ("resnet18", 1, 6, True), ("resnet18", 1, 16, False),
    ("mobilenetv2_1.0", 0, 9, False), ("vit_tiny_mlp", 3, 2, False)])
def test_prune_branch_equals_shortcut_surgery(name, chain, k, projection):
    model = canonical(name)
    a = analyse(model)
    skip = a.chains[chain].units[k - 1].skip
    assert skip is not None and (skip.projection is not None) == projection
    graph = gs.import_onnx(model)
    prune_branch(graph, a.chains[chain], k)
    pruned = finish(graph, like=model)
    onnx.checker.check_model(pruned)
    # reference: the residual Add becomes its shortcut (the dead branch is left in; ORT ignores it)
    ref = onnx.ModelProto.FromString(model.SerializeToString())
    add = next(n for n in ref.graph.node if n.name == skip.add)
    _to_identity(add, skip.tensor)
    x = feed_of(name)
    got = run(pruned, x)
    assert_close(got, run(ref, x), TOL, f"{name} remove branch ending at {k}")
    assert rel_err(got, original_output(name)) > 10 * TOL
    start = branch_start(a.chains[chain], k)
    branch_layers = {u.layer for u in a.chains[chain].units[start:k]}
    assert not branch_layers & {n.name for n in pruned.graph.node}


def test_a_unit_inside_a_branch_ends_no_removable_branch():
    a = analyse(canonical("resnet18"))
    assert branch_start(a.chains[1], 3) is None
    assert branch_start(a.chains[1], 4) == 2  # the second basic block: units 3 and 4


# --------------------------------------------------------------------------- every candidate

SAMPLE = {"resnet18": (6, 12, 6), "mobilenetv2_1.0": (6, 12, 8), "vit_tiny_mlp": (6, 14, 6)}


def _sample_candidates(name, model, analysis, cands):
    """A fixed-seed sample: some original blocks, more blocks with an exact reference (activation
    removal + merge, pruning, branch removal) and a few inexact ones (checked to build and run),
    always with the longest and the most pruned candidate."""
    rng = random.Random(f"lmopt-{name}")
    n_orig, n_exact, n_inexact = SAMPLE[name]
    originals = [c for c in cands if c.is_original]
    exact = [c for c in cands if not c.is_original and candidate_is_exact(model, analysis, c)]
    inexact = [c for c in cands if not c.is_original and c not in exact]
    chosen = set(rng.sample(originals, min(n_orig, len(originals))))
    chosen.update(rng.sample(exact, min(n_exact, len(exact))))
    chosen.update(rng.sample(inexact, min(n_inexact, len(inexact))))
    others = exact + inexact
    chosen.add(max(others, key=lambda c: (c.length, len(c.pruned))))
    chosen.add(max(others, key=lambda c: (len(c.pruned), c.length)))
    return sorted(chosen, key=lambda c: (c.chain, c.start, c.end, c.pruned))


@pytest.mark.parametrize("name", sorted(SAMPLE))
def test_rewrite_of_enumerated_candidates(name):
    model = canonical(name)
    a = analyse(model)
    cands = enumerate_candidates(a, gs.import_onnx(model))
    assert len({c.key for c in cands}) == len(cands)  # keys are unique
    x = feed_of(name)
    original = original_output(name)
    exact_checked = 0
    for cand in _sample_candidates(name, model, a, cands):
        graph = gs.import_onnx(model)
        rewrite_block(graph, a.chains[cand.chain], cand)
        rewritten = finish(graph, like=model)
        assert rewritten.ir_version <= max_ir_version()
        got = checked_run(rewritten, x)
        assert got.shape == original.shape and np.isfinite(got).all(), cand.key
        if cand.is_original:
            assert_close(got, original, TOL, f"{name} {cand.key} (original block)")
            exact_checked += 1
        elif candidate_is_exact(model, a, cand):
            ref = run(reference_model(model, a, cand), x)
            assert_close(got, ref, TOL, f"{name} {cand.key} vs reference")
            exact_checked += 1
    assert exact_checked >= sum(SAMPLE[name][:2])


# --------------------------------------------------------------------------- other dtypes, mixed chains


def test_merge_keeps_the_models_float_type():
    """An fp16 model merges into fp16 weights (float32 weights in an fp16 graph make an invalid model).
    Tolerance 3e-3: a few fp16 roundings (eps 9.8e-4) of an 8-term sum."""
    rng = np.random.default_rng(0)

    def h(name, shape):
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float16), name)

    nodes = [helper.make_node("Conv", ["x", "W1", "B1"], ["a"], pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["a", "W2"], ["y"])]
    graph = helper.make_graph(nodes, "fp16", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [1, 5, 8, 8])],
                              [h("W1", (4, 3, 3, 3)), h("B1", (4,)), h("W2", (5, 4, 1, 1))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    canon = canonicalise(model)[0]
    merged, chosen, _ = merge_linear_runs(canon, allow_inexact=False)
    assert len(chosen) == 1
    onnx.checker.check_model(merged, full_check=True)
    assert {i.data_type for i in merged.graph.initializer} == {TensorProto.FLOAT16}
    x = rng.standard_normal((1, 3, 8, 8)).astype(np.float16)
    got = run(merged, x)
    assert got.dtype == np.float16
    assert_close(got.astype(np.float32), run(canon, x).astype(np.float32), 3e-3, "fp16")


def test_dense_part_of_a_mixed_chain_merges():
    from test_analysis import mixed_model

    model = canonicalise(mixed_model())[0]
    a = analyse(model)
    dense = next(c for c in a.chains if c.kind == "dense")
    cand = Candidate(dense.index, 0, 2)
    graph = gs.import_onnx(model)
    rewrite_block(graph, dense, cand)
    merged = finish(graph, like=model)
    assert sum(1 for n in merged.graph.node if n.op_type == "MatMul") == 1
    x = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)
    assert_close(checked_run(merged, x), run(reference_model(model, a, cand), x), TOL)
