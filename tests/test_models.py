"""The model zoo: valid ONNX that looks like a PyTorch export, runs, is deterministic and numerically sane."""
from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import models.build as build_script
from lmopt.onnxio import DEFAULT_OPSET, max_ir_version
from models import zoo
from models.pretrained import NAMES as PRETRAINED_NAMES
from models.pretrained import find_pretrained

SIZE = 32  # small, fast CNNs; the ViT stack keeps its 197 tokens

# name -> (Conv, BatchNormalization, Gemm) as torchvision has them
COUNTS = {
    "resnet18": (20, 20, 1),         # 1 + 8 blocks x 2 + 3 downsample
    "resnet34": (36, 36, 1),         # 1 + 16 x 2 + 3
    "resnet50": (53, 53, 1),         # 1 + 16 x 3 + 4 (layer1 too: 64 -> 256)
    "mobilenetv2_1.0": (52, 52, 1),  # 1 + 2 + 16 x 3 + 1
    "mobilenetv2_1.4": (52, 52, 1),
    "vgg19_bn": (16, 16, 3),
    "vit_tiny_mlp": (0, 0, 1),
}


def _size(name):
    return None if name == "vit_tiny_mlp" else SIZE


@pytest.fixture(scope="module")
def built():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = zoo.build(name, image_size=_size(name))
        return cache[name]

    return get


def _session(model):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _sample(name, seed=123, batch=1):
    shape = zoo.input_shape(name, image_size=_size(name), batch=batch)
    if name == "vit_tiny_mlp":
        return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    return zoo.smooth_images(batch, shape[-1], seed=seed)


def _ops(model):
    return Counter(n.op_type for n in model.graph.node)


def _shape(vi):
    return [d.dim_value for d in vi.type.tensor_type.shape.dim]


@pytest.mark.parametrize("name", zoo.NAMES)
def test_valid_runs_and_counts(name, built):
    model = built(name)
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version == DEFAULT_OPSET
    assert model.ir_version <= max_ir_version()
    assert [i.name for i in model.graph.input] == ["input"]
    assert [o.name for o in model.graph.output] == ["logits"]
    assert _shape(model.graph.input[0]) == list(zoo.input_shape(name, image_size=_size(name)))
    assert _shape(model.graph.output[0]) == [1, 1000]

    ops = _ops(model)
    assert (ops["Conv"], ops["BatchNormalization"], ops["Gemm"]) == COUNTS[name]

    out = _session(model).run(None, {"input": _sample(name)})[0]
    assert out.shape == (1, 1000)
    assert np.isfinite(out).all()
    assert 0.5 < float(out.std()) < 20.0  # neither exploding nor vanishing


@pytest.mark.parametrize("name", zoo.NAMES)
def test_deterministic(name, built):
    again = zoo.build(name, image_size=_size(name))
    assert again.SerializeToString() == built(name).SerializeToString()


def test_seed_changes_weights(built):
    other = zoo.build("mobilenetv2_1.0", image_size=SIZE, seed=1)
    base = built("mobilenetv2_1.0")
    a = numpy_helper.to_array(base.graph.initializer[0])
    b = numpy_helper.to_array(other.graph.initializer[0])
    assert a.shape == b.shape and not np.array_equal(a, b)


def test_batch_argument():
    model = zoo.build("mobilenetv2_1.0", image_size=SIZE, batch=2)
    assert _shape(model.graph.input[0]) == [2, 3, SIZE, SIZE]
    out = _session(model).run(None, {"input": _sample("mobilenetv2_1.0", batch=2)})[0]
    assert out.shape == (2, 1000)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown model"):
        zoo.build("resnet19")
    with pytest.raises(ValueError, match="at least"):
        zoo.build("resnet18", image_size=16)


@pytest.mark.parametrize("name", [n for n in zoo.NAMES if n != "vit_tiny_mlp"])
def test_conv_then_separate_batchnorm(name, built):
    model = built(name)
    producer = {o: n for n in model.graph.node for o in n.output}
    consumers = Counter(i for n in model.graph.node for i in n.input)
    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "BatchNormalization":
            conv = producer[node.input[0]]
            assert conv.op_type == "Conv"
            assert consumers[conv.output[0]] == 1
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            assert attrs["epsilon"] == pytest.approx(1e-5)
            assert attrs["momentum"] == pytest.approx(0.9)
            assert node.name.endswith("/BatchNormalization")
            var = numpy_helper.to_array(inits[node.input[4]])
            assert (var > 0).all() and not np.allclose(var, 1.0)  # calibrated from data
        if node.op_type == "Conv":
            # torchvision's VGG convs keep their bias; the others have none
            assert len(node.input) == (3 if name == "vgg19_bn" else 2)
        if node.op_type == "Gemm":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            assert attrs["transB"] == 1


def test_torch_like_names(built):
    model = built("resnet50")
    names = {n.name for n in model.graph.node}
    inits = {t.name for t in model.graph.initializer}
    assert len(names) == len(model.graph.node)  # unique
    assert {"/conv1/Conv", "/bn1/BatchNormalization", "/maxpool/MaxPool", "/layer1/layer1.0/conv1/Conv",
            "/layer1/layer1.0/relu_2/Relu", "/layer2/layer2.0/downsample/downsample.0/Conv", "/layer1/layer1.0/Add",
            "/avgpool/GlobalAveragePool", "/Flatten", "/fc/Gemm"} <= names
    assert {"conv1.weight", "bn1.running_var", "layer4.2.conv3.weight", "layer1.0.downsample.1.weight",
            "fc.weight", "fc.bias"} <= inits
    mnv2 = {n.name for n in built("mobilenetv2_1.0").graph.node}
    assert {"/features/features.0/features.0.0/Conv", "/features/features.0/features.0.2/Clip",
            "/features/features.2/conv/conv.1/conv.1.0/Conv", "/features/features.3/Add",
            "/classifier/classifier.1/Gemm"} <= mnv2


def test_resnet50_stride_on_3x3(built):
    model = built("resnet50")
    strides = {n.name: list(onnx.helper.get_attribute_value(a)) for n in model.graph.node
               for a in n.attribute if n.op_type == "Conv" and a.name == "strides"}
    assert strides["/layer2/layer2.0/conv1/Conv"] == [1, 1]
    assert strides["/layer2/layer2.0/conv2/Conv"] == [2, 2]
    assert strides["/layer2/layer2.0/downsample/downsample.0/Conv"] == [2, 2]
    assert _ops(model)["Add"] == 16


@pytest.mark.parametrize("name,first,last,adds", [("mobilenetv2_1.0", 32, 1280, 10), ("mobilenetv2_1.4", 48, 1792, 10)])
def test_mobilenetv2_structure(name, first, last, adds, built):
    model = built(name)
    inits = {t.name: t for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    assert inits["features.0.0.weight"].dims[0] == first
    assert list(inits["classifier.1.weight"].dims) == [1000, last]
    ops = _ops(model)
    assert ops["Clip"] == 35 and ops["Add"] == adds
    groups = [a.i for n in model.graph.node if n.op_type == "Conv" for a in n.attribute if a.name == "group"]
    assert sum(g > 1 for g in groups) == 17  # one depthwise conv per inverted residual
    for node in model.graph.node:
        if node.op_type == "Clip":  # ReLU6 with min/max as constant inputs (opset >= 11 style)
            assert len(node.input) == 3
            lo, hi = (numpy_helper.to_array(producer[i].attribute[0].t) for i in node.input[1:])
            assert producer[node.input[1]].op_type == "Constant" and (float(lo), float(hi)) == (0.0, 6.0)


def test_vgg_classifier(built):
    model = built("vgg19_bn")
    chain = [n.op_type for n in model.graph.node]
    tail = chain[chain.index("Flatten"):]
    assert [t for t in tail if t != "Constant"] == ["Flatten", "Gemm", "Relu", "Dropout", "Gemm", "Relu", "Dropout",
                                                    "Gemm"]
    assert _ops(model)["MaxPool"] == 5
    inits = {t.name: t for t in model.graph.initializer}
    assert list(inits["classifier.0.weight"].dims) == [4096, 512]  # 512 x 1 x 1 at 32 (25088 at 224)


def test_vit_mlp_structure(built):
    model = built("vit_tiny_mlp")
    ops = _ops(model)
    assert ops["LayerNormalization"] == 13 and ops["MatMul"] == 24 and ops["Erf"] == 12
    assert ops["Gather"] == 1 and ops["Gemm"] == 1
    inits = {t.name: t for t in model.graph.initializer}
    assert list(inits["blocks.0.mlp.fc1.weight_t"].dims) == [192, 768]
    assert list(inits["blocks.11.mlp.fc2.weight_t"].dims) == [768, 192]
    erf = next(n for n in model.graph.node if n.op_type == "Erf")
    assert erf.name == "/blocks/blocks.0/mlp/act/Erf"


@pytest.mark.parametrize("name", ["resnet34", "mobilenetv2_1.0", "vit_tiny_mlp"])
def test_activations_cut_about_half(name, built):
    model = onnx.ModelProto()
    model.CopyFrom(built(name))
    acts = [n.output[0] for n in model.graph.node if n.op_type in ("Relu", "Clip", "Erf")]
    model.graph.output.extend(onnx.helper.make_tensor_value_info(a, onnx.TensorProto.FLOAT, None) for a in acts)
    outs = _session(model).run(None, {"input": _sample(name, seed=7)})[1:]
    cut = np.array([float((o <= 0).mean()) for o in outs])
    assert np.median(cut) == pytest.approx(0.5, abs=0.05)
    assert cut.min() > 0.1 and cut.max() < 0.9


def test_logits_depend_on_input(built):
    sess = _session(built("resnet18"))
    logits = np.concatenate([sess.run(None, {"input": _sample("resnet18", seed=s)})[0] for s in range(6)])
    assert logits.std(axis=0).mean() > 0.5  # not one fixed pattern for every image
    assert len(set(logits.argmax(axis=1).tolist())) >= 3


def test_build_script(tmp_path):
    path, stats = build_script.write_model("mobilenetv2_1.0", tmp_path, image_size=SIZE)
    assert path == tmp_path / "mobilenetv2_1.0.onnx" and stats["params"] > 3_000_000
    before = path.stat().st_mtime_ns
    assert build_script.write_model("mobilenetv2_1.0", tmp_path, image_size=SIZE)[1] is None  # kept
    assert build_script.ensure_model("mobilenetv2_1.0", tmp_path) == path
    assert path.stat().st_mtime_ns == before
    loaded = onnx.load(str(path))
    assert loaded.ir_version <= max_ir_version()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_build_script_unknown_name():
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, str(root / "models" / "build.py"), "resnet19"],
                          capture_output=True, text=True, cwd=root)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown model 'resnet19'" in lines[0]


def test_find_pretrained():
    with pytest.raises(ValueError):
        find_pretrained("nope")
    for name in PRETRAINED_NAMES:
        path = find_pretrained(name)
        if path is None:
            continue  # optional extra not installed
        assert path.is_file() and path.suffix == ".onnx"
        onnx.checker.check_model(str(path))
