"""Transformer encoders end to end: int64 inputs, token-like random feeds, .npz calibration with one
array per input, fidelity on float outputs only (cosine for embeddings, top-1 for classifiers),
symbolic dims kept in the written model, MLP collapse exact and refit."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from encoders import tiny_bert, token_feeds

from lmopt.apply import apply_candidates
from lmopt.calib import load_calibration
from lmopt.cli import main
from lmopt.errors import LmoptError
from lmopt.inputs import random_feeds, vocabulary_size
from lmopt.loader import canonicalise
from lmopt.metrics import compare, damage
from lmopt.onnxio import save_model
from lmopt.optimizer import Study
from lmopt.outputs import float_outputs, output_kind, primary_first
from lmopt.profile import boundary_corrected, tensor_size
from lmopt.runtime import run_outputs

FAST = {"runs": 3, "min_time_s": 0.0, "warmup_s": 0.0}
SEQ = 16
SHAPES = {name: [1, SEQ] for name in ("input_ids", "attention_mask", "token_type_ids")}


def _npz(path, feeds, names=("input_ids", "attention_mask")):
    np.savez(path, **{name: np.concatenate([f[name] for f in feeds]) for name in names})
    return path


@pytest.fixture(scope="module")
def bert_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("enc") / "tiny_bert.onnx"
    save_model(tiny_bert(), path)
    return path


@pytest.fixture(scope="module")
def calib_path(tmp_path_factory):
    return _npz(tmp_path_factory.mktemp("calib") / "tokens.npz", token_feeds(96, seq=SEQ, seed=3))


@pytest.fixture(scope="module")
def study(bert_path, calib_path, tmp_path_factory):
    return Study(bert_path, calib=str(calib_path), input_shapes=SHAPES, calib_count=64, eval_count=32,
                 cache_path=tmp_path_factory.mktemp("cache") / "latency.sqlite", progress=False,
                 backend_options=FAST)


def test_random_feeds_are_token_like():
    model, _ = canonicalise(tiny_bert(vocab=77), SHAPES)
    assert vocabulary_size(model, "input_ids") == 77
    feeds = random_feeds(model, 4, seed=0)
    ids = np.stack([f["input_ids"] for f in feeds])
    assert ids.dtype == np.int64 and ids.shape == (4, 1, SEQ)
    assert ids.min() >= 0 and ids.max() < 77 and len(np.unique(ids)) > 10
    assert all((f["attention_mask"] == 1).all() and (f["token_type_ids"] == 0).all() for f in feeds)


def test_npz_with_one_array_per_input(tmp_path):
    model, _ = canonicalise(tiny_bert(), SHAPES)
    feeds = token_feeds(5, seq=SEQ, seed=1)
    loaded = load_calibration(_npz(tmp_path / "c.npz", feeds), model)
    assert len(loaded) == 5
    for want, got in zip(feeds, loaded):
        assert got["input_ids"].dtype == np.int64 and got["input_ids"].shape == (1, SEQ)
        np.testing.assert_array_equal(got["input_ids"], want["input_ids"])
        np.testing.assert_array_equal(got["attention_mask"], want["attention_mask"])
        assert (got["token_type_ids"] == 0).all()     # left out: its default
    assert len(load_calibration(tmp_path / "c.npz", model, count=2)) == 2


@pytest.mark.parametrize("arrays, message", [
    ({"attention_mask": np.ones((3, SEQ), np.int64)}, "no array for the model's input 'input_ids'"),
    ({"input_ids": np.ones((3, SEQ), np.int64), "extra": np.ones(3)}, "name no input"),
    ({"input_ids": np.ones((3, SEQ), np.int64), "attention_mask": np.ones((2, SEQ), np.int64)}, "different numbers"),
    ({"input_ids": np.ones((3, SEQ + 1), np.int64)}, "does not match"),
    ({"input_ids": np.ones((3, SEQ), np.float32)}, "reads int64"),
])
def test_npz_errors_are_one_line(tmp_path, arrays, message):
    model, _ = canonicalise(tiny_bert(), SHAPES)
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(LmoptError, match=message):
        load_calibration(tmp_path / "bad.npz", model)


def test_int_pass_through_outputs_are_never_measured():
    model, _ = canonicalise(tiny_bert(), SHAPES)
    assert float_outputs(model) == ["token_embeddings", "sentence_embedding"]
    order = primary_first(model)
    assert order[0] == "input_ids_out" and model.graph.output[0].name == "sentence_embedding"
    assert output_kind(model, "sentence_embedding") == "embedding"
    classifier, _ = canonicalise(tiny_bert(classes=5), SHAPES)
    primary_first(classifier)
    assert classifier.graph.output[0].name == "logits" and output_kind(classifier, "logits") is None


def test_embedding_damage_is_one_minus_cosine():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((8, 1, 16))
    metrics = compare(ref, 3.0 * ref, kind="embedding")     # a scale change: same directions
    assert metrics["cosine_min"] == pytest.approx(1.0) and damage(metrics) == pytest.approx(0.0, abs=1e-12)
    noisy = compare(ref, ref + rng.standard_normal(ref.shape), kind="embedding")
    assert 0.0 < noisy["cosine_mean"] < 0.95 and damage(noisy) == pytest.approx(1 - noisy["cosine_mean"])
    assert "top1_agreement" not in noisy


def test_tensor_size_and_boundary_correction_with_symbolic_dims(study):
    assert tensor_size(("batch", 16, 32)) == 512 and tensor_size(None) == 0 and tensor_size((2, "?", 3)) == 6
    model = onnx.ModelProto.FromString(study.prepared.model.SerializeToString())
    for vi in model.graph.value_info:            # as real exports leave some dims unresolved
        if vi.type.tensor_type.shape.dim:
            vi.type.tensor_type.shape.dim[0].dim_param = "unk__1"
    corrected = boundary_corrected(model, study.prepared.analysis, study.prepared.candidates, study.latency.timed_ms,
                                   study.latency.chain_ms)
    assert set(corrected) == {c.key for c in study.prepared.candidates}
    assert all(np.isfinite(v) and v >= 0 for v in corrected.values())


def test_optimize_an_encoder_end_to_end(study, tmp_path):
    model, report = study.plan(1.25, measure=False)
    assert report.primary_output == "sentence_embedding"
    assert set(report.outputs) == {"sentence_embedding", "token_embeddings"}
    for fid in report.outputs.values():
        assert -1.0 <= fid["cosine_min"] <= fid["cosine_mean"] <= 1.0 + 1e-9
    assert report.changes  # random-weight layers are not free: something was changed for 1.25x
    assert report.fidelity["cosine_mean"] < 1.0   # would be exactly 1 if measured on the int pass-through
    # the written model: outputs in the source's order, symbolic dims kept, runs at another shape
    assert [o.name for o in model.graph.output] == ["input_ids_out", "token_embeddings", "sentence_embedding"]
    assert report.symbolic_dims.startswith("symbolic dims kept")
    dims = [d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "sequence"]
    onnx.checker.check_model(model)
    feed = token_feeds(1, batch=3, seq=9, seed=5)[0]
    outputs = ort.InferenceSession(model.SerializeToString()).run(None, feed)
    np.testing.assert_array_equal(outputs[0], feed["input_ids"])
    assert outputs[1].shape == (3, 9, 32) and outputs[2].shape == (3, 32)


def test_classifier_encoder_is_scored_by_top1(bert_path, tmp_path):
    path = tmp_path / "cls.onnx"
    save_model(tiny_bert(classes=5), path)
    study = Study(path, input_shapes=SHAPES, calib_count=8, eval_count=8, cache_path=tmp_path / "c.sqlite",
                  progress=False, backend_options=FAST)
    _, report = study.plan(1.2, measure=False)
    assert report.primary_output == "logits"
    assert 0.0 <= report.fidelity["top1_agreement"] <= 1.0 and "cosine_mean" not in report.fidelity
    assert list(report.outputs) == ["token_embeddings", "logits"]
    assert "cosine_mean" in report.outputs["token_embeddings"]


def test_cli_on_an_encoder_with_npz_calibration(bert_path, calib_path, tmp_path, capsys):
    out = tmp_path / "fast.onnx"
    args = ["optimize", str(bert_path), "--target", "1.25x", "-o", str(out), "-q", "--no-cache",
            "--calib", str(calib_path), "--calib-count", "16", "--eval-count", "8", "--no-measure",
            "--best-effort"]  # under test: the calibration path, not whether noisy timings reach 1.25x
    args += [f"--input-shape={name}:1,{SEQ}" for name in SHAPES]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "output sentence_embedding: " in text and "output input_ids_out" not in text
    assert "symbolic dims kept" in text
    written = onnx.load(out)
    assert written.graph.input[0].type.tensor_type.shape.dim[1].dim_param == "sequence"


def _mlp_collapse(study, chain_index=None):
    """The MLP-collapse candidate (fc1 -> act -> fc2 merged into one layer) of the last layer."""
    cands = [c for c in study.prepared.candidates if c.length == 2 and not c.pruned and not c.rank]
    return max(cands, key=lambda c: c.chain) if chain_index is None else cands[chain_index]


def test_mlp_collapse_is_exact_when_the_activation_is_linear(tmp_path):
    path = tmp_path / "linear_mlp.onnx"
    save_model(tiny_bert(activation=False), path)
    study = Study(path, input_shapes=SHAPES, calib_count=8, eval_count=8, cache_path=tmp_path / "c.sqlite",
                  progress=False, backend_options=FAST)
    cand = _mlp_collapse(study)
    assert study.refits.operator(cand) is None           # exact: nothing to refit
    collapsed = apply_candidates(study.prepared.model, study.prepared.analysis, [cand])
    assert sum(n.op_type == "MatMul" for n in collapsed.graph.node) == \
        sum(n.op_type == "MatMul" for n in study.prepared.model.graph.node) - 1
    feeds = study.data.eval
    names = ["sentence_embedding", "token_embeddings"]
    ref = ort.InferenceSession(study.prepared.model.SerializeToString())
    new = ort.InferenceSession(collapsed.SerializeToString())
    for feed in feeds:
        for want, got in zip(ref.run(names, feed), new.run(names, feed)):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_mlp_collapse_refit_improves_held_out_fidelity(study):
    cand = _mlp_collapse(study)
    refit = study.refits.operator(cand)
    assert refit is not None
    reference = run_outputs(study.prepared.model, study.data.score)    # held out: the refit saw only the fitting half
    names = ["sentence_embedding"]

    def held_out(operators):
        model = apply_candidates(study.prepared.model, study.prepared.analysis, [cand], operators)
        sess = ort.InferenceSession(model.SerializeToString())
        values = np.stack([sess.run(names, feed)[0] for feed in study.data.score])
        return compare(reference, values, kind="embedding")["cosine_mean"]

    composed, fitted = held_out({}), held_out({cand.key: refit})
    assert fitted > composed + 0.01, (composed, fitted)


def test_two_point_latency_fit():
    from lmopt.profile import two_point_fit
    # blocks sum to 4 ms alone; the model takes 7 ms whole and 1.5 ms with blocks of 0.5 ms
    scale, fixed = two_point_fit(7.0, 4.0, 1.5, 0.5)
    assert scale == pytest.approx(5.5 / 3.5) and fixed == pytest.approx(7.0 - 4.0 * 5.5 / 3.5)
    assert fixed + scale * 0.5 == pytest.approx(1.5)
    assert two_point_fit(7.0, 4.0, 7.5, 0.5) is None      # the fast plan measured slower: no fit
    assert two_point_fit(7.0, 4.0, 1.0, 4.0) is None      # no span between the two points
    assert two_point_fit(1.0, 4.0, 0.1, 0.5) is None      # would need a negative fixed time


def test_dense_models_get_block_latencies_in_context(study):
    assert study.latency.scale > 0
    original = sum(study.latency.block_ms[c.key] for c in study.prepared.candidates if c.is_original)
    assert study.latency.estimate_ms == pytest.approx(study.latency.fixed_ms + original)
    if study.latency.scale != 1.0:
        assert study.latency.estimate_ms == pytest.approx(study.latency.whole_ms)
        corrected = boundary_corrected(study.prepared.model, study.prepared.analysis, study.prepared.candidates,
                                       study.latency.timed_ms, study.latency.chain_ms)
        # scaled to context; a chain that begins a region also carries the region's work outside
        # blocks (profile.with_segments), the same share on every block that starts the chain
        shares: dict[int, set] = {}
        for cand in study.prepared.candidates:
            extra = study.latency.block_ms[cand.key] - study.latency.scale * corrected[cand.key]
            if cand.start == 0:
                shares.setdefault(cand.chain, set()).add(round(extra, 9))
            else:
                assert extra == pytest.approx(0.0, abs=1e-9)
        assert all(len(values) == 1 for values in shares.values())


def test_refit_rows_are_the_real_tokens():
    from lmopt.inputs import real_tokens
    feeds = token_feeds(3, seq=8, seed=2)
    keep = real_tokens(feeds, (3, 8, 32))
    np.testing.assert_array_equal(keep, np.concatenate([f["attention_mask"] for f in feeds]).astype(bool))
    assert not keep.all()                              # token_feeds pads some rows
    assert real_tokens(feeds, (3, 8)) is None and real_tokens(feeds, (2, 8, 32)) is None
    assert real_tokens([{"x": np.zeros((1, 8), np.float32)}], (1, 8, 4)) is None


def test_reduced_rank_keeps_more_of_the_fit_than_truncation():
    from lmopt.algebra.linear import DenseSpec
    from lmopt.algebra.lowrank import ranks_for, reduced_rank, truncated
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2000, 32)) * np.linspace(3.0, 0.05, 32) + 0.5    # few strong directions
    spec = DenseSpec(rng.standard_normal((32, 24)), rng.standard_normal(24))
    target = x @ spec.weight + spec.bias
    errors = {}
    for name, low in (("svd", truncated(spec, 6)), ("rrr", reduced_rank(spec, 6, x))):
        assert low.first.shape == (32, 6) and low.second.shape == (6, 24)
        errors[name] = np.linalg.norm(x @ low.first @ low.second + low.bias - target)
    assert errors["rrr"] < 0.9 * errors["svd"]
    full = truncated(spec, 24).dense()
    np.testing.assert_allclose(full.weight, spec.weight, atol=1e-9)
    assert ranks_for(384, 384) == [96, 48] and ranks_for(32, 32) == [8] and ranks_for(16, 64) == []


def test_low_rank_collapse_is_a_candidate_and_its_graph_is_the_factored_map(tmp_path):
    import onnx_graphsurgeon as gs

    from lmopt.algebra.lowrank import truncated
    from lmopt.passes.merge import BlockBuilder
    path = tmp_path / "linear_mlp.onnx"
    save_model(tiny_bert(activation=False), path)
    study = Study(path, input_shapes=SHAPES, calib_count=8, eval_count=8, cache_path=tmp_path / "c.sqlite",
                  progress=False, backend_options=FAST)
    full = _mlp_collapse(study)
    low = next(c for c in study.prepared.candidates if (c.chain, c.start, c.end) == (full.chain, full.start, full.end)
               and c.rank)
    assert low.rank == 8 and low.key.endswith("/r8") and not low.is_original
    assert low.key in study.latency.block_ms and low.key in study.scores.damage
    factored = apply_candidates(study.prepared.model, study.prepared.analysis, [low])
    ops = [n.op_type for n in factored.graph.node]
    assert ops.count("MatMul") == sum(n.op_type == "MatMul" for n in study.prepared.model.graph.node)  # 2 -> 2 layers
    merged, _ = BlockBuilder(gs.import_onnx(study.prepared.model), study.prepared.analysis.chains[full.chain],
                             full).build()
    dense = apply_candidates(study.prepared.model, study.prepared.analysis, [full],
                             {full.key: truncated(merged, 8).dense()})
    names = ["sentence_embedding"]
    a = ort.InferenceSession(factored.SerializeToString())
    b = ort.InferenceSession(dense.SerializeToString())
    for feed in study.data.eval:
        np.testing.assert_allclose(a.run(names, feed)[0], b.run(names, feed)[0], rtol=1e-4, atol=1e-4)
    _, report = study.plan(1.0, measure=False)
    assert report.changes == []


def test_fixed_shape_model_is_written_when_the_plan_does_not_apply_with_symbolic_dims(study, monkeypatch):
    import lmopt.symbolic

    def refuse(*args, **kwargs):
        raise ValueError("no")

    monkeypatch.setattr(lmopt.symbolic, "apply_candidates", refuse)
    model, report = study.plan(1.25, measure=False, rounds=0)
    assert report.changes and report.symbolic_dims.startswith("kept fixed")
    assert [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim] == [1, SEQ]
    assert [o.name for o in model.graph.output] == ["input_ids_out", "token_embeddings", "sentence_embedding"]


def test_no_symbolic_dims_note_for_a_fixed_shape_source(tmp_path):
    path = tmp_path / "fixed.onnx"
    model, _ = canonicalise(tiny_bert(), SHAPES)     # all dims fixed
    save_model(model, path)
    study = Study(path, calib_count=4, eval_count=4, cache_path=tmp_path / "c.sqlite", progress=False,
                  backend_options=FAST)
    _, report = study.plan(1.2, measure=False, rounds=0)
    assert report.symbolic_dims == ""


def test_the_torch_translation_of_an_encoder_matches_onnxruntime(study):
    """The canonical encoder holds the mask and pooling ops (Unsqueeze, Cast, ReduceSum, ...) that
    distillation must translate; every float output matches ONNX Runtime."""
    torch = pytest.importorskip("torch", reason="PyTorch not installed: the translator needs the lmopt[torch] extra")
    from lmopt.latency.torch_translate import translate

    model = study.prepared.model
    module = translate(model)
    feed = study.data.score[0]
    want = ort.InferenceSession(model.SerializeToString()).run(None, feed)
    with torch.no_grad():
        got = module(*[torch.from_numpy(feed[name]) for name in module.input_names])
    for value, expected, out in zip(got, want, model.graph.output):
        np.testing.assert_allclose(value.numpy(), expected, rtol=1e-4, atol=1e-5, err_msg=out.name)


def test_distillation_maps_a_batch_1_encoder_over_its_samples(study):
    """A canonical encoder fixed at batch 1 trains on whole batches through torch.vmap, with the
    outputs it gives sample by sample; a graph that reads values as shapes cannot be mapped and runs
    sample by sample."""
    torch = pytest.importorskip("torch", reason="PyTorch not installed: --distill needs the lmopt[torch] extra")
    from onnx import TensorProto, helper

    from lmopt.distill import _stack, _Student, _trainable
    from lmopt.latency.torch_translate import translate

    model = study.prepared.model
    student = _Student(translate(model), _trainable(model))
    stacked = _stack(study.data.score[:3])
    inputs = [torch.from_numpy(stacked[name]) for name in student.module.input_names]
    assert student.mode(inputs, batched=False) == "vmap"
    index = torch.tensor([2, 0, 1])
    with torch.no_grad():
        for mapped, alone in zip(student.run(inputs, index, "vmap"), student.run(inputs, index, "single")):
            torch.testing.assert_close(mapped, alone, rtol=1e-5, atol=1e-6)

    graph = helper.make_graph(
        [helper.make_node("Reshape", ["shape", "flat"], ["target"]),
         helper.make_node("Reshape", ["x", "target"], ["y"]), helper.make_node("MatMul", ["y", "w"], ["z"])],
        "values_as_shape",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6]),
         helper.make_tensor_value_info("shape", TensorProto.INT64, [1, 2])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
        [helper.make_tensor("flat", TensorProto.INT64, [1], [-1]),
         helper.make_tensor("w", TensorProto.FLOAT, [3, 2], [0.5] * 6)])
    reader = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    student = _Student(translate(reader), _trainable(reader))
    given = {"x": torch.ones(2, 6), "shape": torch.tensor([[2, 3], [2, 3]])}
    inputs = [given[name] for name in student.module.input_names]
    assert student.mode(inputs, batched=False) == "single"


def test_distillation_of_an_encoder_improves_cosine_on_unseen_tokens(study):
    """Three int64 inputs, int64 pass-through outputs, embeddings as the first output: the student
    trains its MatMul, bias and LayerNorm weights, and the cosine on tokens it never saw improves."""
    pytest.importorskip("torch", reason="PyTorch not installed: --distill needs the lmopt[torch] extra")
    from lmopt.candidates import removed_branches
    from lmopt.distill import _trainable, distill

    analysis = study.prepared.analysis
    # One MLP removed whole: a change the rest of the network must learn to make up for.
    change = next(c for c in study.prepared.candidates if removed_branches(analysis.chains[c.chain], c))
    compressed = apply_candidates(study.prepared.model, analysis, [change])
    features = [analysis.chains[change.chain].positions[change.end]]
    trainable = _trainable(compressed)
    assert any(".weight_t" in name for name in trainable) and any("norm" in name.lower() for name in trainable)
    distilled, report = distill(study.prepared.model, compressed, features, study.data.fit, study.data.score,
                                minutes=0.2, lr=1e-3, output_kind="embedding")
    assert report.epochs >= 1 and report.check_damage_after < report.check_damage_before
    unseen = token_feeds(24, seq=SEQ, seed=11)
    reference = run_outputs(study.prepared.model, unseen)

    def cosine_mean(model):
        return compare(reference, run_outputs(model, unseen), kind="embedding")["cosine_mean"]

    assert cosine_mean(distilled) > cosine_mean(compressed) + 0.005, (cosine_mean(compressed), cosine_mean(distilled))
    assert [n.op_type for n in distilled.graph.node] == [n.op_type for n in compressed.graph.node]

