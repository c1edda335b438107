"""--backend ort-cuda / ort-trt: onnxruntime-gpu's CUDA and TensorRT execution providers.

Timed like the trt and torch-cuda backends, so the three give comparable GPU times: inputs and
outputs are bound on the GPU once (IOBinding, outputs preallocated where their shapes are static),
onnxruntime runs on lmopt's own CUDA stream (provider option user_compute_stream), each run skips
onnxruntime's end-of-run synchronisation (run option disable_synchronize_execution_providers), and
batches of runs are timed between CUDA events on that stream (base.EventTimedSession), with the
host's enqueue time measured too: onnxruntime's per-run host overhead shows as enqueue-bound blocks.

ort-cuda replays a CUDA graph (enable_cuda_graph) where onnxruntime can capture the block: every
node on the GPU and every output preallocated; otherwise, or when onnxruntime refuses the graph,
it runs plain. TF32 follows the backend's tf32 option (use_tf32). fp16 converts the model to
float16 (lmopt.latency.fp16) for ort-cuda; ort-trt passes trt_fp16_enable to TensorRT instead.

ort-trt keeps one engine cache folder per block structure and backend key (onnxruntime names an
engine by tensor names and versions only, so blocks sharing names would share one engine); the
timing cache is shared, as TensorRT's timing cache is safe across models. The TensorRT execution
provider has no TF32 option: TensorRT allows TF32 by default, so ort-trt accepts only tf32=True.
"""
from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from ..errors import LmoptError, one_line
from ..inputs import random_feeds
from ..onnxio import input_dtype, static_shape
from . import cudart
from .base import EventTimedSession, LatencyBackend, Session
from .cache import default_cache_dir, key_text
from .fp16 import convert_to_fp16
from .ort_cpu import ort_bytes
from .signature import structural_signature


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


def output_specs(model: onnx.ModelProto) -> list[tuple[str, tuple[int, ...], type]] | None:
    """(name, static shape, numpy dtype) of every graph output, from onnx shape inference; None if any is unknown."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
        return [(vi.name, static_shape(vi), input_dtype(vi)) for vi in inferred.graph.output]
    except (LmoptError, onnx.shape_inference.InferenceError, onnx.checker.ValidationError):
        return None


class _IoBindingSession(EventTimedSession):
    """An onnxruntime session bound to GPU buffers, run on the timer's stream."""

    def __init__(self, session: Any, feeds: dict[str, np.ndarray], precision_np: type | None,
                 outputs: list[tuple[str, tuple[int, ...], type]] | None, timer: cudart.TimedStream):
        import onnxruntime as ort

        self.session, self.timer = session, timer
        self.binding = session.io_binding()
        self._keep = []
        for name, array in feeds.items():
            if array.dtype.kind == "f" and precision_np is not None:
                array = array.astype(precision_np)
            value = ort.OrtValue.ortvalue_from_numpy(array, "cuda", 0)
            self._keep.append(value)
            self.binding.bind_ortvalue_input(name, value)
        if outputs is not None:  # fixed addresses, which a CUDA graph needs
            for name, shape, dtype in outputs:
                value = ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype, "cuda", 0)
                self._keep.append(value)
                self.binding.bind_ortvalue_output(name, value)
        else:
            for output in session.get_outputs():
                self.binding.bind_output(output.name, "cuda")
        self.run_options = ort.RunOptions()
        self.run_options.add_run_config_entry("disable_synchronize_execution_providers", "1")
        session.run_with_iobinding(self.binding, self.run_options)  # allocates; captures the CUDA graph
        timer.synchronize()

    def _launch(self) -> None:
        self.session.run_with_iobinding(self.binding, self.run_options)

    def close(self) -> None:
        if self.timer is None:
            return
        with contextlib.suppress(Exception):  # a CUDA error is already on its way up
            self.timer.synchronize()
        self.binding = self.session = None  # the session goes before the stream it runs on
        self._keep = []
        self.timer.close()
        self.timer = None


class _OrtGpuBackend(LatencyBackend):
    provider = ""
    uses_tf32 = True
    use_cuda_graph = False

    def __init__(self, threads: int = 1, **options: Any):
        super().__init__(**options)
        self.threads = threads

    @classmethod
    def available(cls) -> str | None:
        return _provider_status(cls.provider)

    def cache_key(self) -> dict:
        import onnxruntime as ort

        return self._base_key(cudart.device_name(), f"onnxruntime-gpu {ort.__version__} {self.provider}")

    def _provider_options(self, model: onnx.ModelProto, stream_ptr: int, cuda_graph: bool) -> dict:
        """The execution provider's options for timing `model` on the stream `stream_ptr`."""
        return {"has_user_compute_stream": "1", "user_compute_stream": str(int(stream_ptr))}

    def _prepare(self, model: onnx.ModelProto) -> onnx.ModelProto:
        return model

    def _open(self, model: onnx.ModelProto) -> Session:
        feeds = random_feeds(model, 1)[0]
        prepared = self._prepare(model)
        half = np.float16 if self.precision == "fp16" and prepared is not model else None
        outputs = output_specs(prepared)
        graph = outputs is not None and self.use_cuda_graph
        try:
            return self._bound(prepared, feeds, half, outputs, graph)
        except LmoptError:
            if not graph:
                raise
        return self._bound(prepared, feeds, half, outputs, False)  # onnxruntime could not graph this block

    def _bound(self, model: onnx.ModelProto, feeds: dict[str, np.ndarray], half: type | None,
               outputs: list[tuple[str, tuple[int, ...], type]] | None, graph: bool) -> Session:
        import onnxruntime as ort

        from .ort_cpu import session_options

        timer = cudart.TimedStream()
        session = None
        try:
            options = self._provider_options(model, timer.ptr, graph)
            session = ort.InferenceSession(ort_bytes(model), session_options(self.threads),
                                           providers=[(self.provider, options)])
            if session.get_providers()[0] != self.provider:  # onnxruntime falls back to the CPU silently
                raise LmoptError(f"onnxruntime could not start {self.provider} (no GPU, or CUDA/cuDNN libraries "
                                 "missing)")
            taken = session.get_provider_options().get(self.provider, {}).get("user_compute_stream")
            if str(taken) != options["user_compute_stream"]:
                raise LmoptError(f"onnxruntime {ort.__version__} ({self.provider}) did not take lmopt's CUDA stream "
                                 "(user_compute_stream), so its runs cannot be timed: pip install -U onnxruntime-gpu")
            return _IoBindingSession(session, feeds, half, outputs, timer)
        except BaseException as exc:
            session = None  # the session goes before the stream it runs on
            timer.close()
            if isinstance(exc, Exception) and not isinstance(exc, LmoptError):
                raise LmoptError(f"onnxruntime ({self.provider}) cannot run the model: {one_line(exc)[:300]}") from None
            raise


class OrtCudaBackend(_OrtGpuBackend):
    """--backend ort-cuda: onnxruntime-gpu CUDAExecutionProvider (CUDA graphs where it can capture the block)."""

    name = "ort-cuda"
    provider = "CUDAExecutionProvider"

    def __init__(self, use_cuda_graph: bool = True, **options: Any):
        super().__init__(**options)
        self.use_cuda_graph = use_cuda_graph

    def cache_key(self) -> dict:
        return {**super().cache_key(), "cuda_graph": self.use_cuda_graph}

    def _provider_options(self, model: onnx.ModelProto, stream_ptr: int, cuda_graph: bool) -> dict:
        return {
            **super()._provider_options(model, stream_ptr, cuda_graph),
            "cudnn_conv_algo_search": "EXHAUSTIVE",
            "use_tf32": "1" if self.tf32 else "0",
            "enable_cuda_graph": "1" if cuda_graph else "0",
        }

    def _prepare(self, model: onnx.ModelProto) -> onnx.ModelProto:
        return convert_to_fp16(model) if self.precision == "fp16" else model


class OrtTensorrtBackend(_OrtGpuBackend):
    """--backend ort-trt: onnxruntime-gpu TensorrtExecutionProvider (engines and timing cache on disk)."""

    name = "ort-trt"
    provider = "TensorrtExecutionProvider"

    def __init__(self, **options: Any):
        super().__init__(**options)
        if not self.tf32:
            raise LmoptError("ort-trt cannot turn TF32 off (the TensorRT execution provider has no option for it): "
                             "use --backend trt")

    def engine_cache_dir(self, model: onnx.ModelProto) -> Path:
        """The engine cache folder of this block structure on this backend key (device, versions, precision)."""
        text = structural_signature(model) + key_text(self.cache_key())
        return default_cache_dir() / "ort-trt" / hashlib.sha256(text.encode()).hexdigest()[:32]

    def _provider_options(self, model: onnx.ModelProto, stream_ptr: int, cuda_graph: bool) -> dict:
        timing = default_cache_dir() / "ort-trt"
        engines = self.engine_cache_dir(model)
        engines.mkdir(parents=True, exist_ok=True)
        return {
            **super()._provider_options(model, stream_ptr, cuda_graph),
            "trt_fp16_enable": self.precision == "fp16",
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(engines),
            "trt_timing_cache_enable": True,
            "trt_timing_cache_path": str(timing),
        }
