"""INT8 post-training quantization through onnxruntime.quantization: static QDQ, per-channel int8
weights, uint8 activations. One place for the settings, so that every block lmopt times at int8 and
every model it writes at int8 are quantized alike.
"""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx

from .errors import LmoptError, one_line
from .graph import copy_model
from .onnxio import runtime_compatible
from .runtime import ort_log_severity_at

logger = logging.getLogger(__name__)

CALIBRATION_COUNT = 32  # samples that set the activation ranges (evenly spaced over the given feeds)
# 7 or 8: the weight bits wanted whatever this CPU is (for a model deployed on another CPU than lmopt runs on)
WEIGHT_BITS_VARIABLE = "LMOPT_INT8_WEIGHT_BITS"


def cpu_lacks_vnni(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """True on an x86 CPU with AVX2 and no VNNI (read from Linux's `cpuinfo`); False elsewhere,
    and where the flags cannot be read."""
    try:
        with open(cpuinfo) as info:
            flags = next((line for line in info if line.startswith("flags")), "")
    except OSError:
        return False
    return " avx2" in flags and "vnni" not in flags


def weight_bits() -> int:
    """7 or 8: as LMOPT_INT8_WEIGHT_BITS says where it is set, else 7 on an x86 CPU without VNNI."""
    asked = os.environ.get(WEIGHT_BITS_VARIABLE, "").strip()
    if not asked:
        return 7 if cpu_lacks_vnni() else 8
    if asked not in ("7", "8"):
        raise LmoptError(f"{WEIGHT_BITS_VARIABLE} must be 7 or 8, not {asked!r}")
    return int(asked)


def settings() -> dict:
    """quantize_static's options: QDQ format, per-channel int8 weights, uint8 activations (U8S8: on x86
    onnxruntime's fast int8 kernels take unsigned activations; S8S8 measured no faster than fp32 on
    EfficientNet-Lite0 here, U8S8 1.63x). On an x86 CPU without VNNI the weights take 7 bits
    (reduce_range), as onnxruntime's quantization docs advise: there its U8S8 kernels sum pairs of
    products in 16 bits (VPMADDUBSW), which 8-bit weights can saturate (bench/RESULTS.md). The CPU is
    the one lmopt runs on, which is the one it times plans on; LMOPT_INT8_WEIGHT_BITS overrides it."""
    from onnxruntime.quantization import QuantFormat, QuantType

    return {"quant_format": QuantFormat.QDQ, "per_channel": True, "activation_type": QuantType.QUInt8,
            "weight_type": QuantType.QInt8, "reduce_range": weight_bits() == 7}


def describe() -> str:
    """The settings in words, for the report."""
    why = (f"as {WEIGHT_BITS_VARIABLE} asks" if os.environ.get(WEIGHT_BITS_VARIABLE, "").strip() else
           "this x86 CPU has no VNNI, where 8-bit weights can saturate onnxruntime's 16-bit sums")
    weights = f" in 7 bits (reduce_range: {why})" if weight_bits() == 7 else ""
    return f"static QDQ (onnxruntime.quantization), uint8 activations, per-channel int8 weights{weights}"


class _Reader:
    """onnxruntime.quantization's CalibrationDataReader protocol over a list of feeds."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self._items = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._items, None)


class _QuantizerNoise(logging.Filter):
    """onnxruntime.quantization logs to the root logger: at every call it advises pre-processing (lmopt's
    models are canonical already, shapes inferred and constants folded, and its symbolic shape
    inference costs seconds per block, so blocks and final models are quantized without it, alike),
    and at INFO one line per weight channel whose scale it raised so that the bias stays
    representable (hundreds on a real CNN; counted here and said once)."""

    def __init__(self):
        super().__init__()
        self.raised_scales = 0

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith("Increased scale["):
            self.raised_scales += 1
            return False
        return "pre-processing" not in message


def quantize_int8(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]) -> onnx.ModelProto:
    """`model` quantized to INT8 QDQ with activation ranges from `feeds` (the model is not changed)."""
    from onnxruntime.quantization import quantize_static

    if not feeds:
        raise LmoptError("INT8 quantization needs calibration samples")
    picks = np.linspace(0, len(feeds) - 1, min(CALIBRATION_COUNT, len(feeds))).round().astype(int)
    with tempfile.TemporaryDirectory(prefix="lmopt-int8-") as folder:
        source, target = Path(folder) / "fp32.onnx", Path(folder) / "int8.onnx"
        onnx.save(runtime_compatible(copy_model(model)), source)
        noise = _QuantizerNoise()
        logging.getLogger().addFilter(noise)
        # Its calibration sessions use ORT's default logger, which warns of every initializer they
        # find unused ("Removing initializer ..."): noise to a user, not an error.
        try:
            with ort_log_severity_at(3):
                quantize_static(str(source), str(target), _Reader([feeds[i] for i in picks]), **settings())
        except Exception as exc:  # noqa: BLE001 - onnxruntime.quantization raises plain exceptions
            raise LmoptError(f"INT8 quantization failed: {one_line(exc, type(exc).__name__)}") from None
        finally:
            logging.getLogger().removeFilter(noise)
        if noise.raised_scales:
            logger.debug("lmopt: onnxruntime.quantization raised %d weight channels' scales so that their biases "
                         "stay representable in int32", noise.raised_scales)
        quantized = onnx.load(str(target))
    return quantized
