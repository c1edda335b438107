"""The command line on bad and good input: one-line errors, untouched inputs, no stray outputs.

`lmopt.cli.main([...])` returns the exit code. Output is captured at the file-descriptor level
(capfd), so anything onnxruntime's C++ logger or a library prints to stderr counts as well.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from lmopt.cli import main
from lmopt.loader import canonicalise
from lmopt.onnxio import max_ir_version
from lmopt.passes.activations import without_activations
from models import zoo

SIZE = 32


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def call(argv, capfd):
    """(exit code, stdout, stderr); an argparse exit counts as a return."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse reports usage errors by exiting
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capfd.readouterr()
    return code, out, err


def assert_one_line_error(code, out, err, *needles):
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert "Traceback" not in err + out
    assert lines[0].startswith("lmopt ")
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"


def run_model(model_or_path, x):
    model = onnx.load(str(model_or_path)) if not isinstance(model_or_path, onnx.ModelProto) else model_or_path
    model.ir_version = min(model.ir_version, max_ir_version())
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


@functools.lru_cache(maxsize=None)
def zoo_bytes(name: str) -> bytes:
    return zoo.build(name, image_size=SIZE).SerializeToString()


def write_zoo(tmp_path, name="resnet18"):
    path = tmp_path / f"{name}.onnx"
    path.write_bytes(zoo_bytes(name))
    return path


def tiny_model(opset=17, op="Relu", domain="", dims=(1, 3, 8, 8)):
    node = helper.make_node(op, ["x"], ["y"], domain=domain)
    graph = helper.make_graph([node], "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(dims))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(dims))])
    imports = [helper.make_opsetid("", opset)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    model = helper.make_model(graph, opset_imports=imports)
    model.ir_version = 8
    return model


def dynamic_conv_model():
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Conv", ["r", "W2"], ["y"])]
    graph = helper.make_graph(nodes, "dyn",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, "h", "w"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, "h", "w"])],
                              [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "W"),
                               numpy_helper.from_array(rng.standard_normal((4, 4, 1, 1)).astype(np.float32), "W2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


# --------------------------------------------------------------------------- bad model files


def _bad_files(tmp_path):
    good = zoo_bytes("resnet18")
    files = {
        "not-onnx": (b"this is a text file, not a protobuf\n" * 20, "not a readable ONNX model"),
        "truncated": (good[: len(good) // 3], "not a readable ONNX model"),
        "empty": (b"", "not a readable ONNX model"),
        "opset-99": (tiny_model(opset=99).SerializeToString(), "opset 99"),
        "unknown-op": (tiny_model(op="FancyNewOp").SerializeToString(), "FancyNewOp"),
        "unknown-domain": (tiny_model(op="Foo", domain="com.example").SerializeToString(), "com.example"),
        "dynamic-dims": (dynamic_conv_model().SerializeToString(), "--input-shape"),
    }
    paths = {}
    for label, (data, needle) in files.items():
        path = tmp_path / f"{label}.onnx"
        path.write_bytes(data)
        paths[label] = (path, needle)
    return paths


BAD = ["not-onnx", "truncated", "empty", "opset-99", "unknown-op", "unknown-domain", "dynamic-dims"]
TOOLS = {
    "inspect": lambda src, out: ["inspect", src],
    "inspect-json": lambda src, out: ["inspect", src, "--json"],
    "merge": lambda src, out: ["merge", src, "-o", out],
    "optimize": lambda src, out: ["optimize", src, "--target", "2", "-o", out, "--backend", "ort-cpu",
                                  "--no-cache", "-q", "--no-measure"],
}


@pytest.mark.parametrize("tool", sorted(TOOLS))
@pytest.mark.parametrize("label", BAD)
def test_bad_model_is_one_line_error_and_touches_nothing(tmp_path, capfd, label, tool):
    path, needle = _bad_files(tmp_path)[label]
    before = digest(path)
    out_path = tmp_path / "out" / "result.onnx"
    code, out, err = call(TOOLS[tool](path, out_path), capfd)
    assert_one_line_error(code, out, err, needle)
    assert digest(path) == before
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == sorted(f"{b}.onnx" for b in BAD)


def test_missing_model_file(tmp_path, capfd):
    code, out, err = call(["inspect", tmp_path / "nope.onnx"], capfd)
    assert_one_line_error(code, out, err, "no such file")


def test_dynamic_dims_work_with_input_shape(tmp_path, capfd):
    path = tmp_path / "dyn.onnx"
    onnx.save(dynamic_conv_model(), str(path))
    code, out, err = call(["inspect", path, "--json", "--input-shape", "x:1,3,16,16"], capfd)
    assert code == 0 and err == ""
    info = json.loads(out)
    assert [c["layers"] for c in info["chains"]] == [2]
    code, out, err = call(["inspect", path, "--input-shape", "x:1,3,16"], capfd)
    assert_one_line_error(code, out, err, "rank")


def test_nothing_to_merge(tmp_path, capfd):
    path = write_zoo(tmp_path)  # ResNet-18: a ReLU after every conv, so no run of two linear layers
    before = digest(path)
    out_path = tmp_path / "merged.onnx"
    code, out, err = call(["merge", path, "-o", out_path], capfd)
    assert code == 0
    assert err == ""
    assert out.strip().count("\n") == 0 and "nothing to merge" in out and "wrote" in out
    assert digest(path) == before
    onnx.checker.check_model(onnx.load(str(out_path)))  # `merge && deploy out.onnx` still works


def test_merge_refuses_to_overwrite_its_input(tmp_path, capfd):
    path = write_zoo(tmp_path, "mobilenetv2_1.0")
    before = digest(path)
    code, out, err = call(["merge", path, "-o", tmp_path / "." / path.name], capfd)
    assert_one_line_error(code, out, err, "overwrite")
    code, out, err = call(["merge", path, "-o", tmp_path / "m.onnx", "--samples", "0"], capfd)
    assert_one_line_error(code, out, err, "--samples")
    assert digest(path) == before and not (tmp_path / "m.onnx").exists()


# --------------------------------------------------------------------------- merge that works


def test_merge_exact_writes_a_verified_model(tmp_path, capfd):
    path = write_zoo(tmp_path, "mobilenetv2_1.0")  # project 1x1 -> next expand 1x1 runs merge exactly
    before = digest(path)
    out_path = tmp_path / "merged.onnx"
    code, out, err = call(["merge", path, "-o", out_path, "--json", "--samples", "2"], capfd)
    assert code == 0 and err == ""
    report = json.loads(out)
    assert report["merged"] and all(r["exact"] for r in report["merged"])
    assert report["verified"] and report["verification"]["max_rel"] <= 1e-4
    assert report["after"]["ops"]["Conv"] < report["before"]["ops"]["Conv"]
    merged = onnx.load(str(out_path))
    onnx.checker.check_model(merged)
    assert merged.ir_version <= max_ir_version()
    x = np.random.default_rng(5).standard_normal((1, 3, SIZE, SIZE)).astype(np.float32)
    ref = run_model(path, x)
    got = run_model(merged, x)
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
    assert digest(path) == before


def test_merge_allow_inexact_on_activation_free_resnet(tmp_path, capfd):
    model = canonicalise(zoo.build("resnet18", image_size=SIZE))[0]
    path = tmp_path / "noact.onnx"
    onnx.save(without_activations(model), str(path))
    out_path = tmp_path / "merged.onnx"
    code, out, err = call(["merge", path, "-o", out_path], capfd)  # every run is inexact: left alone
    assert code == 0 and err == "" and "--allow-inexact" in out and out_path.exists()
    assert [n.op_type for n in onnx.load(str(out_path)).graph.node].count("Conv") == 20
    code, out, err = call(["merge", path, "-o", out_path, "--allow-inexact", "--json", "--samples", "2"], capfd)
    assert code == 0 and err == ""
    report = json.loads(out)
    assert len(report["merged"]) == 8 and not any(r["exact"] for r in report["merged"])
    assert math.isfinite(report["verification"]["max_rel"]) and report["verification"]["max_rel"] > 0
    merged = onnx.load(str(out_path))
    onnx.checker.check_model(merged)
    assert report["after"]["ops"]["Conv"] == 1 + 8  # stem + one conv per basic block (projections folded)
    assert report["after"]["ops"].get("Add", 0) == 0  # all 8 shortcuts (3 projections) folded
    x = np.random.default_rng(6).standard_normal((1, 3, SIZE, SIZE)).astype(np.float32)
    assert np.isfinite(run_model(merged, x)).all()


# --------------------------------------------------------------------------- optimize arguments


@pytest.mark.parametrize("args,needle", [
    (["--target", "0.5"], "--target"),
    (["--target", "abc"], "--target"),
    (["--target", "2", "--calib", "{tmp}/missing_dir"], "no such file"),
    (["--target", "2", "--calib", "{tmp}/wrong.npy"], "do not match"),
    (["--target", "2", "--calib", "{tmp}/imgs", "--mean", "0.5,x"], "--mean"),
])
def test_optimize_bad_arguments(tmp_path, capfd, args, needle):
    path = write_zoo(tmp_path)
    np.save(tmp_path / "wrong.npy", np.zeros((4, 3, 16, 16), np.float32))
    (tmp_path / "imgs").mkdir()
    before = digest(path)
    out_path = tmp_path / "out.onnx"
    argv = ["optimize", path, "-o", out_path, "--backend", "ort-cpu", "--no-cache", "-q", "--no-measure"]
    argv += [a.replace("{tmp}", str(tmp_path)) for a in args]
    code, out, err = call(argv, capfd)
    assert_one_line_error(code, out, err, needle)
    assert digest(path) == before and not out_path.exists()


def test_unknown_backend_is_one_line_and_writes_nothing(tmp_path, capfd):
    path = write_zoo(tmp_path)
    before = digest(path)
    code, out, err = call(["optimize", path, "--target", "2", "--backend", "tpu-9000", "-o", tmp_path / "o.onnx"],
                          capfd)
    assert_one_line_error(code, out, err, "tpu-9000")
    assert digest(path) == before and not (tmp_path / "o.onnx").exists()


def test_bad_int8_weight_bits_is_one_line_and_writes_nothing(tmp_path, capfd, monkeypatch):
    monkeypatch.setenv("LMOPT_INT8_WEIGHT_BITS", "4")
    path = write_zoo(tmp_path)
    before = digest(path)
    code, out, err = call(["optimize", path, "--target", "2", "--precision", "int8", "--backend", "ort-cpu",
                           "--no-cache", "-q", "--no-measure", "-o", tmp_path / "o.onnx"], capfd)
    assert_one_line_error(code, out, err, "LMOPT_INT8_WEIGHT_BITS must be 7 or 8")
    assert digest(path) == before and not (tmp_path / "o.onnx").exists()


# --------------------------------------------------------------------------- inspect


def test_inspect_json_resnet18(tmp_path, capfd):
    path = write_zoo(tmp_path)
    code, out, err = call(["inspect", path, "--json"], capfd)
    assert code == 0 and err == ""
    info = json.loads(out)
    assert [(c["kind"], c["layers"]) for c in info["chains"]] == [("conv", 1), ("conv", 16), ("dense", 1)]
    assert info["residual_spans"] == 8
    assert info["candidates"] > 0 and info["blocks"] > 0
    assert info["candidates"] == sum(c["candidates"] for c in info["chains"])
    assert info["activations"] == {"relu": 17}
    assert info["canonicalisation"]["batchnorm_folded"] == 20
    body = info["chains"][1]["units"]
    assert body[0]["what"] == "conv3x3 s1 64->64" and body[0]["activation"] == "relu"
    assert [u.get("shortcut") for u in body if "shortcut" in u].count("projection") == 3
    assert body[5]["residual_from"] == 4 and body[5]["shortcut"] == "projection"


def test_inspect_text_prints_the_chain_table(tmp_path, capfd):
    path = write_zoo(tmp_path)
    code, out, err = call(["inspect", path], capfd)
    assert code == 0 and err == ""
    assert "3 chains, 8 residual spans" in out
    assert "chain 1 (conv, 16 layers" in out
    rows = [line for line in out.splitlines() if line.strip().startswith(("1 ", "2 ", "6 "))]
    assert any("conv3x3 s1 64->64" in r and "relu" in r for r in rows)
    assert any("identity shortcut from position 0" in line for line in out.splitlines())
    assert any("projection shortcut from position 4" in line for line in out.splitlines())
    assert "BatchNormalization folded" in out


def test_inspect_mobilenet_and_vit(tmp_path, capfd):
    code, out, err = call(["inspect", write_zoo(tmp_path, "mobilenetv2_1.0"), "--json"], capfd)
    info = json.loads(out)
    assert code == 0 and info["residual_spans"] == 10 and info["activations"] == {"relu6": 35}
    code, out, err = call(["inspect", write_zoo(tmp_path, "vit_tiny_mlp"), "--json"], capfd)
    info = json.loads(out)
    assert code == 0 and info["activations"] == {"gelu": 12}
    assert sum(1 for c in info["chains"] if c["layers"] == 2) == 12
    assert all(u.get("residual_from") == "outside" for c in info["chains"] if c["layers"] == 2
               for u in c["units"][1:])


# --------------------------------------------------------------------------- dynamic batch


def batch_model(reshape_to=None):
    """x (N, 3, H, W) -> Conv 1x1 -> Conv 1x1 [-> Reshape to a fixed shape, which bakes the batch in]."""
    rng = np.random.default_rng(1)
    nodes = [helper.make_node("Conv", ["x", "W1"], ["a"]), helper.make_node("Conv", ["a", "W2"], ["c"])]
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 1, 1)).astype(np.float32), "W1"),
             numpy_helper.from_array(rng.standard_normal((5, 4, 1, 1)).astype(np.float32), "W2")]
    if reshape_to is None:
        nodes.append(helper.make_node("Identity", ["c"], ["y"]))
        out_dims = ["N", 5, "H", "W"]
    else:
        inits.append(numpy_helper.from_array(np.array(reshape_to, np.int64), "shape"))
        nodes.append(helper.make_node("Reshape", ["c", "shape"], ["y"]))
        out_dims = [None] * len(reshape_to)
    graph = helper.make_graph(nodes, "batch",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_dims)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_merge_keeps_the_dynamic_batch(tmp_path, capfd):
    path = tmp_path / "dyn.onnx"
    onnx.save(batch_model(), str(path))
    out_path = tmp_path / "merged.onnx"
    code, out, err = call(["merge", path, "-o", out_path, "--input-shape", "x:1,3,8,8"], capfd)
    assert code == 0 and err == "" and "dynamic batch 'N' kept" in out
    merged = onnx.load(str(out_path))
    assert merged.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    assert [n.op_type for n in merged.graph.node].count("Conv") == 1
    x = np.random.default_rng(2).standard_normal((3, 3, 8, 8)).astype(np.float32)  # another batch
    ref = run_model(batch_model(), x)
    assert np.abs(run_model(merged, x) - ref).max() <= 1e-4 * np.abs(ref).max()


def test_a_baked_in_batch_stays_static_and_says_so(tmp_path, capfd):
    path = tmp_path / "baked.onnx"
    onnx.save(batch_model(reshape_to=[1, -1]), str(path))
    out_path = tmp_path / "merged.onnx"
    code, out, err = call(["merge", path, "-o", out_path, "--input-shape", "x:1,3,8,8", "--json"], capfd)
    assert code == 0 and err == ""
    assert json.loads(out)["batch"].startswith("batch kept at 1")
    assert onnx.load(str(out_path)).graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1


# --------------------------------------------------------------------------- weight bytes


def gemm_model(k=1024, n=512, extra=()):
    """x (4, k) -> Gemm transB=1 with a (n, k) float32 weight, no bias."""
    weight = np.random.default_rng(3).standard_normal((n, k)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("Gemm", ["x", "w"], ["y"], transB=1), *extra], "gemm",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, n])],
                              [numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def quantize_qdq(model, tmp_path):
    """onnxruntime's static QDQ quantization, per-channel int8 weights and int8 activations."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(4)
            self.feeds = iter([{"x": rng.standard_normal((4, 1024)).astype(np.float32)} for _ in range(4)])

        def get_next(self):
            return next(self.feeds, None)

    onnx.save(model, str(tmp_path / "float.onnx"))
    quantize_static(str(tmp_path / "float.onnx"), str(tmp_path / "int8.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
    return onnx.load(str(tmp_path / "int8.onnx"))


def test_weight_bytes_count_each_type_at_its_size(tmp_path):
    from lmopt.report import format_op_table, op_table, weight_bytes

    constants = [helper.make_node("Constant", [], ["shape"], value=numpy_helper.from_array(np.array([2, 3, 4]))),
                 helper.make_node("Constant", [], ["alpha"], value_floats=[0.5, 1.5])]
    model = gemm_model(extra=constants)
    assert weight_bytes(model) == {"float32": 4 * 512 * 1024 + 4 * 2, "int64": 8 * 3}
    table = op_table(model)
    assert table["weight_bytes"] == 4 * 512 * 1024 + 8 + 24
    assert {"nodes", "ops", "params", "size_mb"} <= set(table) and table["params"] == 512 * 1024

    quantized = quantize_qdq(gemm_model(), tmp_path)
    # int8: the weight (1 byte per element), its 512 per-channel zero points, the zero points of x and y;
    # float32: the weight's 512 per-channel scales, the scales of x and y.
    assert weight_bytes(quantized) == {"int8": 512 * 1024 + 512 + 2, "float32": 4 * (512 + 2)}
    text = format_op_table(op_table(gemm_model()), op_table(quantized))
    (row,) = [line.split() for line in text.splitlines() if line.strip().startswith("weights MB")]
    assert row[2:] == ["2.0", "0.5"]


def test_weights_text():
    from lmopt.cli.inspect import weights_text

    assert weights_text({"float32": 46_796_448}) == "44.6 MB float32"
    assert weights_text({"int8": 11_744_051, "float32": 104_858}) == "11.2 MB int8 + 0.1 MB float32 (11.3 MB)"
    assert weights_text({"float32": 128, "int64": 2048}) == "128 B float32 + 2.0 KB int64 (2.1 KB)"
    assert weights_text({}) == "none"


def test_inspect_prints_the_weight_bytes_of_the_file(tmp_path, capfd):
    path = tmp_path / "baked.onnx"
    onnx.save(batch_model(reshape_to=[1, -1]), str(path))  # W1 (4, 3, 1, 1), W2 (5, 4, 1, 1), shape [1, -1]
    code, out, err = call(["inspect", path, "--input-shape", "x:1,3,8,8"], capfd)
    assert code == 0 and err == ""
    assert "weights: 128 B float32 + 16 B int64 (144 B)" in out
    code, out, err = call(["inspect", path, "--input-shape", "x:1,3,8,8", "--json"], capfd)
    assert json.loads(out)["weights"] == {"bytes": 144, "by_dtype": {"float32": 128, "int64": 16}}

    path = write_zoo(tmp_path)  # ResNet-18: the file's BatchNormalization weights count (inspect folds them)
    code, out, err = call(["inspect", path, "--json"], capfd)
    model = onnx.load(str(path))
    assert json.loads(out)["weights"]["bytes"] == sum(4 * math.prod(t.dims) for t in model.graph.initializer)
