"""GPU backends (torch-cuda, trt, ort-cuda, ort-trt) and `lmopt build`.

Each test runs where its runtime exists and skips with the precise reason elsewhere. The
torch translator's numerics run on the CPU (torch CPU build) against onnxruntime. Where there
is no GPU, the tests check that `lmopt build` and the GPU backends fail with one clear line.
"""
from __future__ import annotations

import importlib.util

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from lmopt import cli
from lmopt.errors import LmoptError
from lmopt.latency import get_backend
from lmopt.latency.ort_gpu import _provider_status
from lmopt.latency.tensorrt import trt_status
from lmopt.latency.torch_cuda import torch_status
from lmopt.onnxio import DEFAULT_OPSET, runtime_compatible, save_model

TRT_MISSING = "TensorRT is not installed on this machine (no GPU, NVIDIA index unreachable)"


def trt_skip_reason() -> str | None:
    if importlib.util.find_spec("tensorrt") is None:
        return TRT_MISSING
    return trt_status()


needs_trt = pytest.mark.skipif(trt_skip_reason() is not None, reason=trt_skip_reason() or "")
needs_torch_cuda = pytest.mark.skipif(torch_status() is not None, reason=torch_status() or "")


def init(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def model_of(nodes, inputs, outputs, initializers=(), opset=DEFAULT_OPSET):
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs],
        list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


RNG = np.random.default_rng(0)


def rand(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def graphs():
    """Small graphs covering every op the translator supports."""
    yield "conv-groups-dilation-asym-pads-bn-clip", model_of(
        [helper.make_node("Conv", ["x", "w", "b"], ["c"], group=2, dilations=[2, 1], strides=[1, 2],
                          pads=[1, 0, 2, 1]),
         helper.make_node("BatchNormalization", ["c", "s", "bb", "m", "v"], ["n"], epsilon=1e-3),
         helper.make_node("Clip", ["n", "lo", "hi"], ["y"])],
        [("x", [2, 4, 9, 9])], ["y"],
        [init("w", rand(6, 2, 3, 3)), init("b", rand(6)), init("s", rand(6)), init("bb", rand(6)),
         init("m", rand(6)), init("v", np.abs(rand(6)) + 0.5), init("lo", np.float32(0)), init("hi", np.float32(6))])
    yield "conv-same-upper-1d-activations", model_of(
        [helper.make_node("Conv", ["x", "w"], ["c"], auto_pad="SAME_UPPER", strides=[2]),
         helper.make_node("LeakyRelu", ["c"], ["l"], alpha=0.1),
         helper.make_node("PRelu", ["l", "slope"], ["p"]),
         helper.make_node("HardSigmoid", ["p"], ["hs"], alpha=0.3, beta=0.4),
         helper.make_node("HardSwish", ["c"], ["hw"]),
         helper.make_node("Sigmoid", ["hw"], ["sg"]),
         helper.make_node("Tanh", ["sg"], ["t"]),
         helper.make_node("Erf", ["t"], ["e"]),
         helper.make_node("Add", ["e", "hs"], ["a"]),
         helper.make_node("Sub", ["a", "c"], ["sb"]),
         helper.make_node("Div", ["sb", "two"], ["d"]),
         helper.make_node("Mul", ["d", "c"], ["y"])],
        [("x", [1, 3, 10])], ["y"],
        [init("w", rand(5, 3, 3)), init("slope", rand(5, 1)), init("two", np.float32(2.0))])
    yield "gemm-matmul-layernorm-softmax-gelu", model_of(
        [helper.make_node("Gemm", ["x", "w", "b"], ["g"], transB=1, alpha=0.5, beta=2.0),
         helper.make_node("Gemm", ["g", "w2"], ["g2"], transA=1),
         helper.make_node("Reshape", ["g2", "shape"], ["r"]),
         helper.make_node("MatMul", ["r", "m"], ["mm"]),
         helper.make_node("LayerNormalization", ["mm", "ln_s", "ln_b"], ["ln"], axis=-1, epsilon=1e-5),
         helper.make_node("Gelu", ["ln"], ["ge"], approximate="tanh"),
         helper.make_node("Softmax", ["ge"], ["y"], axis=1)],
        [("x", [3, 8])], ["y"],
        [init("w", rand(6, 8)), init("b", rand(6)), init("w2", rand(3, 4)), init("shape", np.array([2, 3, 4], np.int64)),
         init("m", rand(4, 5)), init("ln_s", rand(5)), init("ln_b", rand(5))], opset=20)
    yield "pools-flatten-transpose-concat-gather", model_of(
        [helper.make_node("MaxPool", ["x"], ["mp"], kernel_shape=[3, 3], strides=[2, 2], pads=[0, 1, 1, 0]),
         helper.make_node("AveragePool", ["x"], ["ap"], kernel_shape=[3, 3], strides=[2, 2], pads=[0, 1, 1, 0]),
         helper.make_node("AveragePool", ["x"], ["ap2"], kernel_shape=[2, 2], strides=[2, 2], pads=[1, 1, 1, 1],
                          count_include_pad=1, ceil_mode=1),
         helper.make_node("Concat", ["mp", "ap"], ["cat"], axis=1),
         helper.make_node("Transpose", ["cat"], ["tr"], perm=[0, 2, 3, 1]),
         helper.make_node("Gather", ["tr", "idx"], ["ga"], axis=3),
         helper.make_node("Flatten", ["ga"], ["y"], axis=1),
         helper.make_node("GlobalAveragePool", ["ap2"], ["gap"]),
         helper.make_node("Identity", ["gap"], ["id"]),
         helper.make_node("Dropout", ["id"], ["y2"])],
        [("x", [2, 3, 7, 7])], ["y", "y2"],
        [init("idx", np.array([0, -1, 2], np.int64))])
    yield "constant-and-clip-attrs-opset11-softmax", model_of(
        [helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(np.float32(3.0))),
         helper.make_node("Mul", ["x", "k"], ["xm"]),
         helper.make_node("Relu", ["xm"], ["r"]),
         helper.make_node("Softmax", ["r"], ["y"], axis=1)],
        [("x", [2, 3, 4])], ["y"], opset=11)


@pytest.mark.parametrize("name,model", list(graphs()), ids=[n for n, _ in graphs()])
def test_torch_translator_matches_onnxruntime(name, model):
    torch = pytest.importorskip("torch", reason="torch is not installed (pip install torch to test the translator)")
    from lmopt.latency.base import random_inputs
    from lmopt.latency.torch_translate import translate

    for vi in model.graph.input:  # outputs were left untyped above; inputs are static
        assert all(d.dim_value > 0 for d in vi.type.tensor_type.shape.dim)
    feeds = random_inputs(model, seed=1)
    expected = ort.InferenceSession(runtime_compatible(model).SerializeToString(),
                                    providers=["CPUExecutionProvider"]).run(None, feeds)
    module = translate(model)
    with torch.no_grad():
        got = module(*[torch.from_numpy(a) for a in feeds.values()])
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert tuple(g.shape) == e.shape
        np.testing.assert_allclose(g.numpy(), e, rtol=1e-4, atol=1e-4)


def test_torch_translator_names_unsupported_ops():
    pytest.importorskip("torch", reason="torch is not installed (pip install torch to test the translator)")
    from lmopt.latency.torch_translate import translate

    model = model_of([helper.make_node("Resize", ["x", "", "scales"], ["y"])], [("x", [1, 1, 2, 2])], ["y"],
                     [init("scales", np.array([1, 1, 2, 2], np.float32))])
    with pytest.raises(LmoptError, match="Resize"):
        translate(model)


def tiny_conv_model():
    return model_of([helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
                     helper.make_node("Relu", ["c"], ["y"])],
                    [("x", [1, 8, 16, 16])], ["y"], [init("w", rand(8, 8, 3, 3))])


# --- torch-cuda ----------------------------------------------------------------------------------

@needs_torch_cuda
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_torch_cuda_measures(precision):
    backend = get_backend("torch-cuda", precision=precision, warmup_s=0.05, runs=10, min_time_s=0.05)
    assert backend.measure(tiny_conv_model()) > 0
    assert len(backend.measure_interleaved([tiny_conv_model(), tiny_conv_model()], rounds=3)) == 2
    key = backend.cache_key()
    assert key["precision"] == precision and "torch" in key["library"]


# --- TensorRT ------------------------------------------------------------------------------------

@needs_trt
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_trt_measures(precision, tmp_path):
    backend = get_backend("trt", precision=precision, timing_cache=tmp_path / "timing.cache",
                          warmup_s=0.05, runs=10, min_time_s=0.05)
    assert backend.measure(tiny_conv_model()) > 0
    assert (tmp_path / "timing.cache").is_file()  # the shared timing cache was written
    key = backend.cache_key()
    assert key["backend"] == "trt" and key["library"].startswith("TensorRT ") and key["precision"] == precision


@needs_trt
def test_lmopt_build_writes_an_engine(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "TOOLS", available_tools())
    model = save_model(tiny_conv_model(), tmp_path / "m.onnx")
    out = tmp_path / "m.engine"
    assert cli.main(["build", str(model), "-o", str(out), "--fp16", "--workspace", "256",
                     "--timing-cache", str(tmp_path / "t.cache")]) == 0
    printed = capsys.readouterr().out
    assert out.stat().st_size > 0
    assert "trtexec --onnx=" in printed and f"--saveEngine={out}" in printed and "workspace:256M" in printed
    assert "ms median GPU compute time" in printed


def test_trtexec_command_line():
    from lmopt.engine import trtexec_command

    line = trtexec_command("m.onnx", "out dir/m.engine", fp16=True, workspace_mib=1024, timing_cache="t.cache")
    assert line == ("trtexec --onnx=m.onnx '--saveEngine=out dir/m.engine' --fp16 "
                    "--memPoolSize=workspace:1024M --timingCacheFile=t.cache")
    # TensorRT 11: no --fp16; the fp16 model is the input and the network is strongly typed
    assert "--fp16" not in trtexec_command("m16.onnx", "e", fp16=True, fp16_flag=False)
    assert trtexec_command("m.onnx", "e") == "trtexec --onnx=m.onnx --saveEngine=e"


# --- onnxruntime-gpu -----------------------------------------------------------------------------

@pytest.mark.parametrize("name,provider", [("ort-cuda", "CUDAExecutionProvider"),
                                           ("ort-trt", "TensorrtExecutionProvider")])
def test_ort_gpu_backends(name, provider):
    reason = _provider_status(provider)
    if reason is not None:
        pytest.skip(reason)
    try:
        backend = get_backend(name, warmup_s=0.05, runs=10, min_time_s=0.05)
        ms = backend.measure(tiny_conv_model())
    except LmoptError as exc:
        if "could not start" in str(exc):
            pytest.skip(str(exc))  # onnxruntime-gpu installed on a machine without a usable GPU
        raise
    assert ms > 0


# --- no GPU: one clear line and a non-zero exit --------------------------------------------------

def available_tools():
    """The dispatcher's tools whose modules exist (the others are still being written)."""
    return [t for t in cli.TOOLS if importlib.util.find_spec(f"lmopt.cli.{t}") is not None]


def test_build_without_tensorrt_fails_with_one_line(tmp_path, capsys, monkeypatch):
    reason = trt_status()
    if reason is None:
        pytest.skip("TensorRT and a GPU are present here: `lmopt build` works (see test_lmopt_build_writes_an_engine)")
    monkeypatch.setattr(cli, "TOOLS", available_tools())
    model = save_model(tiny_conv_model(), tmp_path / "m.onnx")
    code = cli.main(["build", str(model), "-o", str(tmp_path / "m.engine")])
    err = capsys.readouterr().err
    assert code != 0
    assert len(err.strip().splitlines()) == 1, err
    assert "lmopt build: error:" in err and "TensorRT" in err
    assert not (tmp_path / "m.engine").exists()


@pytest.mark.parametrize("name,status", [("trt", trt_status), ("torch-cuda", torch_status)])
def test_gpu_backends_without_gpu_fail_with_one_line(name, status):
    if status() is None:
        pytest.skip(f"{name} is usable on this machine")
    with pytest.raises(LmoptError) as info:
        get_backend(name)
    message = str(info.value)
    assert "\n" not in message and name in message and status() in message


# --- TensorRT plumbing with a FAKE tensorrt module ---------------------------------------------------
# These do not test TensorRT (it cannot be installed here); they check which polygraphy loaders and
# builder options lmopt passes on a 10.x-like and an 11.x-like API, and the timing loop's control flow.

class _Recorder:
    def __init__(self, log, name, result=None):
        self.log, self.name, self.result = log, name, result

    def __call__(self, *args, **kwargs):
        self.log.append((self.name, args, kwargs))
        result = self.result
        return (lambda *a, **k: result) if self.name == "EngineBytesFromNetwork" else (result or object())


def _fake_trt(version):
    from types import SimpleNamespace as NS

    flags = {"TF32": 1} if version.startswith("11") else {"FP16": 0, "TF32": 1}
    return NS(__version__=version, BuilderFlag=NS(**flags), MemoryPoolType=NS(WORKSPACE="workspace"),
              TensorIOMode=NS(INPUT="in", OUTPUT="out"), float32="f32", float16="f16")


@pytest.fixture
def fake_trt(monkeypatch):
    import sys

    import polygraphy.backend.trt as poly_trt

    def install(version):
        monkeypatch.setitem(sys.modules, "tensorrt", _fake_trt(version))
        log = []
        for name in ("NetworkFromOnnxBytes", "CreateConfig", "PostprocessNetwork"):
            monkeypatch.setattr(poly_trt, name, _Recorder(log, name))
        monkeypatch.setattr(poly_trt, "EngineBytesFromNetwork", _Recorder(log, "EngineBytesFromNetwork", b"plan"))
        return log
    return install


def _calls(log, name):
    return [kwargs | {"args": args} for n, args, kwargs in log if n == name]


def test_trt_build_options_on_tensorrt_10_fp16(fake_trt, tmp_path):
    from lmopt.latency.tensorrt import build_engine_bytes

    log = fake_trt("10.3.0")
    model = tiny_conv_model()
    model.ir_version = 14
    plan, parsed = build_engine_bytes(model, "fp16", workspace_mib=64, timing_cache=tmp_path / "t.cache", fp16_io=True)
    assert plan == b"plan" and parsed is model  # precision by builder flag: the fp32 ONNX is parsed
    (net,) = _calls(log, "NetworkFromOnnxBytes")
    assert net["strongly_typed"] is False
    import onnx
    assert onnx.load_from_string(net["args"][0]).ir_version == 10
    assert _calls(log, "PostprocessNetwork")  # block I/O made half
    (config,) = _calls(log, "CreateConfig")
    assert config["fp16"] is True and config["tf32"] is True
    assert config["memory_pool_limits"] == {"workspace": 64 << 20}
    assert config["load_timing_cache"] == str(tmp_path / "t.cache")
    (build,) = _calls(log, "EngineBytesFromNetwork")
    assert build["save_timing_cache"] == str(tmp_path / "t.cache")


def test_trt_build_options_on_tensorrt_11_fp16(fake_trt):
    from lmopt.latency.tensorrt import build_engine_bytes

    log = fake_trt("11.0.0")
    model = tiny_conv_model()
    _, parsed = build_engine_bytes(model, "fp16", fp16_io=False)  # deployment: fp32 I/O kept
    assert all(t.data_type == TensorProto.FLOAT16 for t in parsed.graph.initializer)
    assert parsed.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    (net,) = _calls(log, "NetworkFromOnnxBytes")
    assert net["strongly_typed"] is True
    assert not _calls(log, "PostprocessNetwork")
    (config,) = _calls(log, "CreateConfig")
    assert config["fp16"] is False  # BuilderFlag.FP16 no longer exists


def test_trt_engine_session_falls_back_when_capture_fails(fake_trt, monkeypatch):
    from types import SimpleNamespace as NS

    import polygraphy.backend.trt as poly_trt
    import polygraphy.cuda as poly_cuda

    from lmopt.latency import cudart
    from lmopt.latency import tensorrt as lt

    fake_trt("10.3.0")
    calls = {"enqueue": 0, "malloc": 0, "free": 0, "addresses": {}}

    class Context:
        def set_tensor_address(self, name, ptr):
            calls["addresses"][name] = ptr
            return True

        def execute_async_v3(self, stream):
            calls["enqueue"] += 1
            return calls["enqueue"] != 2  # the 2nd enqueue is the one under capture: fails

    engine = NS(num_io_tensors=2, get_tensor_name=["x", "y"].__getitem__,
                get_tensor_shape=lambda n: (1, 8, 16, 16), get_tensor_dtype=lambda n: NS(name="HALF"),
                get_tensor_mode=lambda n: "in" if n == "x" else "out", create_execution_context=Context)
    monkeypatch.setattr(poly_trt, "EngineFromBytes", lambda data: (lambda: engine))
    wrapper = NS(malloc=lambda n: calls.__setitem__("malloc", calls["malloc"] + 1) or 4096 * calls["malloc"],
                 memcpy=lambda **kw: None, free=lambda p: calls.__setitem__("free", calls["free"] + 1))
    monkeypatch.setattr(poly_cuda, "wrapper", lambda: wrapper)
    monkeypatch.setattr(poly_cuda, "Stream", lambda: NS(ptr=7, synchronize=lambda: None, free=lambda: None))

    class Graph:
        def begin_capture(self, stream): pass
        def end_capture(self, stream, ok): return ok
        def launch(self, stream): raise AssertionError("no graph after a failed capture")
        def destroy(self): pass

    class Event:
        t = 0.0

        def record(self, stream):
            Event.t += 0.5
            self.at = Event.t

        def synchronize(self): pass
        def elapsed_ms(self, start): return self.at - start.at
        def destroy(self): pass

    monkeypatch.setattr(cudart, "Graph", Graph)
    monkeypatch.setattr(cudart, "Event", Event)
    session = lt.EngineSession(b"plan")
    assert session.graph is None and calls["addresses"] == {"x": 4096, "y": 8192}
    assert session.run_timed(3) == [0.5, 0.5, 0.5] and calls["enqueue"] == 5
    session.close()
    assert calls["free"] == 2
