"""--precision int8 on ONNX Runtime CPU: the QDQ path's numerics, int8 block timing, and depth and
precision stacked under one budget. Speed is never asserted (bench/bench_precision.py measures it);
what must hold is asserted."""
import logging

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from lmopt.errors import LmoptError
from lmopt.inputs import random_feeds
from lmopt.latency.base import get_backend
from lmopt.metrics import compare
from lmopt.optimizer import Study
from lmopt.prepare import prepare
from lmopt.quantize import cpu_lacks_vnni, describe, quantize_int8, settings
from lmopt.report import format_report
from lmopt.runtime import run_outputs
from models.zoo import build

FAST = {"runs": 3, "min_time_s": 0.0, "warmup_s": 0.0, "threads": 1}


@pytest.fixture(scope="module")
def small():
    return prepare(build("resnet18", image_size=32)).model


def test_quantized_model_is_int8_qdq_per_channel_and_close_to_fp32(small):
    feeds = random_feeds(small, 8)
    quantized = quantize_int8(small, feeds)
    onnx.checker.check_model(quantized)
    ops = [n.op_type for n in quantized.graph.node]
    convs = sum(op == "Conv" for op in ops)
    assert convs == sum(n.op_type == "Conv" for n in small.graph.node)
    assert ops.count("DequantizeLinear") >= 2 * convs and "QuantizeLinear" in ops
    inits = {t.name: numpy_helper.to_array(t) for t in quantized.graph.initializer}
    weights = [n for n in quantized.graph.node if n.op_type == "DequantizeLinear" and inits.get(n.input[0]) is not None
               and inits[n.input[0]].ndim == 4]
    assert len(weights) == convs
    for node in weights:  # per-channel int8 weights: one scale per output channel
        weight, scale = inits[node.input[0]], inits[node.input[1]]
        assert weight.dtype == np.int8 and scale.shape == (weight.shape[0],)
    activations = [n for n in quantized.graph.node if n.op_type == "QuantizeLinear"]
    assert all(inits[n.input[2]].dtype == np.uint8 for n in activations)  # U8S8
    fid = compare(run_outputs(small, feeds), run_outputs(quantized, feeds))
    assert 0 < fid["nrmse"] < 0.2  # quantized (it moved), and not broken


def test_quantization_does_not_warn_of_initializers_it_leaves_unused(capfd):
    """onnxruntime.quantization's calibration sessions log through ORT's default logger, which warns
    (on the process's stderr, hence capfd) of every initializer no node uses: here one in the input."""
    weight = numpy_helper.from_array(np.random.default_rng(0).random((4, 3, 3, 3), np.float32), "w")
    unused = numpy_helper.from_array(np.ones(5, np.float32), "unused")
    graph = onnx.helper.make_graph([onnx.helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])], "g",
                                   [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 8, 8])],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4, 8, 8])],
                                   [weight, unused])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    feeds = [{"x": np.random.default_rng(i).random((1, 3, 8, 8), np.float32)} for i in range(4)]
    quantized = quantize_int8(model, feeds)
    assert "Removing initializer" not in capfd.readouterr().err
    assert "QuantizeLinear" in [n.op_type for n in quantized.graph.node]


def test_quantization_says_once_how_many_weight_scales_it_raised_and_restores_ort_logging(caplog):
    """A conv with tiny weights and large biases: onnxruntime.quantization raises each channel's weight
    scale so the bias stays representable and logs a line per channel at INFO on the root logger;
    lmopt counts them into one DEBUG line. ORT's default logger goes back to what lmopt last set."""
    from lmopt.runtime import ort_log_severity, set_ort_log_severity

    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(1e-7 * rng.standard_normal((6, 3, 3, 3)).astype(np.float32), "w")
    bias = numpy_helper.from_array(np.full(6, 100.0, np.float32), "b")
    graph = onnx.helper.make_graph([onnx.helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[1, 1, 1, 1])], "g",
                                   [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 8, 8])],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 6, 8, 8])],
                                   [weight, bias])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    feeds = [{"x": rng.random((1, 3, 8, 8), np.float32)} for _ in range(4)]
    set_ort_log_severity(4)
    try:
        with caplog.at_level(logging.DEBUG):
            quantize_int8(model, feeds)
        assert ort_log_severity() == 4
    finally:
        set_ort_log_severity(2)
    messages = [record.getMessage() for record in caplog.records]
    assert not [m for m in messages if m.startswith("Increased scale[")]
    assert "lmopt: onnxruntime.quantization raised 6 weight channels' scales so that their biases stay " \
           "representable in int32" in messages


@pytest.mark.parametrize("flags, lacks", [
    ("fpu sse sse2 avx avx2 fma", True),  # AVX2 only: U8S8 sums pairs in 16 bits (VPMADDUBSW)
    ("fpu sse sse2 avx avx2 avx512f avx512_vnni", False),
    ("fpu sse sse2 avx avx2 avx_vnni", False),
    ("fp asimd evtstrm aes", False),  # Arm: not the x86 kernels
])
def test_weights_take_7_bits_on_x86_without_vnni(tmp_path, monkeypatch, flags, lacks):
    monkeypatch.delenv("LMOPT_INT8_WEIGHT_BITS", raising=False)
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    assert cpu_lacks_vnni(str(cpuinfo)) is lacks
    assert cpu_lacks_vnni(str(tmp_path / "absent")) is False
    monkeypatch.setattr("lmopt.quantize.cpu_lacks_vnni", lambda: lacks)
    assert settings()["reduce_range"] is lacks
    assert ("7 bits" in describe()) is lacks
    # LMOPT_INT8_WEIGHT_BITS asks for either whatever the CPU (a model deployed on another one)
    monkeypatch.setenv("LMOPT_INT8_WEIGHT_BITS", "8" if lacks else "7")
    assert settings()["reduce_range"] is not lacks
    assert ("as LMOPT_INT8_WEIGHT_BITS asks" in describe()) is not lacks


@pytest.mark.parametrize("value", ["6", "eight", "7.0"])
def test_int8_weight_bits_are_7_or_8(monkeypatch, value):
    monkeypatch.setenv("LMOPT_INT8_WEIGHT_BITS", value)
    with pytest.raises(LmoptError, match="LMOPT_INT8_WEIGHT_BITS must be 7 or 8"):
        settings()


def test_reduced_range_weights_span_7_bits(small, monkeypatch):
    monkeypatch.setenv("LMOPT_INT8_WEIGHT_BITS", "7")
    quantized = quantize_int8(small, random_feeds(small, 8))
    inits = {t.name: numpy_helper.to_array(t) for t in quantized.graph.initializer}
    weights = [inits[n.input[0]] for n in quantized.graph.node if n.op_type == "DequantizeLinear"
               and inits.get(n.input[0]) is not None and inits[n.input[0]].ndim == 4]
    assert weights and all(w.dtype == np.int8 for w in weights)
    assert max(int(np.abs(w.astype(int)).max()) for w in weights) == 64  # [-64, 64], not [-127, 127]


# Without VNNI, ONNX Runtime's U8S8 kernels sum pairs of products in 16 bits (VPMADDUBSW), which 8-bit
# weights can saturate: seen 2026-12-05 on an AVX2-only EPYC, a 9% deviation. lmopt quantizes
# weights to 7 bits there (quantize.settings), and the fused kernels then match the simulation.
def test_integer_kernels_match_the_qdq_simulation(small):
    """ONNX Runtime fuses DQ -> Conv -> Q into integer kernels; with graph optimisation off it runs the
    same QDQ graph as float arithmetic on quantized values. Both must agree to about one quantization
    step of the output: the model lmopt writes computes what its QDQ graph says."""
    feeds = random_feeds(small, 4)
    quantized = quantize_int8(small, feeds).SerializeToString()
    plain = ort.SessionOptions()
    plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    fused = ort.InferenceSession(quantized, providers=["CPUExecutionProvider"])
    simulated = ort.InferenceSession(quantized, plain, providers=["CPUExecutionProvider"])
    for feed in feeds:
        a, b = fused.run(None, feed)[0], simulated.run(None, feed)[0]
        assert np.abs(a - b).max() <= 0.05 * np.abs(b).max()
        assert np.argmax(a) == np.argmax(b) or np.sort(b.ravel())[-2] > 0.95 * b.max()


def test_int8_is_timed_on_ort_cpu_only():
    backend = get_backend("ort-cpu", precision="int8", **FAST)
    assert backend.cache_key()["precision"] == "int8"
    with pytest.raises(LmoptError, match="fp32 and int8, not fp16"):
        get_backend("ort-cpu", precision="fp16")
    with pytest.raises(LmoptError, match="precision must be one of"):
        get_backend("ort-cpu", precision="int4")


def test_stacked_plan_reports_depth_precision_and_both(small):
    study = Study(small, calib_count=8, eval_count=8, cache_path=False, progress=False,
                  backend_options={**FAST, "precision": "int8"})
    table = study.latency
    assert table.precision == "int8" and table.precision_gain > 0
    originals = sum(table.block_ms[c.key] for c in study.prepared.candidates if c.is_original)
    # the original plan at int8 is predicted as fast as INT8 alone measured whole
    assert table.predicted_speedup(originals) == pytest.approx(table.precision_gain)
    target = 1.5 * max(1.0, table.precision_gain)  # beyond what INT8 alone gives: depth must help
    model, report = study.plan(target, rounds=0)
    assert report.precision == "int8" and report.target_met and report.changes
    assert "QuantizeLinear" in {n.op_type for n in model.graph.node}
    assert set(report.speedup_parts) == {"depth", "precision"} and report.measured_speedup > 0
    assert set(report.baselines) == {"int8 alone"} and "quantization" in report.fidelity_before
    # the report says how INT8 was quantized on this CPU (7-bit weights without VNNI)
    assert report.quantization == describe() and f"int8 quantization: {describe()}" in format_report(report)
    # the written model is the plan quantized: its fidelity is measured, not the fp32 plan's
    assert report.fidelity == compare(run_outputs(study.prepared.model, study.data.eval),
                                      run_outputs(model, study.data.eval))
    assert report.fidelity != report.fidelity_before["quantization"]
    # Deep Compression's sizes: depth removes weights, int8 stores the rest in about a quarter
    sizes = report.sizes
    assert sizes["before quantization"] < sizes["original"]
    assert sizes["before quantization"] / 4.2 < sizes["written"] < sizes["before quantization"] / 3.5


def test_each_model_is_quantized_once_while_a_plan_is_checked_measured_and_written(small, monkeypatch):
    import hashlib

    import lmopt.optimizer as optimizer

    quantized = []

    def counting(model, feeds):
        quantized.append(hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest())
        return quantize_int8(model, feeds)

    monkeypatch.setattr(optimizer, "quantize_int8", counting)
    study = Study(small, calib_count=8, eval_count=8, cache_path=False, progress=False,
                  backend_options={**FAST, "precision": "int8"})
    model, report = study.plan(1.5 * max(1.0, study.latency.precision_gain), rounds=1, corrections=1)
    assert report.changes and len(quantized) >= 2  # the int8 original and at least one plan
    assert len(quantized) == len(set(quantized))
    # the written model is the quantized plan the report measured, and a copy: changing it (the
    # output order is restored in place) changes no kept model
    assert report.fidelity == compare(run_outputs(study.prepared.model, study.data.eval),
                                      run_outputs(model, study.data.eval))
    assert all(kept is not model for kept in study._quantized.values())
