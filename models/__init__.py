"""Models for the quick start, the tests and the benchmarks.

``models.zoo`` builds torchvision-style CNNs and a ViT-style MLP stack as PyTorch would export
them (no torch, no downloads); ``models.build`` writes them to ``models/<name>.onnx``;
``models.pretrained`` finds the Paddle-exported classifiers that ship inside PyPI wheels.
"""
from __future__ import annotations

from .pretrained import find_pretrained
from .zoo import NAMES, input_shape
from .zoo import build as build_model  # not `build`: that name is the models.build script module


def ensure_model(name: str, out_dir=None):
    """Path of ``<out_dir>/<name>.onnx`` (default: this folder), building it first if missing."""
    from .build import ensure_model as _ensure_model

    return _ensure_model(name, out_dir)


__all__ = ["NAMES", "build_model", "input_shape", "ensure_model", "find_pretrained"]
