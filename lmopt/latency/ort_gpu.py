"""--backend ort-cuda / ort-trt: onnxruntime-gpu's CUDA and TensorRT execution providers.

Inputs and outputs are bound on the GPU once (IOBinding), so a run times the model, not the
host<->device copies; the latency is the wall time of run_with_iobinding, which returns after
the GPU work has finished. fp16 converts the model to float16 (lmopt.latency.fp16) for
ort-cuda; ort-trt passes trt_fp16_enable to TensorRT instead.
"""
from __future__ import annotations

import time

import onnx

from ..errors import LmoptError
from .base import LatencyBackend, Session, one_line, random_inputs
from .cache import default_cache_dir
from .fp16 import convert_to_fp16
from .ort_cpu import ort_bytes


def _provider_status(provider: str) -> str | None:
    try:
        import onnxruntime as ort
    except ImportError:
        return "onnxruntime-gpu is not installed (pip install onnxruntime-gpu)"
    providers = ort.get_available_providers()
    if provider not in providers:
        return (f"onnxruntime-gpu is not installed: onnxruntime {ort.__version__} offers only "
                f"{', '.join(providers)} (pip uninstall onnxruntime; pip install onnxruntime-gpu)")
    return None


class _IoBindingSession(Session):
    def __init__(self, session, feeds, precision_np):
        import onnxruntime as ort

        self.session = session
        self.binding = session.io_binding()
        self._keep = []
        for name, array in feeds.items():
            if array.dtype.kind == "f" and precision_np is not None:
                array = array.astype(precision_np)
            value = ort.OrtValue.ortvalue_from_numpy(array, "cuda", 0)
            self._keep.append(value)
            self.binding.bind_ortvalue_input(name, value)
        for output in session.get_outputs():
            self.binding.bind_output(output.name, "cuda")
        session.run_with_iobinding(self.binding)  # allocate outputs once

    def run_timed(self, count: int) -> list[float]:
        times = []
        run, binding = self.session.run_with_iobinding, self.binding
        for _ in range(count):
            start = time.perf_counter()
            run(binding)
            times.append((time.perf_counter() - start) * 1000.0)
        return times


class _OrtGpuBackend(LatencyBackend):
    provider = ""

    def __init__(self, threads: int = 1, **options):
        super().__init__(**options)
        self.threads = threads

    @classmethod
    def available(cls) -> str | None:
        return _provider_status(cls.provider)

    def _device(self) -> str:
        try:
            from . import cudart

            return cudart.device_name()
        except Exception:
            return "NVIDIA GPU"

    def cache_key(self) -> dict:
        import onnxruntime as ort

        return self._base_key(self._device(), f"onnxruntime-gpu {ort.__version__} {self.provider}")

    def _provider_options(self) -> dict:
        return {}

    def _prepare(self, model: onnx.ModelProto) -> onnx.ModelProto:
        return model

    def _open(self, model: onnx.ModelProto) -> Session:
        import numpy as np
        import onnxruntime as ort

        from .ort_cpu import session_options

        feeds = random_inputs(model)
        prepared = self._prepare(model)
        try:
            session = ort.InferenceSession(ort_bytes(prepared), session_options(self.threads),
                                           providers=[(self.provider, self._provider_options())])
        except Exception as exc:
            raise LmoptError(f"onnxruntime ({self.provider}) cannot load the model: {one_line(exc)[:300]}") from None
        if session.get_providers()[0] != self.provider:  # onnxruntime falls back to the CPU silently
            raise LmoptError(f"onnxruntime could not start {self.provider} (no GPU, or CUDA/cuDNN libraries missing)")
        half = np.float16 if self.precision == "fp16" and prepared is not model else None
        return _IoBindingSession(session, feeds, half)


class OrtCudaBackend(_OrtGpuBackend):
    """--backend ort-cuda: onnxruntime-gpu CUDAExecutionProvider."""

    name = "ort-cuda"
    provider = "CUDAExecutionProvider"

    def _provider_options(self) -> dict:
        return {"cudnn_conv_algo_search": "EXHAUSTIVE"}

    def _prepare(self, model):
        return convert_to_fp16(model) if self.precision == "fp16" else model


class OrtTensorrtBackend(_OrtGpuBackend):
    """--backend ort-trt: onnxruntime-gpu TensorrtExecutionProvider (engines and timing cache on disk)."""

    name = "ort-trt"
    provider = "TensorrtExecutionProvider"

    def _provider_options(self) -> dict:
        cache = default_cache_dir() / "ort-trt"
        cache.mkdir(parents=True, exist_ok=True)
        cache = str(cache)
        return {
            "trt_fp16_enable": self.precision == "fp16",
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": cache,
            "trt_timing_cache_enable": True,
            "trt_timing_cache_path": cache,
        }
