"""ONNX Runtime on the CPU, configured as deployed: all graph optimisations, fixed threads.

intra-op threads are fixed (default: every physical core this process may use), inter-op 1,
sequential execution, so repeated runs are comparable; wall time of session.run is the latency.
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import onnx

from ..errors import LmoptError, one_line
from ..graph import copy_model
from ..inputs import random_feeds
from ..onnxio import runtime_compatible
from .base import LatencyBackend, Session, cpu_name, physical_cores


class _OrtSession(Session):
    """An onnxruntime CPU session and its feeds; each run timed by the host clock."""

    def __init__(self, session: Any, feeds: dict[str, np.ndarray]):
        self.session = session
        self.feeds = feeds
        self.outputs = [o.name for o in session.get_outputs()]

    def run_timed(self, count: int) -> list[float]:
        times = []
        run, outputs, feeds = self.session.run, self.outputs, self.feeds
        for _ in range(count):
            start = time.perf_counter()
            run(outputs, feeds)
            times.append((time.perf_counter() - start) * 1000.0)
        return times


def session_options(threads: int) -> Any:
    """onnxruntime.SessionOptions for timing: `threads` intra-op threads, sequential, all optimisations."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only
    # Idle worker threads spin by default; with two sessions alive (interleaved timing of the
    # original and the optimized model) the spinning pool of one steals the cores of the other
    # and the medians swing by 2x. Without spinning both are timed alike.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def ort_bytes(model: onnx.ModelProto) -> bytes:
    """The model serialised at an IR version the installed onnxruntime accepts (the caller's copy is untouched)."""
    return runtime_compatible(copy_model(model)).SerializeToString()


class OrtCpuBackend(LatencyBackend):
    """--backend ort-cpu: onnxruntime's CPUExecutionProvider; fp32, or int8 (each model is timed after
    static QDQ quantization with lmopt.quantize's settings: random calibration inputs set its scales,
    which do not change its speed)."""

    name = "ort-cpu"
    precisions = ("fp32", "int8")
    times_symbolic_inputs = True

    def __init__(self, threads: int | None = None, **options: Any):
        super().__init__(**options)
        self.threads = int(threads) if threads else physical_cores()
        if self.threads < 1:
            raise LmoptError("threads must be at least 1")

    @classmethod
    def available(cls) -> str | None:
        try:
            import onnxruntime  # noqa: F401
        except ImportError as exc:
            return f"onnxruntime is not installed (pip install onnxruntime): {exc}"
        return None

    def cache_key(self) -> dict:
        import onnxruntime as ort

        from ..quantize import weight_bits

        # 7-bit weights time alike, but the key says what was timed (see quantize.settings)
        return self._base_key(cpu_name(), f"onnxruntime {ort.__version__}", threads=self.threads, spinning="off",
                              int8_weight_bits=weight_bits() if self.precision == "int8" else None)

    def _open(self, model: onnx.ModelProto) -> Session:
        import onnxruntime as ort

        feeds = random_feeds(model, 1)[0]
        if self.precision == "int8":
            from ..quantize import quantize_int8

            model = quantize_int8(model, random_feeds(model, 4, seed=1))
        try:
            session = ort.InferenceSession(ort_bytes(model), session_options(self.threads),
                                           providers=["CPUExecutionProvider"])
        # onnxruntime's errors (Fail, InvalidGraph, InvalidArgument, ...) derive from Exception only.
        except Exception as exc:  # noqa: BLE001
            raise LmoptError(f"onnxruntime cannot load the model: {one_line(exc)[:300]}") from None
        return _OrtSession(session, feeds)
