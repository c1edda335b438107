"""Closed-form repair in context: it brings a compressed model's outputs closer to the original's on
data no fit has seen, and it keeps no repair that makes the check data worse."""
import numpy as np
import onnx_graphsurgeon as gs
import pytest

import lmopt.repair as repair_module
from lmopt.algebra.refit import affine_fit
from lmopt.analysis import analyse
from lmopt.apply import apply_candidates
from lmopt.calib import calibration_sets
from lmopt.candidates import enumerate_candidates
from lmopt.errors import LmoptError
from lmopt.loader import canonicalise
from lmopt.metrics import compare, damage
from lmopt.passes.merge import BlockBuilder, rewrite_prefix
from lmopt.repair import repair, run_with_outputs
from models.zoo import build, smooth_images


@pytest.fixture(scope="module")
def resnet():
    model, _ = canonicalise(build("resnet18", image_size=32))
    analysis = analyse(model)
    candidates = enumerate_candidates(analysis, gs.import_onnx(model))
    return model, analysis, candidates


def feeds(count, seed):
    return [{"input": x[None]} for x in smooth_images(count, 32, seed=seed)]


def merges_removing_activations(analysis, candidates, count):
    """Disjoint two-layer merges that remove the ReLU inside a residual branch."""
    chosen, used = [], set()
    for cand in candidates:
        chain = analysis.chains[cand.chain]
        if cand.length == 2 and not cand.pruned and chain.units[cand.start].act is not None:
            span = {(cand.chain, k) for k in range(cand.start, cand.end + 1)}
            if not span & used:
                chosen.append(cand)
                used |= span
        if len(chosen) == count:
            break
    return chosen


def test_affine_fit_recovers_scale_and_shift():
    rng = np.random.default_rng(0)
    current = rng.standard_normal((4, 3, 5, 5))
    scale, shift = np.array([2.0, -0.5, 1.0]), np.array([0.1, 3.0, -1.0])
    target = current * scale[None, :, None, None] + shift[None, :, None, None]
    got_scale, got_shift = affine_fit(current, target, channel_axis=1)
    np.testing.assert_allclose(got_scale, scale, atol=1e-9)
    np.testing.assert_allclose(got_shift, shift, atol=1e-9)


def test_repair_improves_fidelity_on_unseen_data(resnet):
    model, analysis, candidates = resnet
    changes = merges_removing_activations(analysis, candidates, 3)
    assert len(changes) == 3
    compressed = apply_candidates(model, analysis, changes)
    repaired, steps = repair(model, compressed, analysis, changes, feeds(24, seed=1), feeds(12, seed=2))
    assert any(step.kept != "none" for step in steps)
    evaluation = feeds(24, seed=3)   # seen by no fit and no check
    reference = run_with_outputs(model, evaluation, [])[0]
    before = damage(compare(reference, run_with_outputs(compressed, evaluation, [])[0]))
    after = damage(compare(reference, run_with_outputs(repaired, evaluation, [])[0]))
    assert after < 0.8 * before
    for step in steps:   # every step kept only what lowered the check damage
        assert step.damage_after <= step.damage_before


def test_repair_checks_an_embedding_by_cosine(resnet):
    """With output_kind "embedding" (an encoder's pooled output), the check damage is 1 - mean
    cosine, not a classifier's KL + top-1, whatever the output's shape suggests."""
    model, analysis, candidates = resnet
    changes = merges_removing_activations(analysis, candidates, 1)
    compressed = apply_candidates(model, analysis, changes)
    check = feeds(12, seed=2)
    _, steps = repair(model, compressed, analysis, changes, feeds(24, seed=1), check, output_kind="embedding")
    assert steps
    reference, values = run_with_outputs(model, check, [])[0], run_with_outputs(compressed, check, [])[0]
    cosine_mean = compare(reference, values, kind="embedding")["cosine_mean"]
    assert steps[0].damage_before == pytest.approx(1.0 - cosine_mean, rel=1e-9)
    assert steps[0].damage_before != pytest.approx(damage(compare(reference, values)))  # the classifier measure


def test_a_repair_that_hurts_the_check_data_is_not_kept(resnet, monkeypatch):
    model, analysis, candidates = resnet
    changes = merges_removing_activations(analysis, candidates, 1)
    compressed = apply_candidates(model, analysis, changes)

    def ruinous(spec, x, y, seed=0):   # a "refit" that zeroes the layer
        return type(spec)(np.zeros_like(spec.weight), np.zeros_like(spec.bias), spec.strides, spec.pads_begin,
                          spec.pads_end, spec.dilations, spec.group)

    monkeypatch.setattr(repair_module, "refit_conv", ruinous)
    monkeypatch.setattr(repair_module, "affine_fit", lambda current, target, axis: (
        np.zeros(current.shape[axis]), np.zeros(current.shape[axis])))
    repaired, steps = repair(model, compressed, analysis, changes, feeds(8, seed=1), feeds(8, seed=2))
    assert steps and all(step.kept == "none" for step in steps)
    assert repaired.SerializeToString() == compressed.SerializeToString()


def test_nan_calibration_data_is_refused(tmp_path, resnet):
    model = resnet[0]
    data = smooth_images(4, 32, seed=0)
    data[2, 0, 5, 5] = np.nan
    np.save(tmp_path / "calib.npy", data)
    with pytest.raises(LmoptError, match="NaN or inf"):
        calibration_sets(model, str(tmp_path / "calib.npy"), 4, 2)


def test_nan_scores_are_an_error_not_a_plan():
    reference = np.zeros((2, 1, 10))
    with pytest.raises(LmoptError, match="NaN or inf"):
        damage(compare(reference, np.full((2, 1, 10), np.nan)))


def test_distillation_improves_fidelity_on_unseen_data(resnet):
    pytest.importorskip("torch", reason="PyTorch not installed: --distill needs the lmopt[torch] extra")
    from lmopt.distill import distill

    model, analysis, candidates = resnet
    changes = merges_removing_activations(analysis, candidates, 3)
    compressed = apply_candidates(model, analysis, changes)
    features = [analysis.chains[c.chain].positions[c.end] for c in changes]
    distilled, report = distill(model, compressed, features, feeds(48, seed=1), feeds(12, seed=2), minutes=0.25)
    assert report.epochs >= 1 and report.check_damage_after < report.check_damage_before
    evaluation = feeds(24, seed=3)
    reference = run_with_outputs(model, evaluation, [])[0]
    before = damage(compare(reference, run_with_outputs(compressed, evaluation, [])[0]))
    after = damage(compare(reference, run_with_outputs(distilled, evaluation, [])[0]))
    assert after < 0.8 * before
    # structure untouched: same nodes, same initializer shapes, only values changed
    assert [n.op_type for n in distilled.graph.node] == [n.op_type for n in compressed.graph.node]
    assert {i.name: tuple(i.dims) for i in distilled.graph.initializer} == \
        {i.name: tuple(i.dims) for i in compressed.graph.initializer}


def test_distillation_runs_when_a_block_end_is_removed_with_its_branch(resnet):
    pytest.importorskip("torch", reason="PyTorch not installed: --distill needs the lmopt[torch] extra")
    from lmopt.candidates import removed_branches
    from lmopt.distill import distill

    model, analysis, candidates = resnet
    cand = next(c for c in candidates if removed_branches(analysis.chains[c.chain], c))
    compressed = apply_candidates(model, analysis, [cand])
    first_pruned = analysis.chains[cand.chain].units[cand.start].layer
    gone = next(node.output[0] for node in model.graph.node if node.name == first_pruned)
    assert gone not in {name for node in compressed.graph.node for name in node.output}
    end = analysis.chains[cand.chain].positions[cand.end]
    distilled, report = distill(model, compressed, [gone, end], feeds(16, seed=1), feeds(8, seed=2), minutes=0.05)
    assert report.epochs >= 1
    assert [n.op_type for n in distilled.graph.node] == [n.op_type for n in compressed.graph.node]


def test_a_merged_layer_whose_shortcut_joins_after_it_is_repaired_to_the_sum():
    """A block that ends an inverted residual but starts inside it keeps the shortcut as an Add of its
    own: the merged layer writes a tensor the original lacks, and its repair target is the original's
    sum less the compressed network's shortcut value (this was a KeyError)."""
    model, _ = canonicalise(build("mobilenetv2_1.0", image_size=32))
    analysis = analyse(model)
    graph = gs.import_onnx(model)
    cand = next(c for c in enumerate_candidates(analysis, graph) if c.length == 2 and c.pruned
                and BlockBuilder(gs.import_onnx(model), analysis.chains[c.chain], c).build()[1] is not None)
    compressed = apply_candidates(model, analysis, [cand])
    fit = [{"input": x[None]} for x in smooth_images(24, 32, seed=1)]
    check = [{"input": x[None]} for x in smooth_images(12, 32, seed=2)]
    merged = rewrite_prefix(cand) + "Conv"
    original_names = {t for node in model.graph.node for t in node.output}
    assert merged in {n.name for n in compressed.graph.node}
    assert next(n for n in compressed.graph.node if n.name == merged).output[0] not in original_names
    _, steps = repair(model, compressed, analysis, [cand], fit, check)
    step = next(step for step in steps if step.layer == merged)
    assert step.kept != "none" and step.damage_after < step.damage_before
