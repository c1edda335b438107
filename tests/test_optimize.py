"""End to end on small models: optimize, profile -> plan from a table, the cache, the API.
Speed is never asserted here (that is bench/'s job); what is asserted is what must hold."""
import json

import numpy as np
import onnx
import pytest

import lmopt
from lmopt.cli import main
from lmopt.errors import LmoptError
from lmopt.onnxio import save_model
from lmopt.optimizer import Study
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
                 backend_options=FAST, log=lambda *a: None)


@pytest.mark.parametrize("method", ["layermerge", "kim2023", "prune"])
def test_plans_respect_the_budget_and_give_a_valid_model(study, method):
    model, report = study.plan(1.3, method, measure=False)
    onnx.checker.check_model(model)
    planned = report["predicted_ms"] * report["predicted_speedup"]  # = original estimate
    assert planned == pytest.approx(report["original_ms"], rel=1e-6)
    if report["target_met"]:
        assert report["predicted_speedup"] >= 1.3 * 0.98   # discretisation slack of the DP
    for change in report["changes"]:
        if method == "kim2023":
            assert not change["pruned"]
        if method == "prune":
            assert change["action"] in ("prune", "remove residual branch")
    fid = report["fidelity"]
    assert 0.0 <= fid["top1_agreement"] <= 1.0 and fid["kl"] >= 0.0


def test_boundary_correction_keeps_plans_consistent_with_chain_timings(study):
    for chain in study.analysis.chains:
        length = len(chain)
        originals = [f"c{chain.index}:{k - 1}-{k}" for k in range(1, length + 1)]
        timed = sum(study.timed_latency[k] for k in originals)
        corrected = sum(study.latency[k] for k in originals)
        if timed > study.chain_ms[chain.index]:   # blocks alone cost more than the chain: boundaries
            assert corrected == pytest.approx(study.chain_ms[chain.index], rel=1e-6)
        else:
            assert corrected == pytest.approx(timed)
        for cand in study.candidates:
            if cand.chain == chain.index:
                assert study.latency[cand.key] <= study.timed_latency[cand.key] + 1e-12
                if cand.start == 0 and cand.end == length:   # no inner boundary to give back
                    assert study.latency[cand.key] == study.timed_latency[cand.key]


def test_target_one_changes_nothing_and_outputs_are_identical(study):
    model, report = study.plan(1.0, "layermerge", measure=False)
    assert report["changes"] == []
    assert report["fidelity"]["max_abs"] == 0.0


def test_layermerge_is_never_worse_than_its_baselines_in_predicted_damage(study):
    # LayerMerge's candidate set contains both baselines' sets, so its DP optimum cannot be worse.
    def total_damage(method):
        from lmopt.select import method_filter, select
        cands = [c for c in study.candidates if method_filter(method, c)]
        budget = study.estimate_ms / 1.3 - study.fixed_ms
        chosen = select(study.chain_lengths, cands, study.latency, study.damage, budget)
        return None if chosen is None else sum(study.damage[c.key] for c in chosen[0])
    lm = total_damage("layermerge")
    for baseline in ("kim2023", "prune"):
        other = total_damage(baseline)
        if other is not None:
            assert lm <= other + 1e-12



def test_warm_run_retimes_and_rescores_nothing(small_resnet, tmp_path, monkeypatch):
    from lmopt.latency import ort_cpu
    calls = {"measure": 0}
    original = ort_cpu.OrtCpuBackend.measure

    def counting(self, model):
        calls["measure"] += 1
        return original(self, model)

    monkeypatch.setattr(ort_cpu.OrtCpuBackend, "measure", counting)
    cache = tmp_path / "latency.sqlite"
    options = dict(calib_count=2, eval_count=2, cache_path=cache, progress=False, backend_options=FAST,
                   log=lambda *a: None)
    Study(small_resnet, **options)
    cold = calls["measure"]
    calls["measure"] = 0
    warm = Study(small_resnet, **options)
    assert calls["measure"] == 0   # the whole model is cached like every block
    assert warm._scorers == {}     # nothing was re-scored
    assert cold > 1


def test_profile_then_plan_from_the_table(small_resnet, tmp_path):
    table = tmp_path / "table.json"
    out = tmp_path / "fast.onnx"
    assert main(["profile", str(small_resnet), "-o", str(table), "-q", "--no-cache"]) == 0
    data = json.loads(table.read_text())
    assert data["format"] == "lmopt-latency-table" and data["blocks"]
    assert main(["optimize", str(small_resnet), "--target", "1.2x", "--latency-table", str(table),
                 "-o", str(out), "-q", "--no-cache", "--calib-count", "2", "--eval-count", "2",
                 "--json", str(tmp_path / "report.json")]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["latency_source"] == str(table)
    onnx.checker.check_model(onnx.load(out))


def test_a_table_of_another_model_is_refused(small_resnet, tmp_path, capsys):
    other = tmp_path / "other.onnx"
    save_model(build("resnet18", image_size=32, seed=1), other)
    table = tmp_path / "table.json"
    assert main(["profile", str(other), "-o", str(table), "-q", "--no-cache"]) == 0
    capsys.readouterr()
    code = main(["optimize", str(small_resnet), "--target", "1.2", "--latency-table", str(table),
                 "-o", str(tmp_path / "x.onnx"), "-q", "--no-cache"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and "another model" in err[0]
    assert not (tmp_path / "x.onnx").exists()


def test_python_api_returns_model_and_report(small_resnet, tmp_path):
    model, report = lmopt.optimize(str(small_resnet), target=1.2, calib_count=2, eval_count=2,
                                   cache_path=False, progress=False, backend_options=FAST,
                                   log=lambda *a: None)
    assert isinstance(model, onnx.ModelProto)
    assert report["measured_speedup"] > 0 and report["predicted_speedup"] >= 1.0
    with pytest.raises(LmoptError):
        lmopt.optimize(str(small_resnet), target=0.5)


def test_calibration_arrays_drive_importance(small_resnet, tmp_path):
    rng = np.random.default_rng(0)
    calib = tmp_path / "calib.npy"
    np.save(calib, rng.standard_normal((6, 3, 32, 32)).astype(np.float32))
    study = Study(small_resnet, calib=str(calib), calib_count=3, eval_count=3, cache_path=False,
                  progress=False, backend_options=FAST, log=lambda *a: None)
    assert "held-out" in study.data_note and len(study.eval_feeds) == 3
