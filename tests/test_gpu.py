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
        [init("w", rand(6, 8)), init("b", rand(6)), init("w2", rand(3, 4)),
         init("shape", np.array([2, 3, 4], np.int64)),
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
    yield "mask-and-pooling-ops-opset17", model_of(  # what encoder exports hold around attention and pooling
        [helper.make_node("Unsqueeze", ["x", "ax"], ["u"]),
         helper.make_node("Expand", ["u", "shape"], ["e"]),
         helper.make_node("ReduceSum", ["e", "ax"], ["rs"], keepdims=0),
         helper.make_node("ReduceMean", ["x"], ["rm"], axes=[1], keepdims=1),
         helper.make_node("ReduceL2", ["x"], ["l2"], axes=[2], keepdims=1),
         helper.make_node("Max", ["rs", "rm", "l2"], ["mx"]),
         helper.make_node("Min", ["mx", "half"], ["mn"]),
         helper.make_node("Relu", ["x"], ["rx"]),
         helper.make_node("Equal", ["rx", "x"], ["eq"]),
         helper.make_node("Not", ["eq"], ["ne"]),
         helper.make_node("And", ["eq", "eq"], ["both"]),
         helper.make_node("Cast", ["both"], ["bf"], to=TensorProto.FLOAT),
         helper.make_node("Where", ["ne", "x", "bf"], ["w"]),
         helper.make_node("Pow", ["w", "two"], ["p"]),
         helper.make_node("Sqrt", ["p"], ["sq"]),
         helper.make_node("Neg", ["sq"], ["ng"]),
         helper.make_node("Exp", ["ng"], ["ex"]),
         helper.make_node("Add", ["ex", "mn"], ["sm"]),
         helper.make_node("CumSum", ["sm", "ax"], ["cs"]),
         helper.make_node("CumSum", ["cs", "ax"], ["y"], exclusive=1, reverse=1)],
        [("x", [2, 3, 4])], ["y"],
        [init("ax", np.array([1], np.int64)), init("shape", np.array([2, 5, 3, 4], np.int64)),
         init("half", np.float32(0.5)), init("two", np.float32(2.0))], opset=17)


@pytest.mark.parametrize("name,model", list(graphs()), ids=[n for n, _ in graphs()])
def test_torch_translator_matches_onnxruntime(name, model):
    torch = pytest.importorskip("torch", reason="torch is not installed (pip install torch to test the translator)")
    from lmopt.inputs import random_feeds
    from lmopt.latency.torch_translate import translate

    for vi in model.graph.input:  # outputs were left untyped above; inputs are static
        assert all(d.dim_value > 0 for d in vi.type.tensor_type.shape.dim)
    feeds = random_feeds(model, 1, seed=1)[0]
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


def tiny_conv_model(channels=8, size=16):
    return model_of([helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
                     helper.make_node("Relu", ["c"], ["y"])],
                    [("x", [1, channels, size, size])], ["y"], [init("w", rand(channels, channels, 3, 3))])


def assert_times_the_work(backend, small_ms):
    """A block with 4096x the multiply-adds of tiny_conv_model (64 channels, 128x128) must measure slower:
    fails when the events time something other than the launches (another stream, an empty graph)."""
    big_ms = backend.measure(tiny_conv_model(channels=64, size=128))
    assert 0 < small_ms < big_ms


# --- torch-cuda ----------------------------------------------------------------------------------

@needs_torch_cuda
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_torch_cuda_measures(precision):
    import torch

    backend = get_backend("torch-cuda", precision=precision, warmup_s=0.05, runs=10, min_time_s=0.05)
    assert_times_the_work(backend, backend.measure(tiny_conv_model()))
    small, big = backend.measure_interleaved([tiny_conv_model(), tiny_conv_model(channels=64, size=128)], rounds=3)
    assert 0 < small < big
    key = backend.cache_key()
    assert key["precision"] == precision and key["library"].startswith(f"torch {torch.__version__} CUDA ")
    assert key["device"] == torch.cuda.get_device_name(0)


# --- TensorRT ------------------------------------------------------------------------------------

@needs_trt
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_trt_measures(precision, tmp_path):
    backend = get_backend("trt", precision=precision, timing_cache=tmp_path / "timing.cache",
                          warmup_s=0.05, runs=10, min_time_s=0.05)
    assert_times_the_work(backend, backend.measure(tiny_conv_model()))
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


SPARSE_NEVER_RUN = "2:4 sparse kernels were never built or timed on this machine"


@pytest.mark.skipif(trt_skip_reason() is not None, reason=f"{trt_skip_reason()}; {SPARSE_NEVER_RUN}")
def test_lmopt_build_sparse_engine(tmp_path, capsys, monkeypatch):
    """Builds and times a 2:4 sparse engine; whether TensorRT picked sparse kernels (and was faster) is
    the GPU's call: the latency is printed, not asserted."""
    monkeypatch.setattr(cli, "TOOLS", available_tools())
    model = save_model(tiny_conv_model(channels=64, size=32), tmp_path / "m.onnx")
    out = tmp_path / "m.engine"
    assert cli.main(["build", str(model), "-o", str(out), "--fp16", "--sparsity", "2:4"]) == 0
    printed = capsys.readouterr().out
    assert out.stat().st_size > 0 and (tmp_path / "m.sparse.onnx").is_file()
    assert "2:4 sparse weights" in printed and "--sparsity=enable" in printed
    assert "ms median GPU compute time" in printed


def test_trtexec_command_line():
    from lmopt.engine import trtexec_command

    line = trtexec_command("m.onnx", "out dir/m.engine", fp16=True, workspace_mib=1024, timing_cache="t.cache")
    assert line == ("trtexec --onnx=m.onnx '--saveEngine=out dir/m.engine' --fp16 "
                    "--memPoolSize=workspace:1024M --timingCacheFile=t.cache")
    # TensorRT 11: no --fp16; the fp16 model is the input and the network is always strongly typed
    # (--stronglyTyped is a deprecated no-op in TensorRT 11's trtexec)
    line = trtexec_command("m16.onnx", "e", fp16=True, fp16_flag=False)
    assert "--fp16" not in line and "--stronglyTyped" not in line
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
    assert_times_the_work(backend, ms)


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


def test_build_sparsity_without_tensorrt_fails_before_pruning(tmp_path, capsys, monkeypatch):
    if trt_status() is None:
        pytest.skip("TensorRT and a GPU are present here: see test_lmopt_build_sparse_engine")
    monkeypatch.setattr(cli, "TOOLS", available_tools())
    model = save_model(tiny_conv_model(channels=64, size=8), tmp_path / "m.onnx")
    code = cli.main(["build", str(model), "-o", str(tmp_path / "m.engine"), "--sparsity", "2:4"])
    err = capsys.readouterr().err
    assert code != 0 and len(err.strip().splitlines()) == 1 and "TensorRT" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # no engine, no .sparse.onnx


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
    assert not net.get("strongly_typed")
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
    assert "strongly_typed" not in net  # deprecated in TensorRT 11, where every network is strongly typed
    assert not _calls(log, "PostprocessNetwork")
    (config,) = _calls(log, "CreateConfig")
    assert config["fp16"] is False  # BuilderFlag.FP16 no longer exists
    assert config["tf32"] is True


def test_trt_engine_session_falls_back_when_capture_fails(fake_trt, monkeypatch):
    from types import SimpleNamespace as NS

    import polygraphy.backend.trt as poly_trt
    import polygraphy.cuda as poly_cuda

    from lmopt.latency import cudart
    from lmopt.latency import tensorrt as lt

    fake_trt("10.3.0")
    calls = {"enqueue": 0, "malloc": 0, "free": 0, "addresses": {}, "streams": set(), "destroyed": 0,
             "stream_freed": 0}

    class Context:
        def set_tensor_address(self, name, ptr):
            calls["addresses"][name] = ptr
            return True

        def execute_async_v3(self, stream):
            calls["enqueue"] += 1
            calls["streams"].add(stream)
            return calls["enqueue"] != 2  # the 2nd enqueue is the one under capture: fails

    engine = NS(num_io_tensors=2, get_tensor_name=["x", "y"].__getitem__,
                get_tensor_shape=lambda n: (1, 8, 16, 16), get_tensor_dtype=lambda n: NS(name="HALF"),
                get_tensor_mode=lambda n: "in" if n == "x" else "out", create_execution_context=Context)
    monkeypatch.setattr(poly_trt, "EngineFromBytes", lambda data: (lambda: engine))
    wrapper = NS(malloc=lambda n: calls.__setitem__("malloc", calls["malloc"] + 1) or 4096 * calls["malloc"],
                 memcpy=lambda **kw: None, free=lambda p: calls.__setitem__("free", calls["free"] + 1))
    monkeypatch.setattr(poly_cuda, "wrapper", lambda: wrapper)
    monkeypatch.setattr(poly_cuda, "Stream", lambda: NS(ptr=7, synchronize=lambda: None,
                                                        free=lambda: calls.__setitem__("stream_freed", 1)))
    monkeypatch.setattr(cudart, "lib", lambda: None)

    class Graph:
        def begin_capture(self, stream): pass
        def end_capture(self, stream, ok): return ok
        def launch(self, stream): raise AssertionError("no graph after a failed capture")
        def destroy(self): pass

    class Event:
        t = 0.0

        def record(self, stream):
            assert stream == 7  # the events are on the stream TensorRT enqueues on
            Event.t += 0.5
            self.at = Event.t

        def synchronize(self): pass
        def elapsed_ms(self, start): return self.at - start.at
        def destroy(self): calls["destroyed"] += 1

    monkeypatch.setattr(cudart, "Graph", Graph)
    monkeypatch.setattr(cudart, "Event", Event)
    session = lt.EngineSession(b"plan")
    assert session.graph is None and calls["addresses"] == {"x": 4096, "y": 8192}
    # one sample: 3 launches between one event pair (0.5 ms apart), plus one launch queued before the start event
    assert session.run_timed(3) == [pytest.approx(0.5 / 3)] and calls["enqueue"] == 2 + 1 + 3
    assert len(session.enqueue_ms) == 1
    assert calls["streams"] == {7}
    session.close()
    assert calls["free"] == 2 and calls["destroyed"] == 2 and calls["stream_freed"] == 1


# --- lmopt build --sparsity 2:4 with the FAKE tensorrt module ---------------------------------------
# What reaches polygraphy: the pruned weights and CreateConfig(sparse_weights=True). Not whether TensorRT
# then runs sparse kernels, nor how fast: 2:4 sparse kernels were never built or timed on this machine.

def _assert_2_4_along_input_channels(weight):
    groups = np.moveaxis(weight, 1, -1).reshape(-1, 4)  # Conv weight (M, C, kH, kW): C is the reduction axis
    assert (np.count_nonzero(groups, axis=1) == 2).all()


@pytest.fixture
def fake_build(fake_trt, monkeypatch, tmp_path):
    """`lmopt build` of m.onnx (or `model`) into m.engine on a fake TensorRT:
    run(version, *flags, capsys=, model=) -> (exit code, stdout, stderr, polygraphy call log)."""
    from lmopt import engine
    from lmopt.latency import cudart

    monkeypatch.setattr(engine, "require_tensorrt", lambda: None)
    monkeypatch.setattr(cudart, "device_name", lambda: "fake GPU")
    monkeypatch.setattr(cli, "TOOLS", available_tools())
    model = save_model(tiny_conv_model(channels=64, size=8), tmp_path / "m.onnx")

    def run(version, *flags, capsys, model=model):
        log = fake_trt(version)
        code = cli.main(["build", str(model), "-o", str(tmp_path / "m.engine"), "--no-measure", *flags])
        out, err = capsys.readouterr()
        return code, out, err, log
    return run


def test_build_sparsity_reaches_the_builder_config(fake_build, tmp_path, capsys):
    import onnx

    code, printed, _, log = fake_build("10.3.0", "--sparsity", "2:4", capsys=capsys)
    assert code == 0
    (config,) = _calls(log, "CreateConfig")
    assert config["sparse_weights"] is True and config["tf32"] is True
    (net,) = _calls(log, "NetworkFromOnnxBytes")
    parsed = onnx.load_from_string(net["args"][0])  # what TensorRT's parser was given
    _assert_2_4_along_input_channels(numpy_helper.to_array(parsed.graph.initializer[0]))
    written = onnx.load(str(tmp_path / "m.sparse.onnx"))
    assert written.graph.initializer[0].SerializeToString() == parsed.graph.initializer[0].SerializeToString()
    assert (tmp_path / "m.engine").read_bytes() == b"plan"
    assert f"trtexec --onnx={tmp_path / 'm.sparse.onnx'} --saveEngine={tmp_path / 'm.engine'} --sparsity=enable" \
        in printed
    assert "2:4 sparse weights" in printed
    assert "2:4 sparsity: 1 weight tensor pruned (18,432 of the model's 36,864" in printed
    assert "without fine-tuning" in printed


def test_build_without_sparsity_asks_for_no_sparse_kernels(fake_build, tmp_path, capsys):
    code, printed, _, log = fake_build("10.3.0", capsys=capsys)
    assert code == 0
    (config,) = _calls(log, "CreateConfig")
    assert "sparse_weights" not in config
    assert "--sparsity" not in printed and not (tmp_path / "m.sparse.onnx").exists()


def test_build_sparsity_on_tensorrt_11_fp16(fake_build, tmp_path, capsys):
    """TensorRT 11 parses an fp16 ONNX: it is made from the pruned model, so its weights are 2:4 too."""
    import onnx

    code, printed, _, log = fake_build("11.0.0", "--sparsity", "2:4", "--fp16", capsys=capsys)
    assert code == 0
    (config,) = _calls(log, "CreateConfig")
    assert config["sparse_weights"] is True and config["fp16"] is False
    fp16 = onnx.load(str(tmp_path / "m.fp16.onnx"))
    weight = numpy_helper.to_array(fp16.graph.initializer[0])
    assert weight.dtype == np.float16
    _assert_2_4_along_input_channels(weight)
    assert f"--onnx={tmp_path / 'm.fp16.onnx'}" in printed and "--sparsity=enable" in printed


def test_build_refuses_to_write_the_sparse_model_over_its_input(fake_build, tmp_path, capsys):
    source = tmp_path / "m.sparse.onnx"  # m.engine's sparse model would have this name
    source.write_bytes((tmp_path / "m.onnx").read_bytes())
    code, _, err, log = fake_build("10.3.0", "--sparsity", "2:4", capsys=capsys, model=source)
    assert code != 0 and "over the input model" in err and len(err.strip().splitlines()) == 1
    assert source.read_bytes() == (tmp_path / "m.onnx").read_bytes()
    assert not log and not (tmp_path / "m.engine").exists()  # refused before any build


# --- TensorRT 11 and polygraphy ------------------------------------------------------------------

def test_polygraphy_floor_per_tensorrt_major():
    from lmopt.latency.tensorrt import polygraphy_status

    assert polygraphy_status("10.3.0", "0.49.13") is None  # JetPack 6's TensorRT works with 0.49
    assert polygraphy_status("11.1.0", "0.50.3") is None
    reason = polygraphy_status("11.1.0", "0.49.27")
    assert reason is not None and "polygraphy >= 0.50" in reason and "\n" not in reason


def test_trt_status_rejects_old_polygraphy_on_tensorrt_11(fake_trt, monkeypatch):
    import importlib.machinery
    import sys

    import polygraphy

    from lmopt.latency import tensorrt as lt

    fake_trt("11.1.0")
    sys.modules["tensorrt"].__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)
    monkeypatch.setattr(polygraphy, "__version__", "0.49.27")
    lt.trt_status.cache_clear()
    try:
        reason = lt.trt_status()
    finally:
        lt.trt_status.cache_clear()
    assert "TensorRT 11.1.0 needs polygraphy >= 0.50" in reason


def test_trt_build_attribute_error_from_old_polygraphy_is_one_line(fake_trt, monkeypatch):
    import polygraphy.backend.trt as poly_trt

    from lmopt.latency.tensorrt import build_engine_bytes

    fake_trt("11.1.0")

    def build(*args, **kwargs):
        def loader():  # polygraphy 0.49's CreateConfig on TensorRT 11
            raise AttributeError("'tensorrt.ILayer' object has no attribute 'precision_is_set'")
        return loader

    monkeypatch.setattr(poly_trt, "EngineBytesFromNetwork", build)
    with pytest.raises(LmoptError) as info:
        build_engine_bytes(tiny_conv_model(), "fp32")
    message = str(info.value)
    assert "\n" not in message and "precision_is_set" in message
    assert "TensorRT 11.1.0" in message and "pip install -U polygraphy" in message


def test_trt_build_follows_the_tf32_policy(fake_trt):
    from lmopt.latency.tensorrt import build_engine_bytes

    log = fake_trt("10.3.0")
    build_engine_bytes(tiny_conv_model(), "fp32", tf32=False)
    build_engine_bytes(tiny_conv_model(), "fp32")
    assert [c["tf32"] for c in _calls(log, "CreateConfig")] == [False, True]


# --- event timing: many launches between one event pair ------------------------------------------

class SimulatedGpuSession:
    """A stream on a simulated GPU: host calls take host time, kernels run in order on the GPU.

    Each launch costs `enqueue_us` of host time and `gpu_us` of GPU time; an event record costs
    `record_us` of host time and is stamped when the GPU reaches it.
    """

    def __init__(self, gpu_us, enqueue_us, record_us=1.0):
        self.gpu_us, self.enqueue_us, self.record_us = gpu_us, enqueue_us, record_us
        self.host = self.gpu_free = 0.0
        self.stamps = [0.0, 0.0]

    def clock(self):
        return self.host * 1e-6

    def _launch(self):
        self.host += self.enqueue_us
        self.gpu_free = max(self.gpu_free, self.host) + self.gpu_us

    def _record(self, end):
        self.host += self.record_us
        self.stamps[end] = max(self.gpu_free, self.host)

    def _elapsed_ms(self):
        self.host = max(self.host, self.stamps[1])
        return (self.stamps[1] - self.stamps[0]) / 1000.0


def simulated(gpu_us, enqueue_us):
    from lmopt.latency.base import EventTimedSession

    class Session(SimulatedGpuSession, EventTimedSession):
        clock = SimulatedGpuSession.clock

    return Session(gpu_us, enqueue_us)


def test_event_timing_of_a_small_block_has_no_idle_time():
    # A 5 us block enqueued in 2 us: one event pair per launch would time 2 + 5 us of each
    # (the GPU idles while the host enqueues); many launches between one pair time 5 us.
    session = simulated(gpu_us=5.0, enqueue_us=2.0)
    samples = [session.run_timed(10)[0] for _ in range(5)]
    assert samples == [pytest.approx(0.005)] * 5
    assert session.enqueue_ms == [pytest.approx(0.002)] * 5


def test_enqueue_bound_blocks_are_flagged():
    from lmopt.latency.base import enqueue_bound

    fast = simulated(gpu_us=5.0, enqueue_us=2.0)
    slow = simulated(gpu_us=5.0, enqueue_us=8.0)  # the host is slower than the GPU
    fast_ms = [fast.run_timed(10)[0] for _ in range(3)]
    slow_ms = [slow.run_timed(10)[0] for _ in range(3)]
    assert not enqueue_bound(fast_ms, fast.enqueue_ms)
    assert enqueue_bound(slow_ms, slow.enqueue_ms)
    assert enqueue_bound([1.0], [0.81]) and not enqueue_bound([1.0], [0.8])  # trtexec's 0.8 threshold
    assert not enqueue_bound([1.0], None)  # CPU sessions measure no enqueue time


class SimulatedBackend:
    """A LatencyBackend whose sessions run on the simulated GPU; the block's input width sets the GPU time."""

    @staticmethod
    def make(enqueue_us):
        from lmopt.latency.base import LatencyBackend

        class Backend(LatencyBackend):
            name = "sim"

            def cache_key(self):
                return {"backend": "sim"}

            def _open(self, model):
                return simulated(float(model.graph.input[0].type.tensor_type.shape.dim[3].dim_value), enqueue_us)

        return Backend(warmup_s=0.0, runs=5, min_time_s=0.0)


def test_measure_reports_enqueue_bound_blocks(caplog):
    from lmopt.latency import profile_blocks

    def block(width):
        return model_of([helper.make_node("Relu", ["x"], ["y"])], [("x", [1, 1, 1, width])], ["y"])

    backend = SimulatedBackend.make(enqueue_us=8.0)
    assert backend.measure(block(20)) == pytest.approx(0.020) and not backend.last_enqueue_bound
    # enqueue-bound: the host rate (8 us a launch), not the GPU time (5 us), is what the events see
    assert backend.measure(block(5)) == pytest.approx(0.008, rel=0.05) and backend.last_enqueue_bound
    assert backend.enqueue_bound == 1
    with caplog.at_level("WARNING", logger="lmopt"):
        result = profile_blocks({"small": block(5), "big": block(20), "small2": block(4)}, backend, progress=False)
    assert result["big"] == pytest.approx(0.020)
    (record,) = caplog.records
    assert record.name == "lmopt.latency.profiler" and record.levelname == "WARNING"
    assert "2 of 3 blocks timed on sim were enqueue-bound" in record.getMessage()


# --- libcudart ------------------------------------------------------------------------------------

@pytest.fixture
def fresh_cudart():
    from lmopt.latency import cudart

    cudart.lib.cache_clear()
    yield cudart
    cudart.lib.cache_clear()


def test_cudart_found_in_the_pip_wheel(fresh_cudart, tmp_path, monkeypatch):
    import os
    import sys
    from types import SimpleNamespace as NS

    import polygraphy.cuda as poly_cuda

    site = tmp_path / "site-packages"
    wheel_lib = site / "nvidia" / "cuda_runtime" / "lib"
    wheel_lib.mkdir(parents=True)
    (wheel_lib / "libcudart.so.12").write_bytes(b"")
    (tmp_path / "other" / "nvidia" / "cuda_runtime" / "lib").mkdir(parents=True)  # no library inside
    assert fresh_cudart.wheel_runtime_dirs([str(tmp_path / "other"), "", str(site)]) == [wheel_lib]

    def wrapper():  # polygraphy's search: LD_LIBRARY_PATH, /usr/local/cuda/lib64, /usr/lib, /lib
        if str(wheel_lib) not in os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep):
            raise OSError("libcudart.so: cannot open shared object file: No such file or directory")
        return NS(handle="cudart handle")

    monkeypatch.setattr(poly_cuda, "wrapper", wrapper)
    monkeypatch.setattr(sys, "path", [str(tmp_path / "other"), str(site)])
    monkeypatch.setenv("LD_LIBRARY_PATH", "/opt/elsewhere")
    assert fresh_cudart.lib() == "cudart handle"
    assert os.environ["LD_LIBRARY_PATH"] == f"{wheel_lib}{os.pathsep}/opt/elsewhere"


def test_cudart_without_any_runtime_still_raises(fresh_cudart, tmp_path, monkeypatch):
    import sys

    import polygraphy.cuda as poly_cuda

    def wrapper():
        raise OSError("libcudart.so: cannot open shared object file")

    monkeypatch.setattr(poly_cuda, "wrapper", wrapper)
    monkeypatch.setattr(sys, "path", [str(tmp_path)])
    with pytest.raises(OSError):
        fresh_cudart.lib()


class FakeLibrary:
    """A shared library whose functions are ctypes callbacks with the prototypes lmopt declares for them:
    every call is marshalled by ctypes exactly as a call into the real C library would be."""

    def __init__(self, prototypes, **functions):
        import ctypes

        for name, function in functions.items():
            setattr(self, name, ctypes.CFUNCTYPE(ctypes.c_int, *prototypes[name])(function))


def fake_driver(name=b"NVIDIA Fake GPU", init_status=0):
    import ctypes

    from lmopt.latency.cudart import DRIVER_PROTOTYPES

    seen = {}

    def get(device_p, ordinal):
        device_p[0] = 100 + ordinal  # a CUdevice handle that differs from the ordinal
        return 0

    def get_name(buffer, length, device):
        seen.update(length=length, device=device)
        data = name[:length - 1] + b"\0"
        ctypes.memmove(buffer, data, len(data))
        return 0

    return FakeLibrary(DRIVER_PROTOTYPES, cuInit=lambda flags: init_status, cuDeviceGet=get,
                       cuDeviceGetName=get_name), seen


def test_device_name_from_the_driver_with_the_buffer_length(monkeypatch):
    from lmopt.latency import cudart

    driver, seen = fake_driver()
    monkeypatch.setattr(cudart, "driver_lib", lambda: driver)
    assert cudart.device_name(1) == "NVIDIA Fake GPU"
    assert seen == {"length": cudart.NAME_BYTES, "device": 101}  # told the buffer's size; the handle, not the ordinal
    long_driver, _ = fake_driver(name=b"G" * 1000)
    monkeypatch.setattr(cudart, "driver_lib", lambda: long_driver)
    assert cudart.device_name() == "G" * (cudart.NAME_BYTES - 1)  # cut to the buffer, never past it


def test_device_name_without_a_usable_driver(monkeypatch):
    from lmopt.latency import cudart

    failing, _ = fake_driver(init_status=100)  # CUDA_ERROR_NO_DEVICE
    monkeypatch.setattr(cudart, "driver_lib", lambda: failing)
    assert cudart.device_name() == cudart.UNKNOWN_DEVICE

    def missing():
        raise OSError("libcuda.so.1: cannot open shared object file")

    monkeypatch.setattr(cudart, "driver_lib", missing)
    assert cudart.device_name() == cudart.UNKNOWN_DEVICE


@pytest.fixture
def fake_runtime(monkeypatch):
    """A libcudart of ctypes callbacks: hands out 64-bit handles, logs every call with its arguments."""
    from lmopt.latency import cudart

    state = {"next": 0x7F00_0000_0000, "calls": [], "fail": {}}

    def call(name, result=None):
        def function(*args):
            state["calls"].append((name, *args))
            if result is not None:
                result(*args)
            return state["fail"].get(name, 0)
        return function

    def new_handle(pointer, *rest):
        state["next"] += 0x10
        pointer[0] = state["next"]

    def elapsed(ms_p, start, end):
        ms_p[0] = 2.5

    names = [n for n in cudart.RUNTIME_PROTOTYPES
             if n not in ("cudaEventCreate", "cudaStreamEndCapture", "cudaGraphInstantiateWithFlags",
                          "cudaEventElapsedTime")]
    library = FakeLibrary(
        cudart.RUNTIME_PROTOTYPES, **{n: call(n) for n in names},
        cudaEventCreate=call("cudaEventCreate", new_handle),
        cudaStreamEndCapture=call("cudaStreamEndCapture", lambda stream, graph_p: new_handle(graph_p)),
        cudaGraphInstantiateWithFlags=call("cudaGraphInstantiateWithFlags", new_handle),
        cudaEventElapsedTime=call("cudaEventElapsedTime", elapsed))
    monkeypatch.setattr(cudart, "lib", lambda: library)
    return state


STREAM = 0x7FFF_DEAD_BEE0  # above 2**32: a handle must reach the library whole


def test_cudart_events_through_declared_prototypes(fake_runtime):
    from lmopt.latency import cudart

    start, end = cudart.Event(), cudart.Event()
    start.record(STREAM)
    end.record(STREAM)
    end.synchronize()
    assert end.elapsed_ms(start) == 2.5
    first, second = start.ptr.value, end.ptr.value
    assert first != second and first > 2 ** 32
    assert fake_runtime["calls"][2:] == [("cudaEventRecord", first, STREAM), ("cudaEventRecord", second, STREAM),
                                         ("cudaEventSynchronize", second),
                                         ("cudaEventElapsedTime", fake_runtime["calls"][-1][1], first, second)]
    start.destroy()
    start.destroy()  # once only
    assert [c for c in fake_runtime["calls"] if c[0] == "cudaEventDestroy"] == [("cudaEventDestroy", first)]
    fake_runtime["fail"]["cudaEventRecord"] = 400  # cudaErrorInvalidResourceHandle
    with pytest.raises(RuntimeError, match="cudaEventRecord failed with CUDA error 400"):
        end.record(STREAM)


@pytest.mark.parametrize("enqueued", [True, False])
def test_cudart_graph_capture(fake_runtime, enqueued):
    from lmopt.latency import cudart

    graph = cudart.Graph()
    graph.begin_capture(STREAM)
    captured = graph.end_capture(STREAM, ok=enqueued)
    calls = fake_runtime["calls"]
    assert calls[0] == ("cudaStreamBeginCapture", STREAM, cudart.CAPTURE_MODE_THREAD_LOCAL)
    assert calls[1][:2] == ("cudaStreamEndCapture", STREAM)
    captured_graph = fake_runtime["next"] if not enqueued else fake_runtime["next"] - 0x10
    names = [c[0] for c in calls]
    assert ("cudaGraphDestroy", captured_graph) in calls  # the graph goes once instantiated (or refused)
    if enqueued:
        assert captured and graph.exec.value == fake_runtime["next"]
        instantiate = next(c for c in calls if c[0] == "cudaGraphInstantiateWithFlags")
        assert instantiate[2:] == (captured_graph, 0)
        assert "cudaGetLastError" not in names
        graph.launch(STREAM)
        assert calls[-1] == ("cudaGraphLaunch", graph.exec.value, STREAM)
    else:  # the enqueue under capture failed: nothing instantiated, the runtime's last error read
        assert not captured and not graph.exec
        assert "cudaGraphInstantiateWithFlags" not in names and names[-1] == "cudaGetLastError"


def test_timed_stream_records_on_its_stream_and_releases_everything(fake_runtime, monkeypatch):
    from types import SimpleNamespace as NS

    import polygraphy.cuda as poly_cuda

    from lmopt.latency import cudart

    freed = []
    monkeypatch.setattr(poly_cuda, "Stream", lambda: NS(ptr=STREAM, synchronize=lambda: None,
                                                        free=lambda: freed.append(STREAM)))
    timer = cudart.TimedStream()
    start, end = (event.ptr.value for event in timer.events)
    timer.record(False)
    timer.record(True)
    assert timer.elapsed_ms() == 2.5
    assert ("cudaEventRecord", start, STREAM) in fake_runtime["calls"]
    assert ("cudaEventRecord", end, STREAM) in fake_runtime["calls"]
    timer.close()
    assert freed == [STREAM] and timer.events == ()
    destroyed = [c[1] for c in fake_runtime["calls"] if c[0] == "cudaEventDestroy"]
    assert destroyed == [start, end]

    fake_runtime["calls"].clear()
    created = []

    def one_event_only(pointer):  # the second cudaEventCreate fails: the first event and the stream go
        if created:
            return 2  # cudaErrorMemoryAllocation
        created.append(1)
        pointer[0] = 0x1234_5678_9A
        return 0

    monkeypatch.setattr(cudart, "lib", lambda: FakeLibrary(
        cudart.RUNTIME_PROTOTYPES, cudaEventCreate=one_event_only,
        cudaEventDestroy=lambda event: fake_runtime["calls"].append(("cudaEventDestroy", event)) or 0))
    with pytest.raises(RuntimeError, match="cudaEventCreate"):
        cudart.TimedStream()
    assert fake_runtime["calls"] == [("cudaEventDestroy", 0x1234_5678_9A)] and freed == [STREAM, STREAM]


# --- onnxruntime-gpu options and the TF32 policy -----------------------------------------------------

@pytest.fixture
def fake_device(monkeypatch, tmp_path):
    from lmopt.latency import cudart

    monkeypatch.setattr(cudart, "device_name", lambda device=0: "NVIDIA Fake GPU")
    monkeypatch.setenv("LMOPT_CACHE_DIR", str(tmp_path))
    return tmp_path


def conv_named(prefix, size=16, seed=0):
    rng = np.random.default_rng(seed)
    return model_of([helper.make_node("Conv", [prefix + "x", prefix + "w"], [prefix + "y"], pads=[1, 1, 1, 1])],
                    [(prefix + "x", [1, 8, size, size])], [prefix + "y"],
                    [init(prefix + "w", rng.standard_normal((8, 8, 3, 3)).astype(np.float32))])


def test_ort_trt_engine_cache_per_block_structure(fake_device):
    from lmopt.latency.ort_gpu import OrtTensorrtBackend

    backend = OrtTensorrtBackend()
    a = backend._provider_options(conv_named("a_"), 1234, False)
    b = backend._provider_options(conv_named("b_", seed=1), 1234, False)  # same structure, other names/weights
    c = backend._provider_options(conv_named("a_", size=32), 1234, False)  # same names, other shape
    d = OrtTensorrtBackend(precision="fp16")._provider_options(conv_named("a_"), 1234, False)
    engines = [o["trt_engine_cache_path"] for o in (a, b, c, d)]
    assert engines[0] == engines[1] and len(set(engines)) == 3
    assert all(str(fake_device / "ort-trt") in e for e in engines)
    assert a["trt_timing_cache_path"] == c["trt_timing_cache_path"] == str(fake_device / "ort-trt")
    assert a["user_compute_stream"] == "1234" and a["trt_fp16_enable"] is False and d["trt_fp16_enable"] is True
    with pytest.raises(LmoptError, match="TF32"):
        OrtTensorrtBackend(tf32=False)


def test_ort_cuda_options_cuda_graph_tf32_and_stream(fake_device):
    from lmopt.latency.ort_gpu import OrtCudaBackend

    options = OrtCudaBackend()._provider_options(conv_named("a_"), 77, True)
    assert options["enable_cuda_graph"] == "1" and options["use_tf32"] == "1"
    assert options["user_compute_stream"] == "77" and options["has_user_compute_stream"] == "1"
    plain = OrtCudaBackend(tf32=False)._provider_options(conv_named("a_"), 77, False)
    assert plain["enable_cuda_graph"] == "0" and plain["use_tf32"] == "0"
    assert OrtCudaBackend().cache_key()["cuda_graph"] is True
    assert OrtCudaBackend(use_cuda_graph=False).cache_key()["cuda_graph"] is False


def test_ort_output_specs_for_preallocated_outputs():
    from lmopt.latency.ort_gpu import output_specs

    assert output_specs(conv_named("a_")) == [("a_y", (1, 8, 16, 16), np.float32)]
    dynamic = conv_named("a_")
    dynamic.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    assert output_specs(dynamic) is None  # no fixed output buffer: no CUDA graph


@pytest.fixture
def fake_ort_gpu(monkeypatch):
    """onnxruntime-gpu on a fake GPU: records sessions; refuses CUDA graphs when asked to."""
    from types import SimpleNamespace as NS

    import polygraphy.cuda as poly_cuda

    from lmopt.latency import cudart

    state = {"refuse_graph": False, "take_stream": True, "sessions": [], "runs": 0}

    class Binding:
        def __getattr__(self, name):  # bind_ortvalue_input, bind_ortvalue_output, bind_output
            return lambda *args: None

    class InferenceSession:
        def __init__(self, data, options, providers):
            (self.provider, self.options), = providers
            if state["refuse_graph"] and self.options.get("enable_cuda_graph") == "1":
                raise RuntimeError("This session cannot use the CUDA Graph feature as requested by the user")
            state["sessions"].append(self.options)

        def get_providers(self):
            return [self.provider, "CPUExecutionProvider"]

        def get_provider_options(self):
            stream = self.options["user_compute_stream"] if state["take_stream"] else "0"
            return {self.provider: {"user_compute_stream": stream}}

        def io_binding(self):
            return Binding()

        def get_outputs(self):
            return []

        def run_with_iobinding(self, binding, run_options=None):
            assert run_options.get_run_config_entry("disable_synchronize_execution_providers") == "1"
            state["runs"] += 1

    monkeypatch.setattr(ort, "InferenceSession", InferenceSession)
    monkeypatch.setattr(ort, "OrtValue", NS(ortvalue_from_numpy=lambda *a: object(),
                                             ortvalue_from_shape_and_type=lambda *a: object()))
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(cudart, "lib", lambda: None)
    monkeypatch.setattr(poly_cuda, "Stream", lambda: NS(ptr=4242, synchronize=lambda: None, free=lambda: None))

    class Event:
        def record(self, stream):
            assert stream == 4242  # events on the stream onnxruntime runs on

        def synchronize(self): pass
        def elapsed_ms(self, start): return 1.0
        def destroy(self): pass

    monkeypatch.setattr(cudart, "Event", Event)
    return state


def test_ort_cuda_falls_back_to_plain_runs_when_no_cuda_graph(fake_ort_gpu, fake_device):
    from lmopt.latency.ort_gpu import OrtCudaBackend

    backend = OrtCudaBackend(warmup_s=0.0, runs=3, min_time_s=0.0)
    assert backend.measure(conv_named("a_")) == pytest.approx(0.1)  # 1 ms between the events / 10 runs
    assert [s["enable_cuda_graph"] for s in fake_ort_gpu["sessions"]] == ["1"]
    fake_ort_gpu["refuse_graph"] = True
    backend.measure(conv_named("a_"))
    assert [s["enable_cuda_graph"] for s in fake_ort_gpu["sessions"]] == ["1", "0"]


def test_ort_gpu_refuses_to_time_on_another_stream(fake_ort_gpu, fake_device):
    from lmopt.latency.ort_gpu import OrtCudaBackend

    fake_ort_gpu["take_stream"] = False
    with pytest.raises(LmoptError) as info:
        OrtCudaBackend(use_cuda_graph=False).measure(conv_named("a_"))
    assert "\n" not in str(info.value) and "user_compute_stream" in str(info.value)


@pytest.fixture
def fake_torch(monkeypatch):
    import sys
    from types import SimpleNamespace as NS

    torch = NS(__version__="2.5.0", version=NS(cuda="12.4"),
               backends=NS(cudnn=NS(benchmark=False, allow_tf32=True, version=lambda: 90100),
                           cuda=NS(matmul=NS(allow_tf32=False))),
               cuda=NS(get_device_name=lambda i: "NVIDIA Fake GPU", is_available=lambda: True))
    monkeypatch.setitem(sys.modules, "torch", torch)
    return torch


def test_torch_cuda_tf32_policy_matches_tensorrt(fake_torch):
    from lmopt.latency.torch_cuda import TorchCudaBackend

    on = TorchCudaBackend()
    assert fake_torch.backends.cuda.matmul.allow_tf32 is True and fake_torch.backends.cudnn.allow_tf32 is True
    off = TorchCudaBackend(tf32=False)
    assert fake_torch.backends.cuda.matmul.allow_tf32 is False and fake_torch.backends.cudnn.allow_tf32 is False
    assert on.cache_key()["tf32"] is True and off.cache_key()["tf32"] is False


def test_every_gpu_backend_records_the_tf32_policy(fake_torch, fake_trt, fake_device, tmp_path):
    from lmopt.latency.base import backend_class

    fake_trt("10.3.0")
    for name in ("trt", "torch-cuda", "ort-cuda"):
        cls = backend_class(name)
        extra = {"timing_cache": tmp_path / "t.cache"} if name == "trt" else {}
        on, off = cls(**extra).cache_key(), cls(tf32=False, **extra).cache_key()
        assert on["tf32"] is True and off["tf32"] is False, name
        assert {k: v for k, v in on.items() if k != "tf32"} == {k: v for k, v in off.items() if k != "tf32"}
    assert backend_class("ort-trt")().cache_key()["tf32"] is True
    assert "tf32" not in backend_class("ort-cpu")().cache_key()  # no TF32 on a CPU


def test_pyproject_polygraphy_floor_matches_the_runtime_check():
    tomllib = pytest.importorskip("tomllib", reason="Python < 3.11 has no tomllib to read pyproject.toml")
    from pathlib import Path

    from lmopt.latency.tensorrt import POLYGRAPHY_FOR_TRT11

    project = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    floor = f"polygraphy>={POLYGRAPHY_FOR_TRT11}"
    assert floor in extras["trt11"] and floor in extras["trt"]
    assert not any("cuda-python" in dep for deps in extras.values() for dep in deps)
