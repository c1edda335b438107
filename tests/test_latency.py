"""Latency: signatures, the sqlite cache, profile_blocks, latency tables, the ORT CPU backend, fp16 conversion."""
from __future__ import annotations

import json
import sqlite3

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from lmopt.errors import LmoptError
from lmopt.inputs import random_feeds
from lmopt.latency import (
    LatencyBackend,
    LatencyCache,
    default_cache_path,
    get_backend,
    make_table,
    model_fingerprint,
    profile_blocks,
    read_table,
    structural_signature,
    write_table,
)
from lmopt.latency.base import Session, cpu_name, physical_cores
from lmopt.latency.fp16 import convert_to_fp16
from lmopt.onnxio import DEFAULT_OPSET, max_ir_version, runtime_compatible


def conv_block(channels=8, size=16, seed=0, prefix="", pads=(1, 1, 1, 1), batch=1):
    """Conv 3x3 + bias + Relu, names prefixed so two copies differ only in names and weights."""
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.standard_normal((channels, channels, 3, 3)).astype(np.float32), prefix + "w")
    b = numpy_helper.from_array(rng.standard_normal(channels).astype(np.float32), prefix + "b")
    out = size + pads[0] + pads[2] - 2
    graph = helper.make_graph(
        [helper.make_node("Conv", [prefix + "x", prefix + "w", prefix + "b"], [prefix + "y"], pads=list(pads),
                          name=prefix + "conv"),
         helper.make_node("Relu", [prefix + "y"], [prefix + "z"], name=prefix + "relu")],
        prefix + "block",
        [helper.make_tensor_value_info(prefix + "x", TensorProto.FLOAT, [batch, channels, size, size])],
        [helper.make_tensor_value_info(prefix + "z", TensorProto.FLOAT, [batch, channels, out, out])],
        [w, b])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", DEFAULT_OPSET)])


def reshape_block(shape):
    target = numpy_helper.from_array(np.array(shape, dtype=np.int64), "shape")
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])], "r",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)], [target])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", DEFAULT_OPSET)])


# --- signatures ----------------------------------------------------------------------------------

def test_signature_ignores_names_and_weight_values():
    a = conv_block(seed=0, prefix="a_")
    b = conv_block(seed=1, prefix="other_")
    assert structural_signature(a) == structural_signature(b)
    assert len(structural_signature(a)) == 64


def test_signature_changes_with_structure():
    base = structural_signature(conv_block())
    assert structural_signature(conv_block(size=32)) != base            # input shape
    assert structural_signature(conv_block(channels=16)) != base        # weight shape
    assert structural_signature(conv_block(batch=2)) != base            # batch
    assert structural_signature(conv_block(pads=(0, 0, 0, 0))) != base  # attribute
    relu6 = conv_block()
    relu6.graph.node[1].op_type = "Sigmoid"
    assert structural_signature(relu6) != base                           # op type


def test_signature_keeps_integer_constants():
    # a Reshape's target shape is structure, not a weight
    assert structural_signature(reshape_block([6, 4])) != structural_signature(reshape_block([2, 12]))


def test_fingerprint_sees_weights():
    assert model_fingerprint(conv_block(seed=0)) != model_fingerprint(conv_block(seed=1))
    assert model_fingerprint(conv_block(seed=0, prefix="a")) == model_fingerprint(conv_block(seed=0, prefix="b"))


# --- cache -------------------------------------------------------------------------------------

KEY = {"backend": "fake", "device": "test", "library": "none", "precision": "fp32"}


def test_cache_round_trip_and_persistence(tmp_path):
    path = tmp_path / "lat.sqlite"
    with LatencyCache(path) as cache:
        assert cache.get("sig", KEY) is None
        cache.put("sig", KEY, 1.25)
        assert cache.get("sig", KEY) == 1.25
        assert cache.get("sig", {**KEY, "precision": "fp16"}) is None  # key is part of the lookup
    with LatencyCache(path) as again:  # a new instance (a new process) sees it
        assert again.get("sig", KEY) == 1.25
        assert len(again) == 1
        assert again.entries(KEY) == {"sig": 1.25}


def test_cache_key_order_does_not_matter(tmp_path):
    with LatencyCache(tmp_path / "c.sqlite") as cache:
        cache.put("s", {"a": 1, "b": 2}, 3.0)
        assert cache.get("s", {"b": 2, "a": 1}) == 3.0


def test_cache_default_location_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LMOPT_CACHE_DIR", str(tmp_path / "here"))
    assert default_cache_path() == tmp_path / "here" / "latency.sqlite"
    with LatencyCache() as cache:
        cache.put("s", KEY, 1.0)
    assert (tmp_path / "here" / "latency.sqlite").is_file()


def test_cache_rejects_a_file_that_is_not_sqlite(tmp_path):
    path = tmp_path / "bad.sqlite"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(LmoptError) as info:
        LatencyCache(path)
    assert "\n" not in str(info.value) and "latency cache" in str(info.value)


# --- profile_blocks ------------------------------------------------------------------------------

class CountingBackend(LatencyBackend):
    """A fake backend: 'times' a block as its node count, counts measure() calls, can fail on the n-th."""

    name = "fake"

    def __init__(self, interrupt_at: int | None = None):
        super().__init__()
        self.calls = 0
        self.interrupt_at = interrupt_at

    def cache_key(self) -> dict:
        return dict(KEY)

    def _open(self, model):  # never used: measure is overridden
        raise AssertionError

    def measure(self, model) -> float:
        self.calls += 1
        if self.interrupt_at is not None and self.calls == self.interrupt_at:
            raise KeyboardInterrupt
        return float(model.graph.input[0].type.tensor_type.shape.dim[2].dim_value)


def some_blocks():
    # 6 blocks, 3 distinct structures (sizes 8, 16, 32)
    return {f"b{i}": conv_block(size=size, seed=i, prefix=f"p{i}_")
            for i, size in enumerate([8, 16, 8, 32, 16, 8])}


def test_profile_blocks_times_each_signature_once():
    backend = CountingBackend()
    sigs = {}
    result = profile_blocks(some_blocks(), backend, progress=False, signatures=sigs)
    assert backend.calls == 3
    assert result == {"b0": 8.0, "b1": 16.0, "b2": 8.0, "b3": 32.0, "b4": 16.0, "b5": 8.0}
    assert sigs["b0"] == sigs["b2"] == sigs["b5"] != sigs["b1"]


def test_profile_blocks_second_call_retimes_nothing(tmp_path):
    with LatencyCache(tmp_path / "c.sqlite") as cache:
        first = CountingBackend()
        profile_blocks(some_blocks(), first, cache=cache, progress=False)
        assert first.calls == 3
        second = CountingBackend()
        again = profile_blocks(some_blocks(), second, cache=cache, progress=False)
        assert second.calls == 0
        assert again["b3"] == 32.0


def test_interrupted_profiling_keeps_what_was_timed(tmp_path):
    path = tmp_path / "c.sqlite"
    with LatencyCache(path) as cache, pytest.raises(KeyboardInterrupt):
        profile_blocks(some_blocks(), CountingBackend(interrupt_at=3), cache=cache, progress=False)
    with LatencyCache(path) as cache:  # as after a restart
        assert len(cache) == 2
        resumed = CountingBackend()
        result = profile_blocks(some_blocks(), resumed, cache=cache, progress=False)
        assert resumed.calls == 1
        assert len(result) == 6


# --- latency tables ------------------------------------------------------------------------------

def test_table_round_trip(tmp_path):
    model = conv_block()
    blocks = some_blocks()
    sigs = {}
    latencies = profile_blocks(blocks, CountingBackend(), progress=False, signatures=sigs)
    table = make_table(model, KEY, latencies, sigs)
    path = write_table(tmp_path / "t.json", table)
    back = read_table(path)
    assert back["backend"] == KEY
    assert back["model_fingerprint"] == model_fingerprint(model)
    assert back["blocks"]["b3"] == {"signature": sigs["b3"], "ms": 32.0}


@pytest.mark.parametrize("content", [b"\x08\x07\x12\x00garbage", b'{"blocks": {}}', b"[1, 2]",
                                     b'{"format": "lmopt-latency-table", "version": 1, "backend": {}}'])
def test_read_table_rejects_other_files(tmp_path, content):
    path = tmp_path / "x.json"
    path.write_bytes(content)
    with pytest.raises(LmoptError) as info:
        read_table(path)
    assert "\n" not in str(info.value) and "latency table" in str(info.value)


def test_read_table_missing_file(tmp_path):
    with pytest.raises(LmoptError, match="no such file"):
        read_table(tmp_path / "none.json")


# --- the ORT CPU backend -------------------------------------------------------------------------

def fast_ort():
    return get_backend("ort-cpu", warmup_s=0.01, runs=5, min_time_s=0.01)


def test_ort_backend_times_the_work():
    # 1024x the multiply-adds (64 channels at 64x64 against 8 at 16x16) must measure slower.
    backend = fast_ort()
    small, big = backend.measure(conv_block()), backend.measure(conv_block(channels=64, size=64))
    assert 0 < small < big
    key = backend.cache_key()
    assert key["backend"] == "ort-cpu" and key["precision"] == "fp32" and key["threads"] == physical_cores()
    assert key["library"] == f"onnxruntime {ort.__version__}" and key["device"] == cpu_name()


def test_ort_backend_interleaved_times_each_model():
    small, big = fast_ort().measure_interleaved([conv_block(), conv_block(channels=64, size=64)], rounds=3)
    assert 0 < small < big


class ScriptedSession(Session):
    """Returns `cold` for its first run (the warm-up), then cycles through `times`; logs to `log`."""

    def __init__(self, index, times, log, cold=100.0):
        self.index, self.times, self.log, self.cold = index, times, log, cold
        self.runs = 0

    def run_timed(self, count):
        samples = []
        for _ in range(count):
            samples.append(self.cold if self.runs == 0 else self.times[(self.runs - 1) % len(self.times)])
            self.runs += 1
        self.log.append(("run", self.index, count))
        return samples

    def close(self):
        self.log.append(("close", self.index))


class ScriptedBackend(LatencyBackend):
    """Model i's session cycles through script[i]; the model's first input width is i."""

    name = "scripted"

    def __init__(self, script, **options):
        super().__init__(warmup_s=0.0, min_time_s=0.0, **options)
        self.script, self.log = script, []

    def cache_key(self):
        return {"backend": self.name}

    def _open(self, model):
        index = model.graph.input[0].type.tensor_type.shape.dim[3].dim_value
        return ScriptedSession(index, self.script[index], self.log)


def indexed_blocks(count):
    return [conv_block(size=index) for index in range(count)]


def test_measure_is_the_median_after_warm_up():
    backend = ScriptedBackend({3: [1.0, 2.0, 6.0]}, runs=5)
    # warm-up run (100 ms, cold) left out; 5 timed runs: 1, 2, 6, 1, 2 -> median 2
    assert backend.measure(conv_block(size=3)) == 2.0
    assert backend.log == [("run", 3, 1), *[("run", 3, 1)] * 5, ("close", 3)]


def test_measure_interleaved_rotates_the_order_and_keeps_medians_apart():
    backend = ScriptedBackend({0: [1.0], 1: [2.0, 4.0], 2: [3.0]}, runs=6)
    assert backend.measure_interleaved(indexed_blocks(3), rounds=3) == [1.0, 3.0, 3.0]
    runs = [(index, count) for kind, index, *count in backend.log if kind == "run"]
    assert runs[:3] == [(0, [1]), (1, [1]), (2, [1])]  # one warm-up run each
    # then 3 rounds of ceil(6 / 3) = 2 runs per model, each round starting one model later
    assert runs[3:] == [(index, [2]) for index in [0, 1, 2, 1, 2, 0, 2, 0, 1]]
    assert [entry for entry in backend.log if entry[0] == "close"] == [("close", 0), ("close", 1), ("close", 2)]


def test_measure_interleaved_goes_on_until_every_model_ran_for_min_time():
    backend = ScriptedBackend({0: [1.0], 1: [2.0]}, runs=2)
    backend.min_time_s = 0.010  # 10 ms of timed runs per model: ten 1 ms runs of model 0
    assert backend.measure_interleaved(indexed_blocks(2), rounds=1) == [1.0, 2.0]
    timed = [(index, count[0]) for kind, index, *count in backend.log if kind == "run"][2:]  # after warm-up
    # rounds of 2 runs per model (runs=2 over rounds=1) until model 0 has 5 rounds (10 ms)
    assert [index for index, _ in timed] == [0, 1, 1, 0, 0, 1, 1, 0, 0, 1]
    assert all(count == 2 for _, count in timed)


def test_ort_backend_accepts_a_newer_ir_version_and_leaves_the_model_alone():
    model = conv_block()
    model.ir_version = max_ir_version() + 1
    assert fast_ort().measure(model) > 0
    assert model.ir_version == max_ir_version() + 1


def test_ort_backend_rejects_dynamic_shapes():
    model = conv_block()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    with pytest.raises(LmoptError, match="dynamic dimension"):
        fast_ort().measure(model)


def test_ort_backend_threads_option():
    assert get_backend("ort-cpu", threads=1).cache_key()["threads"] == 1
    with pytest.raises(LmoptError, match="fp32"):
        get_backend("ort-cpu", precision="fp16")


def test_get_backend_unknown_name_is_one_line():
    with pytest.raises(LmoptError) as info:
        get_backend("tpu-magic")
    message = str(info.value)
    assert "\n" not in message and "tpu-magic" in message and "ort-cpu" in message


def test_random_inputs_follow_value_info():
    feeds = random_feeds(conv_block(channels=4, size=5, batch=2), 1)[0]
    ((_, array),) = feeds.items()
    assert array.shape == (2, 4, 5, 5) and array.dtype == np.float32


# --- fp16 conversion (TensorRT 11 and ort-cuda fp16) -----------------------------------------------
# fp16 keeps 11 significant bits (unit roundoff 2**-11, about 4.9e-4). conv_block(channels=4) sums 36
# products (4 channels x 3x3) into outputs up to |y| ~ 17, where one fp16 step is 2**-6: rounding the
# input, the weights and the output once each gives errors up to 6.5e-3 against float32 (onnxruntime's
# CPU kernels, which compute an fp16 Conv in float32). The tolerance leaves 3x room, and 2**-9 of |y| for
# kernels that also accumulate in fp16.
FP16_ATOL, FP16_RTOL = 2e-2, 2 ** -9


@pytest.mark.parametrize("keep_io_types", [False, True])
def test_fp16_conversion_is_valid_and_close(keep_io_types):
    model = conv_block(channels=4, size=8)
    half = convert_to_fp16(model, keep_io_types=keep_io_types)
    onnx.checker.check_model(half, full_check=True)
    assert all(t.data_type == TensorProto.FLOAT16 for t in half.graph.initializer)
    assert model.graph.initializer[0].data_type == TensorProto.FLOAT  # original untouched
    x = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    ref = ort.InferenceSession(runtime_compatible(model).SerializeToString()).run(None, {"x": x})[0]
    feed = x if keep_io_types else x.astype(np.float16)
    out = ort.InferenceSession(runtime_compatible(half).SerializeToString()).run(None, {"x": feed})[0]
    assert out.dtype == (np.float32 if keep_io_types else np.float16)
    np.testing.assert_allclose(out.astype(np.float32), ref, atol=FP16_ATOL, rtol=FP16_RTOL)


def test_cache_file_is_plain_sqlite(tmp_path):
    path = tmp_path / "c.sqlite"
    with LatencyCache(path) as cache:
        cache.put("s", KEY, 2.0)
    rows = sqlite3.connect(str(path)).execute("SELECT signature, backend, ms FROM latency").fetchall()
    assert rows == [("s", json.dumps(KEY, sort_keys=True, separators=(",", ":")), 2.0)]


def run_ort(model, feeds):
    return ort.InferenceSession(runtime_compatible(model).SerializeToString(),
                                providers=["CPUExecutionProvider"]).run(None, feeds)


def test_fp16_keeps_a_cast_that_feeds_resize_scales_float32():
    scales = numpy_helper.from_array(np.array([1, 1, 2, 2], np.int64), "scales_i")
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"]),
         helper.make_node("Cast", ["scales_i"], ["scales"], to=TensorProto.FLOAT),
         helper.make_node("Resize", ["r", "", "scales"], ["y"], mode="nearest")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 3, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 6, 6])], [scales])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", DEFAULT_OPSET)])
    half = convert_to_fp16(model)
    onnx.checker.check_model(half, full_check=True)
    cast = next(n for n in half.graph.node if n.op_type == "Cast")
    assert cast.attribute[0].i == TensorProto.FLOAT
    x = np.random.default_rng(0).standard_normal((1, 2, 3, 3)).astype(np.float32)
    (out,) = run_ort(half, {"x": x.astype(np.float16)})
    np.testing.assert_allclose(out.astype(np.float32), run_ort(model, {"x": x})[0], atol=1e-2)


def test_fp16_keeps_float_shape_arithmetic_float32():
    # Resize to 3x the width, computed the way exporters write it: Shape -> Cast(FLOAT) -> Mul -> Cast(INT64).
    # In float16, 1025 * 3 = 3075 rounds to 3076 and a GPU would give the wrong width (onnxruntime's CPU
    # provider upcasts float16 arithmetic, so the types are checked too).
    inits = [numpy_helper.from_array(np.array([2], np.int64), "start"),
             numpy_helper.from_array(np.array([4], np.int64), "end"),
             numpy_helper.from_array(np.array([1, 1, 3], np.float32), "factor"),
             numpy_helper.from_array(np.array([1], np.int64), "one")]
    graph = helper.make_graph(
        [helper.make_node("Shape", ["x"], ["shape"]),
         helper.make_node("Slice", ["shape", "start", "end"], ["hw"]),
         helper.make_node("Concat", ["one", "hw"], ["chw"], axis=0),
         helper.make_node("Cast", ["chw"], ["chw_f"], to=TensorProto.FLOAT),
         helper.make_node("Mul", ["chw_f", "factor"], ["scaled"]),
         helper.make_node("Cast", ["scaled"], ["sizes_tail"], to=TensorProto.INT64),
         helper.make_node("Concat", ["one", "sizes_tail"], ["sizes"], axis=0),
         helper.make_node("Resize", ["x", "", "", "sizes"], ["y"], mode="nearest")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 1, 1025])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 1, "w"])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", DEFAULT_OPSET)])
    half = convert_to_fp16(model)
    onnx.checker.check_model(half, full_check=True)
    (out,) = run_ort(half, {"x": np.ones((1, 1, 1, 1025), np.float16)})
    assert out.shape == (1, 1, 1, 3075) and out.dtype == np.float16
    assert np.float16(1025) * np.float16(3) == 3076
    assert next(t for t in half.graph.initializer if t.name == "factor").data_type == TensorProto.FLOAT
    casts = [n.attribute[0].i for n in half.graph.node if n.op_type == "Cast"]
    assert casts == [TensorProto.FLOAT, TensorProto.INT64]


def test_fp16_retypes_initializers_listed_as_graph_inputs():
    model = conv_block(channels=4, size=8)
    model.ir_version = 3  # IR < 4: every initializer is also a graph input
    model.graph.input.extend(helper.make_tensor_value_info(t.name, TensorProto.FLOAT, list(t.dims))
                             for t in model.graph.initializer)
    half = convert_to_fp16(model)
    onnx.checker.check_model(half)
    types = {vi.name: vi.type.tensor_type.elem_type for vi in half.graph.input}
    assert types == {"x": TensorProto.FLOAT16, "w": TensorProto.FLOAT16, "b": TensorProto.FLOAT16}
    x = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    (out,) = run_ort(half, {"x": x.astype(np.float16)})
    np.testing.assert_allclose(out.astype(np.float32), run_ort(model, {"x": x})[0], atol=FP16_ATOL, rtol=FP16_RTOL)


@pytest.mark.parametrize("keep_io_types", [False, True])
def test_fp16_retargets_integer_to_float_casts(keep_io_types):
    # An encoder's attention mask: int64 -> Cast(to=FLOAT) -> (1 - mask) * -10000 added to the scores.
    # The Cast must produce float16 like everything around it (onnxconverter-common 1.16 leaves its
    # target FLOAT, and onnxruntime then refuses the model: see lmopt/latency/fp16.py).
    inits = [numpy_helper.from_array(np.float32(1.0), "one"), numpy_helper.from_array(np.float32(-1e4), "big")]
    graph = helper.make_graph(
        [helper.make_node("Cast", ["mask"], ["mask_f"], to=TensorProto.FLOAT),
         helper.make_node("Sub", ["one", "mask_f"], ["masked"]),
         helper.make_node("Mul", ["masked", "big"], ["bias"]),
         helper.make_node("Add", ["scores", "bias"], ["y"])],
        "g", [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [2, 4]),
              helper.make_tensor_value_info("mask", TensorProto.INT64, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", DEFAULT_OPSET)])
    half = convert_to_fp16(model, keep_io_types=keep_io_types)
    onnx.checker.check_model(half, full_check=True)
    assert next(n for n in half.graph.node if n.output[0] == "mask_f").attribute[0].i == TensorProto.FLOAT16
    scores = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)
    mask = np.array([[1, 1, 0, 0], [1, 1, 1, 0]], np.int64)
    (ref,) = run_ort(model, {"scores": scores, "mask": mask})
    (out,) = run_ort(half, {"scores": scores if keep_io_types else scores.astype(np.float16), "mask": mask})
    assert out.dtype == (np.float32 if keep_io_types else np.float16)
    np.testing.assert_allclose(out.astype(np.float32), ref, atol=FP16_ATOL, rtol=FP16_RTOL)


class InterleavingBackend(CountingBackend):
    """'Times' a model as its input width, in interleaved calls that it records."""

    def __init__(self):
        super().__init__()
        self.groups = []

    def measure_interleaved(self, models, rounds=20):
        self.groups.append(len(models))
        return [self.measure(model) for model in models]


def test_profile_relative_times_each_model_with_the_reference_and_caches_the_ratio(tmp_path):
    from lmopt.latency.profiler import profile_relative

    reference = conv_block(size=32)
    built = []

    def builder(i, size):
        def build():
            built.append(i)
            return conv_block(size=size, seed=i)
        return build

    builders = {f"m{i}": builder(i, size) for i, size in enumerate([8, 16, 24, 40, 48, 56])}
    backend = InterleavingBackend()
    with LatencyCache(tmp_path / "c.sqlite") as cache:
        ratios, signatures = profile_relative(reference, builders, backend, cache, progress=False, group=4)
        assert ratios == pytest.approx({"m0": 0.25, "m1": 0.5, "m2": 0.75, "m3": 1.25, "m4": 1.5, "m5": 1.75})
        assert backend.groups == [5, 3]  # the reference first in every group
        assert built == list(range(6)) and len(set(signatures.values())) == 6
        again = InterleavingBackend()
        assert profile_relative(reference, builders, again, cache, progress=False)[0] == ratios
        assert again.groups == []  # all cached
