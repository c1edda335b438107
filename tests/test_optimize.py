"""End to end on small models: optimize, profile -> plan from a table, the cache, the API.
Speed is never asserted here (that is bench/'s job); what is asserted is what must hold."""
import json

import numpy as np
import onnx
import pytest

import lmopt
from lmopt.calib import study_data
from lmopt.cli import main
from lmopt.errors import LmoptError
from lmopt.latency.signature import model_fingerprint
from lmopt.metrics import compare
from lmopt.onnxio import save_model
from lmopt.optimizer import SPEED_SLACK, Study
from lmopt.prepare import prepare
from lmopt.report import format_report, op_table
from lmopt.runtime import run_outputs
from lmopt.score import Refits, Scorer, score
from lmopt.select import choose, fastest, method_filter
from lmopt.verify import Report
from models.zoo import build

FAST = {"runs": 3, "min_time_s": 0.0, "warmup_s": 0.0}   # timing quality is not under test


@pytest.fixture(scope="module")
def small_resnet(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "resnet18.onnx"
    save_model(build("resnet18", image_size=32), path)
    return path


@pytest.fixture(scope="module")
def study(small_resnet, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache") / "latency.sqlite"
    return Study(small_resnet, calib_count=4, eval_count=4, cache_path=cache, progress=False,
                 backend_options=FAST)


@pytest.mark.parametrize("method", ["layermerge", "kim2023", "prune"])
def test_plans_respect_the_budget_and_give_a_valid_model(study, method):
    # Halfway to the fastest plan this method can build on the measured latencies: reachable
    # whatever the machine's timings, and far enough from 1x that something must change.
    cands = [c for c in study.prepared.candidates if method_filter(method, c)]
    best = study.latency.predicted_speedup(fastest(study.prepared.chain_lengths, cands, study.latency.block_ms))
    assert best > 1.05
    target = 1 + (best - 1) / 2
    plan, _, _, _ = study.choose(target, method, rounds=0)
    assert plan.target_met and plan.changes
    blocks_ms = sum(study.latency.block_ms[c.key] for c in plan.blocks)
    assert blocks_ms == pytest.approx(plan.planned_ms) and blocks_ms <= study.latency.budget(target) * (1 + 1e-9)
    for chain in study.prepared.analysis.chains:  # each chain covered once, block after block
        spans = sorted((c.start, c.end) for c in plan.blocks if c.chain == chain.index)
        assert [s for s, _ in spans] == [0] + [e for _, e in spans[:-1]] and spans[-1][1] == len(chain)
    model, report = study.plan(target, method, measure=False, rounds=0)
    onnx.checker.check_model(model)
    assert report.method == method and [c["block"] for c in report.changes] == [c.key for c in plan.changes]
    for change in report.changes:
        if method == "kim2023":
            assert not change["pruned"]
        if method == "prune":
            assert change["action"] in ("prune", "remove residual branch")
    # The report's fidelity is that of the returned model on the evaluation data.
    reference, got = run_outputs(study.prepared.model, study.data.eval), run_outputs(model, study.data.eval)
    assert report.fidelity == compare(reference, got)
    assert report.after["nodes"] == len(model.graph.node) < report.before["nodes"]


def test_a_study_plans_with_its_own_method_and_refuses_others():
    study = Study(build("resnet18", image_size=32), method="prune", calib_count=2, eval_count=2, cache_path=False,
                  progress=False, backend_options=FAST)
    _, report = study.plan(1.2, measure=False, rounds=0)
    assert report.method == "prune"
    assert all(change["action"] in ("prune", "remove residual branch") for change in report.changes)
    with pytest.raises(LmoptError, match="prune candidates only"):
        study.plan(1.2, "kim2023", measure=False)


def test_boundary_correction_keeps_plans_consistent_with_chain_timings(study):
    for chain in study.prepared.analysis.chains:
        length = len(chain)
        originals = [f"c{chain.index}:{k - 1}-{k}" for k in range(1, length + 1)]
        timed = sum(study.latency.timed_ms[k] for k in originals)
        corrected = sum(study.latency.block_ms[k] for k in originals)
        if timed > study.latency.chain_ms[chain.index]:   # blocks alone cost more than the chain: boundaries
            # A block whose give-back exceeds its own time stays at 0 ms, and the sum then stays above
            # the chain's time (runs=3 timings of tiny blocks make that happen now and then).
            clamped = any(study.latency.block_ms[k] == 0.0 for k in originals)
            assert corrected >= study.latency.chain_ms[chain.index] * (1 - 1e-6)
            if not clamped:
                assert corrected == pytest.approx(study.latency.chain_ms[chain.index], rel=1e-6)
        else:
            assert corrected == pytest.approx(timed)
        for cand in study.prepared.candidates:
            if cand.chain == chain.index:
                assert study.latency.block_ms[cand.key] <= study.latency.timed_ms[cand.key] + 1e-12
                if cand.start == 0 and cand.end == length:   # no inner boundary to give back
                    assert study.latency.block_ms[cand.key] == study.latency.timed_ms[cand.key]


def test_boundary_excess_is_shared_by_tensor_size_or_equally_among_positions(study):
    import onnx_graphsurgeon as gs

    from lmopt.profile import boundary_corrected, tensor_size

    prepared = study.prepared
    chain = max(prepared.analysis.chains, key=len)
    originals = [c for c in prepared.candidates if c.chain == chain.index and c.is_original]
    timed = {c.key: 10.0 for c in prepared.candidates}  # large enough that no give-back is clamped at 0
    chain_ms = {c.index: 10.0 * len(c) for c in prepared.analysis.chains}
    chain_ms[chain.index] = 10.0 * len(originals) - 0.5 * (len(chain) - 1)  # 0.5 ms per inner position
    equal = boundary_corrected(prepared.model, prepared.analysis, prepared.candidates, timed, chain_ms, by_size=False)
    sized = boundary_corrected(prepared.model, prepared.analysis, prepared.candidates, timed, chain_ms)
    for corrected in (equal, sized):  # either way the original plan sums to the chain's own time
        assert sum(corrected[c.key] for c in originals) == pytest.approx(chain_ms[chain.index])
    inner = [c for c in originals if 0 < c.start and c.end < len(chain)]
    # equal shares: a block with two inner ends gives back one share, whatever its tensors' sizes
    assert all(equal[c.key] == pytest.approx(9.5) for c in inner)
    sizes = {t.name: tensor_size(t.shape) for t in gs.import_onnx(prepared.model).tensors().values()}
    ends = [sizes[chain.positions[c.start]] + sizes[chain.positions[c.end]] for c in inner]
    assert len(set(ends)) > 1  # the chain's tensors differ in size, so the two forms differ
    give_back = [10.0 - sized[c.key] for c in inner]
    assert give_back[0] / give_back[-1] == pytest.approx(ends[0] / ends[-1])


def test_target_one_changes_nothing_and_outputs_are_identical(study):
    model, report = study.plan(1.0, "layermerge", measure=False)
    assert report.changes == []
    assert report.fidelity["max_abs"] == 0.0


def test_layermerge_is_never_worse_than_its_baselines_in_predicted_damage(study):
    # LayerMerge's candidate set contains both baselines' sets, so its DP optimum cannot be worse.
    def total_damage(method):
        from lmopt.select import select
        cands = [c for c in study.prepared.candidates if method_filter(method, c)]
        budget = study.latency.estimate_ms / 1.3 - study.latency.fixed_ms
        chosen = select(study.prepared.chain_lengths, cands, study.latency.block_ms, study.scores.damage, budget)
        return None if chosen is None else sum(study.scores.damage[c.key] for c in chosen[0])
    lm = total_damage("layermerge")
    for baseline in ("kim2023", "prune"):
        other = total_damage(baseline)
        if other is not None:
            assert lm <= other + 1e-12



def test_layermerge_keeps_the_removal_only_plan_where_it_is_less_damaging_on_held_out_data(study, monkeypatch):
    # Summed block damages mislead where merged blocks interact, so LayerMerge also checks the plan
    # of its removal-only candidates (prune's) whole and keeps the one less damaging on held-out data.
    cands = [c for c in study.prepared.candidates if method_filter("prune", c)]
    best = study.latency.predicted_speedup(fastest(study.prepared.chain_lengths, cands, study.latency.block_ms))
    target = 1 + (best - 1) / 2
    plan, model, _, history = study.choose(target, rounds=0)
    assert [h["candidates"] for h in history] == ["layermerge", "prune"]
    least = min(history, key=lambda h: h["check_damage"])
    assert [c.key for c in plan.changes] == least["changes"]
    assert study.checker.damage(model) == pytest.approx(least["check_damage"])

    # Made to look worse than it is, the LayerMerge plan gives way to the removal-only one.
    removal_only = [c.key for c in study.choose(target, "prune", rounds=0)[0].changes]
    real_damage, calls = study.checker.damage, []

    def layermerge_plan_looks_worse(model):
        calls.append(model)
        return real_damage(model) + (10.0 if len(calls) == 1 else 0.0)

    monkeypatch.setattr(study.checker, "damage", layermerge_plan_looks_worse)
    plan, _, _, history = study.choose(target, rounds=0)
    # One check per distinct plan: a plan both DPs reach is built and checked once.
    assert len(calls) == len({tuple(h["changes"]) for h in history}) and [c.key for c in plan.changes] == removal_only
    assert all(len(c.pruned) == c.length for c in plan.changes)
    calls.clear()
    _, report = study.plan(target, rounds=0, measure=False)
    assert report.method == "layermerge" and [c["block"] for c in report.changes] == removal_only
    if history[0]["changes"] != history[1]["changes"]:  # the report names both DPs' plans and the one kept
        line = next(x for x in format_report(report).splitlines() if "removal-only DP" in x)
        assert line.endswith(f"its removal-only DP {history[1]['check_damage']:.4f} (kept)")


def test_warm_run_retimes_and_rescores_nothing(small_resnet, tmp_path, monkeypatch):
    from lmopt.latency import ort_cpu
    calls = {"measure": 0}
    original = ort_cpu.OrtCpuBackend.measure

    def counting(self, model):
        calls["measure"] += 1
        return original(self, model)

    scored = {"count": 0}
    original_score = Scorer.score

    def counting_score(self, *args):
        scored["count"] += 1
        return original_score(self, *args)

    monkeypatch.setattr(ort_cpu.OrtCpuBackend, "measure", counting)
    monkeypatch.setattr(Scorer, "score", counting_score)
    cache = tmp_path / "latency.sqlite"
    options = dict(calib_count=2, eval_count=2, cache_path=cache, progress=False, backend_options=FAST)
    study = Study(small_resnet, **options)
    assert calls["measure"] > 1
    assert scored["count"] == sum(1 for c in study.prepared.candidates if not c.is_original)
    calls["measure"] = scored["count"] = 0
    Study(small_resnet, **options)
    assert calls["measure"] == 0   # the whole model is cached like every block
    assert scored["count"] == 0    # nothing was re-scored


@pytest.fixture(scope="module")
def profiled(small_resnet, tmp_path_factory):
    """`lmopt profile` of small_resnet: the latency table's path."""
    table = tmp_path_factory.mktemp("table") / "table.json"
    assert main(["profile", str(small_resnet), "-o", str(table), "-q", "--no-cache"]) == 0
    return table


def test_profile_then_plan_from_the_table(small_resnet, profiled, tmp_path):
    table = profiled
    out = tmp_path / "fast.onnx"
    data = json.loads(table.read_text())
    assert data["format"] == "lmopt-latency-table" and data["blocks"]
    candidates = prepare(str(small_resnet)).candidates
    assert {c.key for c in candidates} < set(data["blocks"]) and data["model_ms"] > 0
    assert main(["optimize", str(small_resnet), "--target", "1.2x", "--latency-table", str(table),
                 "-o", str(out), "-q", "--no-cache", "--calib-count", "2", "--eval-count", "2",
                 "--json", str(tmp_path / "report.json")]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["latency_source"] == str(table) and report["written_to"] == str(out)
    assert report["measured_ms"] is not None  # the table was made on this machine: measured here
    onnx.checker.check_model(onnx.load(out))


def test_a_table_of_another_model_is_refused(small_resnet, profiled, tmp_path, capsys):
    # The same network with other weights: a table profiled on it carries that model's fingerprint.
    other = prepare(build("resnet18", image_size=32, seed=1)).model
    data = json.loads(profiled.read_text())
    assert data["model_fingerprint"] != model_fingerprint(other)
    table = tmp_path / "table.json"
    table.write_text(json.dumps({**data, "model_fingerprint": model_fingerprint(other)}))
    code = main(["optimize", str(small_resnet), "--target", "1.2", "--latency-table", str(table),
                 "-o", str(tmp_path / "x.onnx"), "-q", "--no-cache"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and "another model" in err[0]
    assert not (tmp_path / "x.onnx").exists()


def test_python_api_returns_model_and_report(small_resnet, tmp_path):
    model, report = lmopt.optimize(str(small_resnet), target=1.2, calib_count=2, eval_count=2,
                                   cache_path=False, progress=False, backend_options=FAST)
    assert isinstance(model, onnx.ModelProto) and report.target == 1.2 and report.method == "layermerge"
    assert report.target_met and report.predicted_speedup >= 1.2 * (1 - 1e-6)
    assert len(report.measured_ms) == 2 and report.to_json()["prediction_error"] == report.prediction_error
    assert op_table(model) == report.after
    with pytest.raises(LmoptError, match="at least 1"):
        lmopt.optimize(str(small_resnet), target=0.5)


def test_calibration_arrays_drive_importance(small_resnet, tmp_path):
    prepared = prepare(str(small_resnet))
    changes = [c for c in prepared.candidates if not c.is_original]
    prepared.candidates = [c for c in prepared.candidates if c.is_original] + changes[::4]  # a sample is enough
    rng = np.random.default_rng(0)
    damages = []
    for name, scale in (("wide", 3.0), ("narrow", 0.1)):
        calib = tmp_path / f"{name}.npy"
        np.save(calib, scale * rng.standard_normal((6, 3, 32, 32)).astype(np.float32))
        data = study_data(prepared.model, str(calib), 3, 3)
        assert "held-out" in data.note and len(data.eval) == 3 and len(data.fit) == 1
        # the held-out part is the end of the file, never calibration data
        assert np.array_equal(data.eval[-1]["input"], np.load(calib)[5:6])
        damages.append(score(prepared, data, Refits(prepared, data.fit), progress=False).damage)
    changed = [key for key in damages[0] if abs(damages[0][key] - damages[1][key]) > 1e-6 * (1 + damages[0][key])]
    assert len(changed) > len(damages[0]) // 2  # the data, not the structure alone, decides the scores


def test_a_table_at_another_precision_carries_the_fp32_time(small_resnet, profiled, tmp_path):
    from lmopt.profile import from_file

    prepared = prepare(str(small_resnet))
    data = json.loads(profiled.read_text())
    data["backend"]["precision"] = "int8"
    table = tmp_path / "int8.json"
    table.write_text(json.dumps(data))
    with pytest.raises(LmoptError, match="without the fp32 model's"):
        from_file(prepared, str(table))
    table.write_text(json.dumps({**data, "model_fp32_ms": 2.0 * data["model_ms"]}))
    latency = from_file(prepared, str(table))
    originals = sum(latency.block_ms[c.key] for c in prepared.candidates if c.is_original)
    assert latency.precision == "int8" and latency.precision_gain == pytest.approx(2.0)
    assert latency.predicted_speedup(originals) == pytest.approx(2.0)  # the original at int8: precision alone
    assert latency.fp32_ms == pytest.approx(2.0 * data["model_ms"])


def test_a_scorer_within_a_small_memory_budget_scores_the_same(small_resnet):
    """The original's values a Scorer keeps are bounded by its budget: a budget of one tensor drops
    and recomputes them (more runs of the original), and every damage is the same as with room for all."""
    from lmopt.candidates import Candidate
    from lmopt.passes.merge import rewrite_prefix
    from lmopt.prepare import candidate_graph
    from lmopt.score import chain_positions

    prepared = prepare(str(small_resnet))
    feeds = study_data(prepared.model, None, 8, 2).score
    positions = chain_positions(prepared)
    roomy = Scorer(prepared.model, feeds, positions)
    one = max(roomy.sample_bytes.values()) * len(feeds)
    tight = Scorer(prepared.model, feeds, positions, budget_bytes=one)
    blocks = [c for c in prepared.candidates if not c.is_original and isinstance(c, Candidate)][:40]
    for cand in blocks:
        graph = candidate_graph(prepared, cand)
        for scorer in (roomy, tight):
            scorer.result = scorer.score(graph.copy(), rewrite_prefix(cand))
        assert tight.result == roomy.result
        kept = sum(v.nbytes for name, v in tight.stacked.items() if name not in tight.inputs)
        assert kept <= 3 * one  # the budget, or what the current request alone needs (at most 3 tensors here)
    assert tight.fetches > roomy.fetches
    assert sum(v.nbytes for name, v in roomy.stacked.items() if name not in roomy.inputs) > one  # it did bind


@pytest.mark.parametrize("measured, while_chosen, warned, why", [
    (1.20, None, True, "the prediction was optimistic"), (1.27, None, False, ""),
    (1.22, 1.26, True, "though 1.26x while it was chosen"), (1.22, 1.21, True, "the prediction was optimistic")])
def test_the_report_says_when_the_measured_speedup_falls_short_of_a_target_met_by_prediction(measured, while_chosen,
                                                                                            warned, why):
    ops = {"nodes": 1, "ops": {"Conv": 1}, "params": 1, "size_mb": 0.0}
    report = Report(target=1.25, method="layermerge", backend={"backend": "ort-cpu"}, latency_source="measured",
                    latency_scale=1.0, target_met=True, original_ms=5.0, predicted_ms=3.95, predicted_speedup=1.266,
                    fidelity={"nrmse": 0.1}, primary_output="y", outputs={}, importance_data="16 random inputs",
                    refit=True, candidates=3, changes=[], before=ops, after=ops, canonicalisation={},
                    measured_ms=[5.0, 5.0 / measured], measured_speedup=measured,
                    speed_checks=[] if while_chosen is None else [
                        {"changes": [], "predicted_speedup": 1.266, "measured_speedup": while_chosen,
                         "check_damage": 0.1, "chosen": True, "kept": True}])
    text = format_report(report)
    assert ("measured below the 1.25x target" in text) == warned
    assert why in text
    assert (while_chosen is not None) == (f"{while_chosen}x while it was chosen" in text)
    # The other DP's plan, measured beside the chosen one and kept because only it met the target.
    report.speed_checks = [{"changes": ["a"], "predicted_speedup": 1.266, "measured_speedup": 1.22,
                            "check_damage": 0.1, "chosen": True, "kept": False},
                           {"changes": ["b"], "predicted_speedup": 1.3, "measured_speedup": 1.27,
                            "check_damage": 0.2, "chosen": False, "kept": True}]
    assert ("plans measured while choosing: 1 changes predicted 1.27x measured 1.22x; 1 changes predicted 1.30x "
            "measured 1.27x (the other DP's plan) (kept)") in format_report(report)


def _classifier_fidelity(top1: float, kl: float) -> dict:
    return {"nrmse": 0.1, "kl": kl, "top1_agreement": top1, "top5_contains": 1.0, "confident_agreement": top1,
            "confident_count": 100, "weighted_flips": 1.0 - top1}


def test_classifier_damage_weights_each_changed_answer_by_the_originals_confidence():
    from lmopt.metrics import damage

    sure, unsure = [8.0, 0.0, 0.0], [0.1, 0.0, 0.0]  # top-1 probability 0.9993 and 0.356
    reference = np.array([sure, unsure])
    top_prob = [float(np.exp(row).max() / np.exp(row).sum()) for row in reference]
    flip_sure = compare(reference, np.array([[0.0, 8.0, 0.0], unsure]))
    flip_unsure = compare(reference, np.array([sure, [0.0, 0.1, 0.0]]))
    assert flip_sure["top1_agreement"] == flip_unsure["top1_agreement"] == 0.5
    assert flip_sure["weighted_flips"] == pytest.approx(top_prob[0] / sum(top_prob), rel=1e-6)
    assert flip_unsure["weighted_flips"] == pytest.approx(top_prob[1] / sum(top_prob), rel=1e-6)
    assert damage(flip_sure) - flip_sure["kl"] > 2 * (damage(flip_unsure) - flip_unsure["kl"]) > 0
    # Logits around 1e-8 (every answer a near-tie): KL is ~0, the weights are equal, and a change
    # still costs its plain flip rate, so such a model cannot make every candidate look free.
    tiny = compare(reference * 1e-8, np.array([[0.0, 8.0, 0.0], [0.0, 0.1, 0.0]]) * 1e-8)
    assert tiny["kl"] < 1e-12 and damage(tiny) == pytest.approx(1.0 - tiny["top1_agreement"]) == pytest.approx(1.0)


@pytest.mark.parametrize("int8_speedup, int8_top1, noted", [(1.54, 1.0, True), (1.20, 1.0, False), (1.54, 0.5, False)])
def test_the_report_recommends_int8_alone_when_it_reaches_the_target_with_less_damage(int8_speedup, int8_top1, noted):
    ops = {"nodes": 1, "ops": {"Conv": 1}, "params": 1, "size_mb": 0.0}
    report = Report(target=1.25, method="layermerge", backend={"backend": "ort-cpu"}, latency_source="measured",
                    latency_scale=1.0, target_met=True, original_ms=5.0, predicted_ms=3.95, predicted_speedup=1.266,
                    fidelity=_classifier_fidelity(0.9, 0.3), primary_output="y", outputs={},
                    importance_data="16 random inputs", refit=True, candidates=3, changes=[], before=ops, after=ops,
                    canonicalisation={}, measured_ms=[5.0, 3.9], measured_speedup=5.0 / 3.9,
                    baselines={"int8 alone": _classifier_fidelity(int8_top1, 0.04)},
                    baseline_speedups={"int8 alone": int8_speedup})
    assert report.better_baselines == (["int8 alone"] if noted else [])
    assert report.to_json()["better_baselines"] == report.better_baselines
    assert ("note: int8 alone reaches the 1.25x target too and moves the outputs less than this plan: "
            "--precision int8" in format_report(report)) == noted
    report.precision = "int8"  # already quantized: the way to INT8 alone is a lower target
    assert ("moves the outputs less than this plan: a --target at or below its speed-up"
            in format_report(report)) == noted


def test_a_table_fit_to_a_measured_plan_predicts_that_measurement_and_keeps_the_original():
    from lmopt.profile import LatencyTable, fit_to_measured

    blocks = {"a": 3.0, "b": 5.0, "merged": 2.0}
    table = LatencyTable({}, "test", dict(blocks), dict(blocks), {}, 10.0, 2.0, 10.0)  # original: fixed 2 + a + b
    planned = 2.0 + 3.0  # "merged" in place of "b": predicted 10 / 7
    fitted = fit_to_measured(table, planned, 1.25, table.predicted_speedup(planned))
    assert fitted.predicted_speedup(fitted.block_ms["merged"] + fitted.block_ms["a"]) == pytest.approx(1.25)
    assert fitted.predicted_speedup(fitted.block_ms["a"] + fitted.block_ms["b"]) == pytest.approx(1.0)
    assert fitted.estimate_ms == table.estimate_ms and fitted.scale == pytest.approx(2.0 / 3.0)
    assert "1.25x measured, 1.43x predicted" in fitted.fit
    assert fit_to_measured(table, 8.0, 1.1, 1.0) is None   # a plan that saves nothing gives no line
    assert fit_to_measured(table, planned, 0.9, 1.43) is None   # measured slower than the original
    assert fit_to_measured(table, planned, 1.9, 1.43) is None   # would need a negative fixed time


def test_a_table_fit_between_two_measured_plans_predicts_both_and_refuses_a_reversed_pair():
    from lmopt.profile import LatencyTable, fit_between

    blocks = {"a": 3.0, "b": 5.0, "merged": 2.0}
    table = LatencyTable({}, "test", dict(blocks), dict(blocks), {}, 10.0, 2.0, 10.0)
    fitted = fit_between(table, (6.0, 1.2), (4.0, 1.6))  # (planned ms on `table`, measured speed-up)
    assert fitted.predicted_speedup(fitted.scale * 6.0) == pytest.approx(1.2)
    assert fitted.predicted_speedup(fitted.scale * 4.0) == pytest.approx(1.6)
    assert fitted.block_ms["merged"] == pytest.approx(2.0 * fitted.scale) and fitted.estimate_ms == 10.0
    assert "1.20x and 1.60x measured" in fitted.fit
    assert fit_between(table, (4.0, 1.2), (6.0, 1.6)) is None  # the faster plan has more planned ms
    assert fit_between(table, (6.0, 1.6), (4.0, 1.2)) is None  # the "slow" plan measured faster


def test_once_plans_measured_on_both_sides_of_the_target_the_next_is_chosen_between_them(study, monkeypatch):
    # A runtime where deep plans save more per table millisecond than shallow ones (seen on
    # EfficientNet-Lite1, bench/RESULTS.md): the fit through one plan and the original
    # overshoots. Once one plan measured short of the target and one past it, the next is chosen
    # on the line through both measurements.
    table = study.latency
    original = table.estimate_ms - table.fixed_ms

    def true_speedup(blocks: float) -> float:
        saved = max(0.0, original - blocks) / original
        return table.estimate_ms / (table.estimate_ms - original * (0.3 * saved + 0.9 * saved ** 2))

    calls, measured = [], []  # (the table, the kept plan's blocks) of each choice; (plan blocks, measured)
    chosen_on = Study._choose_families

    def recording(self, target, method, rounds, table):
        found, history = chosen_on(self, target, method, rounds, table)
        calls.append((table, found[0][1].blocks))
        return found, history

    def simulated(self, plan, optimized, edges=()):
        measured.append((plan.blocks, true_speedup(sum(table.block_ms[c.key] for c in plan.blocks))))
        return measured[-1][1], 3

    monkeypatch.setattr(Study, "_choose_families", recording)
    monkeypatch.setattr(Study, "measured_speedup", simulated)
    best = true_speedup(fastest(study.prepared.chain_lengths, study.prepared.candidates, table.block_ms))
    prepared = study.prepared

    def first_plan_kept(target: float) -> bool:  # then nothing is chosen again and the case is not exercised
        plan = choose(table, prepared.chain_lengths, prepared.candidates, study.scores.damage, target, "layermerge",
                      prepared.segments)
        return target <= true_speedup(plan.planned_ms) <= target * (1 + SPEED_SLACK)

    # The table is this machine's timing of a tiny model: pick a target its first plan misses.
    target = next(t for t in (1 + (best - 1) * f for f in (0.5, 0.4, 0.6, 0.3, 0.7)) if not first_plan_kept(t))
    _, report = study.plan(target, rounds=0, corrections=4)
    assert [c["measured_speedup"] for c in report.speed_checks] == [m for _, m in measured]
    # Each plan is measured once; the fits go through the plans the choices kept (the other DP's
    # plans measured beside them are only candidates for the final choice).
    keys = [tuple(c.key for c in blocks) for blocks, _ in measured]
    assert len(set(keys)) == len(keys)
    speed_of = {k: m for k, (_, m) in zip(keys, measured)}
    kept_plans = [tuple(c.key for c in blocks) for _, blocks in calls]
    assert {tuple(c["changes"]) for c in report.speed_checks if c["chosen"]} == {
        tuple(c.key for c in blocks if not c.is_original) for _, blocks in calls}
    speeds = [speed_of[k] for k in kept_plans]
    bracketed = [k for k in range(len(speeds))
                 if min(speeds[:k + 1]) < target < max(speeds[:k + 1]) / (1 + SPEED_SLACK)]
    assert bracketed and bracketed[0] + 1 < len(calls), speeds  # the simulation brackets the target
    k = bracketed[0]
    between = calls[k + 1][0]  # the table the plan after the bracket was chosen on
    assert "either side of the target" in between.fit
    slow = max((s for s in speeds[:k + 1] if s < target))
    fast = min((s for s in speeds[:k + 1] if s > target * (1 + SPEED_SLACK)))
    for speedup in (slow, fast):  # the line through both predicts what each measured
        blocks = calls[speeds.index(speedup)][1]
        assert between.predicted_speedup(sum(between.block_ms[c.key] for c in blocks)) == pytest.approx(speedup)
    kept = [c for c in report.speed_checks if c["kept"]]
    assert len(kept) == 1 and kept[0]["measured_speedup"] >= target


def test_the_other_dps_plan_is_measured_once_kept_where_only_it_meets_the_target_and_never_fit_through(
        study, monkeypatch):
    # Two real plans of the study stand for what LayerMerge's DP kept (less damaging) and what the
    # removal-only DP reached; their measurements are scripted, so nothing here depends on timings.
    table, prepared = study.latency, study.prepared
    best = table.predicted_speedup(fastest(prepared.chain_lengths, prepared.candidates, table.block_ms))
    kept_plan, other_plan = (choose(table, prepared.chain_lengths, prepared.candidates, study.scores.damage,
                                    1 + (best - 1) * f, family, prepared.segments) for f, family in
                             ((0.3, "layermerge"), (0.8, "prune")))
    assert kept_plan.changes and [c.key for c in kept_plan.changes] != [c.key for c in other_plan.changes]
    target = kept_plan.predicted_speedup  # the kept plan measures 3% short of its prediction, the other far past it
    speed = {id(kept_plan): 0.97 * target, id(other_plan): 1.1 * target}
    first, second = (0.1, kept_plan, None, []), (0.2, other_plan, None, [])
    scripted, tables, measured = [[first, second], [first, second]], [], []

    def families(self, target, method, rounds, table):
        tables.append(table)
        return scripted[len(tables) - 1], []

    def simulated(self, plan, optimized, edges=()):
        # Measured until clear of the band's edges, where the target and the band's top decide.
        assert edges == (target, target * (1 + SPEED_SLACK))
        measured.append(id(plan))
        return speed[id(plan)], 3

    monkeypatch.setattr(Study, "_choose_families", families)
    monkeypatch.setattr(Study, "measured_speedup", simulated)
    plan, _, _, _, _, checks = study.choose_measured(target, rounds=0, corrections=2)
    # The first choice measures both; the kept one falls short, so the table is fit through it
    # alone (with the original), not between it and the other plan, which measured past the band.
    assert measured == [id(kept_plan), id(other_plan)]
    assert len(tables) == 2 and "a plan measured whole" in tables[1].fit
    # The second choice keeps the same plan again: its measurement stands and the search stops;
    # the other plan, the only one that measured at least the target, is kept.
    assert plan is other_plan
    assert [(c["chosen"], c["kept"]) for c in checks] == [(True, False), (False, True)]
    assert [c["measured_speedup"] for c in checks] == [speed[id(kept_plan)], speed[id(other_plan)]]

    # A plan measured as the other DP's and kept by a later choice is not measured again: here it
    # measured within the band, so the search stops at it.
    tables.clear(), measured.clear()
    speed[id(other_plan)], scripted[1] = 1.01 * target, [second, first]
    plan, _, _, _, table_kept, checks = study.choose_measured(target, rounds=0, corrections=2)
    assert measured == [id(kept_plan), id(other_plan)] and plan is other_plan and table_kept is tables[1]
    assert [(c["chosen"], c["kept"]) for c in checks] == [(True, False), (True, True)]


def test_where_every_plan_fell_short_the_table_is_fit_through_the_one_that_saved_least_per_table_ms(study):
    # Two real plans with scripted measurements: the shallow one saved 90% of what the table said,
    # the deep one (far more blocks removed on the table) measured a little slower still, so the fit
    # through the one nearest the target would not be the most pessimistic (or optimistic) one.
    table, prepared = study.latency, study.prepared
    best = table.predicted_speedup(fastest(prepared.chain_lengths, prepared.candidates, table.block_ms))
    shallow, deep = (choose(table, prepared.chain_lengths, prepared.candidates, study.scores.damage,
                            1 + (best - 1) * f, "layermerge", prepared.segments) for f in (0.3, 0.8))
    assert shallow.planned_ms > deep.planned_ms
    shallow_speedup = 1 + 0.9 * (shallow.predicted_speedup - 1)
    deep_speedup = 0.98 * shallow_speedup

    def entry(plan, measured):
        return {"result": (plan,), "measured": measured}

    def predicted(fitted, plan):
        return fitted.predicted_speedup(sum(fitted.block_ms[c.key] for c in plan.blocks))

    measured = [entry(shallow, shallow_speedup), entry(deep, deep_speedup)]
    # Both short of a target at the shallow plan's prediction: through the deep one, the pessimist.
    fitted = study._fit_to_tried(measured, shallow.predicted_speedup)
    assert predicted(fitted, deep) == pytest.approx(deep_speedup) and predicted(fitted, shallow) < shallow_speedup
    # Both past the band of a lower target: through the shallow one, the optimist.
    low_target = 1 + 0.5 * (shallow.predicted_speedup - 1)
    assert deep_speedup > low_target * (1 + SPEED_SLACK)
    fitted = study._fit_to_tried(measured, low_target)
    assert predicted(fitted, shallow) == pytest.approx(shallow_speedup) and predicted(fitted, deep) > deep_speedup
    # One on either side: the line through both, as before.
    fast_speedup = 1 + 0.9 * (deep.predicted_speedup - 1)
    assert fast_speedup > shallow.predicted_speedup * (1 + SPEED_SLACK)
    fitted = study._fit_to_tried([entry(shallow, shallow_speedup), entry(deep, fast_speedup)],
                                 shallow.predicted_speedup)
    assert "either side" in fitted.fit
    assert [predicted(fitted, p) for p in (shallow, deep)] == pytest.approx([shallow_speedup, fast_speedup])


def test_a_plan_measured_below_its_target_is_chosen_again_on_latencies_fit_to_it(study, monkeypatch):
    # A runtime where removing blocks saves 70% of what the table says: CNN plans on ONNX Runtime
    # CPU saved about 80% (bench/RESULTS.md). The first plan measures below the target; the plan
    # chosen on the fitted table meets it, and its prediction is what it measured.
    table = study.latency

    def true_speedup(blocks: float) -> float:
        original = table.estimate_ms - table.fixed_ms
        return table.estimate_ms / (table.fixed_ms + 0.3 * original + 0.7 * blocks)

    measured = []

    def simulated(self, plan, optimized, edges=()):
        measured.append(true_speedup(sum(table.block_ms[c.key] for c in plan.blocks)))
        return measured[-1], 3

    monkeypatch.setattr(Study, "measured_speedup", simulated)
    best = true_speedup(fastest(study.prepared.chain_lengths, study.prepared.candidates, table.block_ms))
    target = 1 + (best - 1) / 2
    first = study.choose(target, rounds=0)[0]
    assert first.target_met and true_speedup(first.planned_ms) < target  # the table alone falls short
    _, report = study.plan(target, rounds=0)
    checks = report.speed_checks
    assert len(checks) >= 2 and checks[0]["changes"] == [c.key for c in first.changes]
    assert [c["measured_speedup"] for c in checks] == measured
    kept = [c for c in checks if c["kept"]]
    assert len(kept) == 1 and kept[0]["measured_speedup"] >= target
    assert [c["block"] for c in report.changes] == kept[0]["changes"]
    assert report.predicted_speedup == pytest.approx(kept[0]["measured_speedup"], rel=1e-6)
    assert report.target_met and report.latency_scale == pytest.approx(0.7) and "measured" in report.latency_fit
    assert "plans measured while choosing" in format_report(report)
    measured.clear()
    _, unchanged = study.plan(target, rounds=0, corrections=0)
    assert not measured and not unchanged.speed_checks
    assert [c["block"] for c in unchanged.changes] == [c.key for c in first.changes]


def test_the_report_takes_the_measurement_of_median_speed_up_each_model_paired_with_the_original():
    from lmopt.verify import measure

    original, optimized, depth = onnx.ModelProto(), onnx.ModelProto(), onnx.ModelProto()

    class Runner:  # interleaved pair measurements: [original ms, other ms]
        def __init__(self):
            self.answers = {id(optimized): [[10.0, 5.0], [10.0, 8.0], [12.0, 8.0]],
                            id(depth): [[10.0, 8.0], [9.0, 9.0], [12.0, 6.0]]}

        def measure_interleaved(self, models):
            assert len(models) == 2 and models[0] is original
            return self.answers[id(models[1])].pop(0)

    ms, speedup, parts, runs = measure(Runner(), original, optimized, {"depth": depth, "same": optimized}, runs=3)
    # optimized: speed-ups 2.0, 1.25, 1.5, the median is the third pair, taken whole; depth: 1.25, 1.0, 2.0
    assert ms == [12.0, 8.0] and speedup == 1.5 and parts == {"depth": 1.25, "same": 1.5} and runs == 3
    single = Runner()
    assert measure(single, original, optimized, {"depth": depth})[1] == 2.0
    assert [len(a) for a in single.answers.values()] == [2, 2]  # one pair each, `optimized` not again


def test_a_plan_is_measured_again_while_a_deciding_speedup_lies_among_its_measurements():
    from lmopt.verify import measure

    original, optimized = onnx.ModelProto(), onnx.ModelProto()

    class Runner:  # scripted interleaved pairs [original ms, plan ms]: the plan's speed-up is 10 / ms
        def __init__(self, speedups):
            self.pairs = [[10.0, 10.0 / s] for s in speedups]
            self.taken = 0

        def measure_interleaved(self, models):
            self.taken += 1
            return self.pairs.pop(0)

    def measured(speedups, edges, most_runs=7):
        runner = Runner(speedups)
        _, speedup, _, runs = measure(runner, original, optimized, {}, 3, edges, most_runs)
        assert runs == runner.taken
        return pytest.approx(speedup), runs

    # The target 1.25 lies between the measurements either side of the median (at first the lowest
    # and the highest): two more each time, until it no longer does or 7 are taken.
    clears = [1.24, 1.27, 1.26, 1.255, 1.262]  # five: 1.255 < median 1.26 < 1.262, clear of 1.25
    assert measured(clears, (1.25,)) == (1.26, 5)
    stays = [1.24, 1.27, 1.26, 1.245, 1.255, 1.248, 1.258]  # five: 1.245 < 1.25 < 1.26; seven: the cap
    assert measured(stays, (1.25,)) == (1.255, 7)
    assert measured(stays, (1.25,), most_runs=5) == (1.255, 5)
    assert measured(stays, (1.25,), most_runs=0) == (1.26, 3)  # the report without most_runs: as before
    assert measured(stays, (1.2, 1.3)) == (1.26, 3)  # clear of every edge: three decide
    # A part (depth alone, a baseline) is measured `runs` times whatever the edges: only the plan is.
    part = onnx.ModelProto()

    class Both(Runner):
        def measure_interleaved(self, models):
            self.taken += 1
            return self.pairs.pop(0) if models[1] is optimized else [10.0, 10.0 / stays[self.taken % 3]]

    both = Both([1.3, 1.31, 1.32])
    _, _, parts, runs = measure(both, original, optimized, {"part": part}, 3, (1.25,), 7)
    assert runs == 3 and both.taken == 6 and parts == {"part": pytest.approx(1.26)}
    # The band's top decides too: a plan measured around 1.30 against a band [1.25, 1.30].
    assert measured([1.29, 1.32, 1.31, 1.33, 1.34], (1.25, 1.3)) == (1.32, 5)


def test_the_report_measures_the_plan_again_while_the_target_lies_among_its_measurements(study, monkeypatch):
    import lmopt.verify

    seen, measure = [], lmopt.verify.measure

    def recording(runner, original, optimized, parts, runs=1, edges=(), most_runs=0):
        seen.append((runs, edges, most_runs))
        return measure(runner, original, optimized, parts, runs, edges, most_runs)

    monkeypatch.setattr(lmopt.verify, "measure", recording)
    _, report = study.plan(1.3, rounds=0, corrections=0)
    assert seen == [(3, (1.3,), 7)] and report.measured_runs in (3, 5, 7)


def test_an_fp32_report_on_ort_cpu_shows_int8_alone_beside_the_plan(study):
    from lmopt.quantize import quantize_int8

    _, report = study.plan(1.3, rounds=0, corrections=0)
    quantized = quantize_int8(study.prepared.model, study.data.fit)  # as --precision int8 would
    assert report.baselines == {"int8 alone": compare(run_outputs(study.prepared.model, study.data.eval),
                                                      run_outputs(quantized, study.data.eval))}
    assert set(report.baseline_speedups) == {"int8 alone"} and report.baseline_speedups["int8 alone"] > 0
    assert report.speedup_parts == {}  # INT8 is a comparison here, not a part of the plan's speed-up
    text = format_report(report)
    assert f"for comparison, int8 alone ({report.baseline_speedups['int8 alone']:.2f}x, measured alongside)" in text
    _, unmeasured = study.plan(1.3, rounds=0, measure=False)
    assert "int8 alone" in unmeasured.baselines and unmeasured.baseline_speedups == {}
