"""Hostile input from issue 8: one line on stderr, a non-zero exit where the result is not what was
asked, the input unchanged, nothing partial left behind, and every output path checked first.

Runs `lmopt.cli.main` in process on tiny models (tests/chains.py style); capfd sees what
onnxruntime's C++ logger writes to stderr too.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_cli import call  # (exit code, stdout, stderr) of one CLI run

from lmopt.latency.cache import LatencyCache
from lmopt.onnxio import DEFAULT_OPSET, runtime_compatible

ROOT = Path(__file__).resolve().parent.parent
QUICK = ["--backend", "ort-cpu", "-q", "--no-measure", "--calib-count", "2", "--eval-count", "2"]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_one_line_error(code, out, err, *needles):
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert "Traceback" not in err + out and "internal error" not in err
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"


def f32(name, array):
    return numpy_helper.from_array(np.asarray(array, dtype=np.float32), name)


def relu_chain(path: Path, channels: int = 4, size: int = 8, layers: int = 3, extra_output: bool = False) -> Path:
    """x -> (Conv 3x3 -> Relu) x layers -> y; with extra_output, the first Relu is a graph output too."""
    rng = np.random.default_rng(0)
    nodes, inits, cur = [], [], "x"
    for i in range(layers):
        cin = 3 if i == 0 else channels
        inits += [f32(f"W{i}", rng.standard_normal((channels, cin, 3, 3)) * 0.3),
                  f32(f"B{i}", rng.standard_normal(channels))]
        nodes += [helper.make_node("Conv", [cur, f"W{i}", f"B{i}"], [f"c{i}"], pads=[1, 1, 1, 1], name=f"conv{i}"),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}")]
        cur = f"r{i}"
    nodes.append(helper.make_node("Identity", [cur], ["y"]))
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * 4)]
    if extra_output:
        outputs.append(helper.make_tensor_value_info("r0", TensorProto.FLOAT, [None] * 4))
    graph = helper.make_graph(nodes, "relu_chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                   [1, 3, size, size])], outputs, inits)
    model = runtime_compatible(helper.make_model(graph, opset_imports=[helper.make_opsetid("", DEFAULT_OPSET)]))
    onnx.save(model, str(path))
    return path


def linear_pair(path: Path, extra_output: bool = False) -> Path:
    """x -> Conv 1x1 -> Conv 1x1 -> y (exactly mergeable); with extra_output, a Relu of x is an output too."""
    rng = np.random.default_rng(1)
    nodes = [helper.make_node("Conv", ["x", "W0", "B0"], ["h"], name="conv0"),
             helper.make_node("Conv", ["h", "W1", "B1"], ["y"], name="conv1")]
    inits = [f32("W0", rng.standard_normal((4, 3, 1, 1))), f32("B0", rng.standard_normal(4)),
             f32("W1", rng.standard_normal((5, 4, 1, 1))), f32("B1", rng.standard_normal(5))]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * 4)]
    if extra_output:
        nodes.append(helper.make_node("Relu", ["x"], ["side"], name="side"))
        outputs.append(helper.make_tensor_value_info("side", TensorProto.FLOAT, [None] * 4))
    graph = helper.make_graph(nodes, "pair", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 6])],
                              outputs, inits)
    onnx.save(runtime_compatible(helper.make_model(graph, opset_imports=[helper.make_opsetid("", DEFAULT_OPSET)])),
              str(path))
    return path


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("LMOPT_CACHE_DIR", str(folder))
    return folder


def unwritable_dir(tmp_path: Path) -> Path:
    """A folder this process cannot create files in (root ignores modes: use /sys then)."""
    folder = tmp_path / "readonly"
    folder.mkdir()
    folder.chmod(0o555)
    for candidate in (folder, Path("/sys")):
        try:
            fd, probe = tempfile.mkstemp(dir=candidate)
        except OSError:
            return candidate
        os.close(fd)
        os.unlink(probe)
    pytest.skip("no unwritable folder available to this user")


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


# --------------------------------------------------------------------------- output paths, checked first


@pytest.mark.parametrize("where", ["-o readonly", "-o directory", "--json readonly"])
def test_output_paths_are_checked_before_any_work(tmp_path, capfd, cache_dir, monkeypatch, where):
    from lmopt import optimizer

    def never(*args, **kwargs):
        raise AssertionError("profiling started before the output paths were checked")

    monkeypatch.setattr(optimizer, "Study", never)
    model = relu_chain(tmp_path / "m.onnx")
    before = digest(model)
    output, json_path = tmp_path / "out.onnx", tmp_path / "report.json"
    if where == "-o readonly":
        output = unwritable_dir(tmp_path) / "out.onnx"
    elif where == "-o directory":
        output = tmp_path / "adir"
        output.mkdir()
    else:
        json_path = unwritable_dir(tmp_path) / "report.json"
    code, out, err = call(["optimize", model, "--target", "2", "-o", output, "--json", json_path] + QUICK, capfd)
    assert_one_line_error(code, out, err, where.split()[0])
    assert digest(model) == before
    assert not (tmp_path / "out.onnx").exists() and not (tmp_path / "report.json").exists()


@pytest.mark.parametrize("tool,extra", [("merge", "--json"), ("profile", "-q"), ("build", "--no-measure")])
def test_merge_profile_and_build_check_their_output_first(tmp_path, capfd, cache_dir, tool, extra):
    model = linear_pair(tmp_path / "m.onnx")
    folder = tmp_path / "adir"
    folder.mkdir()
    code, out, err = call([tool, model, "-o", folder, extra], capfd)
    assert_one_line_error(code, out, err, "is a directory")
    assert list(folder.iterdir()) == []


def test_json_report_is_written_with_the_model(tmp_path, capfd, cache_dir):
    model = relu_chain(tmp_path / "m.onnx", extra_output=True)
    out_path, report_path = tmp_path / "fast.onnx", tmp_path / "report.json"
    code, out, err = call(["optimize", model, "--target", "1.01", "-o", out_path, "--json", report_path,
                           "--best-effort"] + QUICK, capfd)
    assert code == 0, err
    report = json.loads(report_path.read_text())
    # several outputs: each one's fidelity is in the report, by name
    assert set(report["outputs"]) == {"y", "r0"}
    assert report["fidelity"] == report["outputs"]["y"]
    assert out_path.exists()


# --------------------------------------------------------------------------- data and cache


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_calibration_data_is_refused(tmp_path, capfd, cache_dir, bad):
    model = relu_chain(tmp_path / "m.onnx")
    data = np.zeros((4, 3, 8, 8), np.float32)
    data[2, 0, 0, 0] = bad
    np.save(tmp_path / "calib.npy", data)
    code, out, err = call(["optimize", model, "--target", "2", "-o", tmp_path / "o.onnx",
                           "--calib", tmp_path / "calib.npy"] + QUICK, capfd)
    assert_one_line_error(code, out, err, "NaN or infinite", "1 of 4")
    assert not (tmp_path / "o.onnx").exists()


def test_damaged_cache_is_moved_aside_and_rebuilt(tmp_path, caplog, cache_dir):
    path = cache_dir / "latency.sqlite"
    with LatencyCache(path) as cache:
        for i in range(400):
            cache.put(f"signature-{i}" * 10, {"backend": "x"}, 1.0)
    data = bytearray(path.read_bytes())
    for offset in range(4096, len(data), 4096):  # clobber every page after the header
        data[offset + 100:offset + 300] = b"\xff" * 200
    path.write_bytes(bytes(data))
    with LatencyCache(path) as cache:  # must not open "fine" and fail later with "database disk image is malformed"
        assert cache.entries() == {} and cache.get("x", {}) is None
        cache.put("sig", {"backend": "x"}, 2.0)
        assert cache.get("sig", {"backend": "x"}) == 2.0
    (record,) = [r for r in caplog.records if r.name.startswith("lmopt")]
    assert record.levelname == "WARNING" and str(path) in record.getMessage() and "moved it to" in record.getMessage()
    assert len(list(cache_dir.glob("latency.sqlite.damaged-*"))) == 1


def test_unusable_cache_folder_is_one_line_before_work(tmp_path, capfd, monkeypatch):
    model = relu_chain(tmp_path / "m.onnx")
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("LMOPT_CACHE_DIR", str(blocker / "cache"))
    code, out, err = call(["optimize", model, "--target", "2", "-o", tmp_path / "o.onnx"] + QUICK, capfd)
    assert_one_line_error(code, out, err, "latency cache", "--no-cache")
    assert not (tmp_path / "o.onnx").exists()


# --------------------------------------------------------------------------- merge and target


def test_merge_with_nothing_to_merge_still_writes_the_output(tmp_path, capfd):
    model = relu_chain(tmp_path / "m.onnx")
    before = digest(model)
    out_path = tmp_path / "out.onnx"
    code, out, err = call(["merge", model, "-o", out_path], capfd)
    assert code == 0 and err == ""
    assert "nothing to merge" in out and f"wrote {out_path} as a copy of the input" in out
    assert digest(model) == before
    assert onnx.load(str(out_path)).graph == onnx.load(str(model)).graph
    x = np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)
    ref = ort.InferenceSession(str(model)).run(None, {"x": x})[0]
    np.testing.assert_allclose(ort.InferenceSession(str(out_path)).run(None, {"x": x})[0], ref, rtol=1e-5, atol=1e-6)


def test_merge_reports_every_output(tmp_path, capfd):
    model = linear_pair(tmp_path / "m.onnx", extra_output=True)
    code, out, err = call(["merge", model, "-o", tmp_path / "o.onnx", "--json", "--samples", "2"], capfd)
    assert code == 0 and err == ""
    report = json.loads(out)
    assert set(report["outputs"]) == {"y", "side"} and report["merged"]
    assert all(m["max_rel"] <= 1e-4 for m in report["outputs"].values())


def test_unreachable_target_is_an_error_unless_best_effort(tmp_path, capfd, cache_dir):
    model = relu_chain(tmp_path / "m.onnx")
    out_path = tmp_path / "o.onnx"
    code, out, err = call(["optimize", model, "--target", "1000x", "-o", out_path] + QUICK, capfd)
    assert_one_line_error(code, out, err, "out of reach", "--best-effort")
    assert not out_path.exists()
    code, out, err = call(["optimize", model, "--target", "1000x", "-o", out_path, "--best-effort"] + QUICK, capfd)
    assert code == 0 and out_path.exists()
    assert "out of reach" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("option", ["--rounds", "--corrections", "--calib-count"])
def test_a_negative_count_is_one_line_before_any_work(tmp_path, capfd, cache_dir, option):
    model = relu_chain(tmp_path / "m.onnx")
    code, out, err = call(["optimize", model, "--target", "1.2x", option, "-1", "--backend", "ort-cpu", "-q"], capfd)
    assert_one_line_error(code, out, err, option)
    assert not (tmp_path / "m.lmopt.onnx").exists()


# --------------------------------------------------------------------------- the model itself


def test_directory_as_model_is_named_a_directory(tmp_path, capfd):
    code, out, err = call(["inspect", tmp_path], capfd)
    assert_one_line_error(code, out, err, "is a directory")


def qdq_model() -> onnx.ModelProto:
    rng = np.random.default_rng(2)
    weight = rng.integers(-100, 100, (4, 3, 3, 3)).astype(np.int8)
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
             helper.make_node("DequantizeLinear", ["Wq", "ws", "wz"], ["W"]),
             helper.make_node("Conv", ["xd", "W"], ["y"], pads=[1, 1, 1, 1])]
    inits = [f32("s", 0.05), numpy_helper.from_array(np.int8(0), "z"), numpy_helper.from_array(weight, "Wq"),
             f32("ws", 0.01), numpy_helper.from_array(np.int8(0), "wz")]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * 4)], inits)
    return runtime_compatible(helper.make_model(graph, opset_imports=[helper.make_opsetid("", DEFAULT_OPSET)]))


@pytest.mark.parametrize("tool", ["merge", "optimize"])
def test_quantized_model_is_told_so(tmp_path, capfd, cache_dir, tool):
    path = tmp_path / "q.onnx"
    onnx.save(qdq_model(), str(path))
    argv = {"merge": ["merge", path, "-o", tmp_path / "o.onnx"],
            "optimize": ["optimize", path, "--target", "2", "-o", tmp_path / "o.onnx"] + QUICK}[tool]
    code, out, err = call(argv, capfd)
    assert_one_line_error(code, out, err, "quantized", "QuantizeLinear x1", "DequantizeLinear x2")
    assert not (tmp_path / "o.onnx").exists()


def test_inspect_reports_the_size_of_a_quantized_model(tmp_path, capfd):
    """Deep Compression's view of an int8 model: weight bytes by type and ops, and why no chains."""
    path = tmp_path / "q.onnx"
    onnx.save(qdq_model(), str(path))
    code, out, err = call(["inspect", path], capfd)
    assert code == 0 and not err, err
    assert "quantized model (DequantizeLinear x2, QuantizeLinear x1)" in out
    # 108 int8 weights and 2 int8 zero points; 2 float32 scales
    assert "weights: 110 B int8 + 8 B float32 (118 B)" in out
    assert "other ops: Conv x1" in out and "float models only" in out
    code, out, _ = call(["inspect", path, "--json"], capfd)
    info = json.loads(out)
    assert code == 0 and info["quantized"] == {"DequantizeLinear": 2, "QuantizeLinear": 1}
    assert info["weights"] == {"bytes": 118, "by_dtype": {"int8": 110, "float32": 8}}


# --------------------------------------------------------------------------- terminal manners


def test_onnxruntime_warnings_do_not_reach_stderr(tmp_path, capfd, monkeypatch):
    """Sessions lmopt does not configure itself (constant folding, timing) log at ONNX Runtime's
    default severity: the CLI raises it to errors. An unused initializer makes ORT warn."""
    import lmopt.cli.inspect as inspect_tool

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "warn",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * 4)],
                              [f32("unused", np.ones(3))])
    model = runtime_compatible(helper.make_model(graph, opset_imports=[helper.make_opsetid("", DEFAULT_OPSET)]))
    ort.set_default_logger_severity(2)  # warnings: what a fresh process starts with
    ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert "Removing initializer" in capfd.readouterr().err  # the probe does warn
    monkeypatch.setattr(inspect_tool, "run", lambda args: ort.InferenceSession(
        model.SerializeToString(), providers=["CPUExecutionProvider"]) and 0)
    code, out, err = call(["inspect", "unused.onnx"], capfd)
    assert code == 0 and err == "", err


def test_progress_is_a_line_per_stage_when_stderr_is_not_a_terminal(tmp_path, capfd, cache_dir):
    model = relu_chain(tmp_path / "m.onnx")
    argv = ["optimize", model, "--target", "1.01", "-o", tmp_path / "o.onnx", "--best-effort", "--backend", "ort-cpu",
            "--no-measure", "--calib-count", "2", "--eval-count", "2"]
    code, out, err = call(argv, capfd)
    assert code == 0
    lines = [line for line in err.splitlines() if line.startswith("lmopt: ")]
    assert any("scoring" in line for line in lines) and any("profiling" in line for line in lines)
    assert "\r" not in err and "it/s" not in err and len(err.splitlines()) <= 6


SLOW_SHUTDOWN = """
import atexit, sys, time
import lmopt.cli.inspect as tool
def slow(args):
    print("started", flush=True)
    time.sleep(30)
tool.run = slow
atexit.register(time.sleep, 3)  # like runtime threads winding down: a second Ctrl-C lands here
from lmopt.cli import main
sys.exit(main(["inspect", "unused.onnx"]))
"""


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_second_ctrl_c_exits_cleanly(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    # SIGINT back to its default in the child: a test run started in the background (`cmd &`)
    # inherits it ignored, and Python then installs no KeyboardInterrupt handler at all.
    proc = subprocess.Popen([sys.executable, "-c", SLOW_SHUTDOWN], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.stdout.readline().strip() == "started"
    proc.send_signal(signal.SIGINT)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130
    assert err.strip() == "lmopt inspect: interrupted", err


# --------------------------------------------------------------------------- shapes


def shapeless_dense(path: Path) -> Path:
    """MatMul -> com.microsoft Gelu (no onnx shape inference) -> MatMul + bias -> MatMul: onnx leaves
    the last layers without shapes, as on Paddle-exported OCR models."""
    rng = np.random.default_rng(4)
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["a"], name="mm1"),
             helper.make_node("Gelu", ["a"], ["g"], domain="com.microsoft", name="gelu"),
             helper.make_node("MatMul", ["g", "W2"], ["b"], name="mm2"),
             helper.make_node("Add", ["b", "B2"], ["c"], name="add2"),
             helper.make_node("MatMul", ["c", "W3"], ["y"], name="mm3")]
    inits = [f32("W1", rng.standard_normal((8, 16))), f32("W2", rng.standard_normal((16, 12))),
             f32("B2", rng.standard_normal(12)), f32("W3", rng.standard_normal((12, 6)))]
    graph = helper.make_graph(nodes, "shapeless", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * 3)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", DEFAULT_OPSET),
                                                    helper.make_opsetid("com.microsoft", 1)])
    onnx.save(runtime_compatible(model), str(path))
    return path


def test_shapeless_layers_get_shapes_from_onnxruntime(tmp_path, capfd):
    path = shapeless_dense(tmp_path / "m.onnx")
    code, out, err = call(["inspect", path], capfd)
    assert code == 0 and err == "", err
    assert "matmul 16->12" in out and "matmul 12->6" in out and "shapes from an onnxruntime run" in out
    code, out, err = call(["merge", path, "-o", tmp_path / "o.onnx", "--json"], capfd)
    assert code == 0 and err == "", err
    report = json.loads(out)
    assert [r["layers"] for r in report["merged"]] == [["mm2", "mm3"]] and report["verified"]


def test_conv_with_an_empty_output_is_named(tmp_path, capfd):
    """onnx shape inference accepts a 3x3 conv on a 2x2 map with stride-2 steps before it; ORT refuses it."""
    rng = np.random.default_rng(5)
    nodes = [helper.make_node("Conv", ["x", "W1"], ["a"], pads=[1, 1, 1, 1], strides=[2, 2], name="c1"),
             helper.make_node("Conv", ["a", "W2"], ["b"], strides=[2, 2], group=2, name="c2"),
             helper.make_node("Conv", ["b", "W3"], ["y"], strides=[2, 2], group=2, name="c3")]
    inits = [f32("W1", rng.standard_normal((8, 3, 5, 5))), f32("W2", rng.standard_normal((8, 4, 3, 3))),
             f32("W3", rng.standard_normal((8, 4, 3, 3)))]
    graph = helper.make_graph(nodes, "empty", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 12, 12])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * 4)], inits)
    path = tmp_path / "m.onnx"
    onnx.save(runtime_compatible(helper.make_model(graph, opset_imports=[helper.make_opsetid("", DEFAULT_OPSET)])),
              str(path))
    for argv in (["inspect", path], ["merge", path, "-o", tmp_path / "o.onnx"]):
        code, out, err = call(argv, capfd)
        assert_one_line_error(code, out, err, "Conv c3", "empty output", "2x2")
    assert not (tmp_path / "o.onnx").exists()
