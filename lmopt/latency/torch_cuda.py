"""--backend torch-cuda: blocks translated to torch (lmopt.latency.torch_translate) and timed on CUDA.

The translation is lmopt's own small ONNX -> torch interpreter, not onnx2torch (unmaintained
since 2024, pulls in torchvision); torch_translate's docstring says why and what it covers.

For machines with a GPU but no TensorRT. cudnn.benchmark picks the fastest convolution
algorithms during warm-up; each block is captured into a CUDA graph when capture works
(removing Python and launch overhead, as a deployed graph would), else run eagerly; batches of
runs are timed between CUDA events (base.EventTimedSession) and the median is reported. fp16 runs
the module after module.half() on half inputs. TF32 follows the backend's tf32 option for both
matmuls and convolutions (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32),
the policy the TensorRT backend applies too; torch's own defaults differ (matmul off, cuDNN on).
"""
from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import onnx

from ..errors import LmoptError, one_line
from ..inputs import random_feeds
from .base import EventTimedSession, LatencyBackend, Session


def torch_status() -> str | None:
    try:
        import torch
    except ImportError:
        return "torch is not installed (pip install torch, a CUDA build)"
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
        return f"torch {torch.__version__} ({build}) sees no CUDA GPU"
    return None


class _TorchEvents:
    """A start and an end CUDA event on torch's current stream (base.EventTimer)."""

    def __init__(self, torch: Any):
        self.events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))

    def record(self, end: bool) -> None:
        self.events[end].record()

    def elapsed_ms(self) -> float:
        start, end = self.events
        end.synchronize()
        return start.elapsed_time(end)


class _TorchSession(EventTimedSession):
    """A translated block on the GPU: CUDA graph replay where capture works, else eager runs."""

    def __init__(self, model: onnx.ModelProto, precision: str, use_cuda_graph: bool):
        import torch

        from .torch_translate import translate

        self.torch = torch
        module = translate(model).to("cuda")
        feeds = random_feeds(model, 1)[0]
        inputs = []
        for array in feeds.values():
            tensor = torch.from_numpy(np.ascontiguousarray(array)).to("cuda")
            if precision == "fp16" and tensor.is_floating_point():
                tensor = tensor.half()
            inputs.append(tensor)
        if precision == "fp16":
            module = module.half()
        self.module, self.inputs = module, inputs
        self.graph = None
        self.timer = _TorchEvents(torch)
        with torch.no_grad():
            self._eager()  # first run: cudnn.benchmark's algorithm search
            torch.cuda.synchronize()
            if use_cuda_graph:
                self._capture()
        self.run = self.graph.replay if self.graph is not None else self._eager

    def _eager(self) -> Any:
        with self.torch.no_grad():
            return self.module(*self.inputs)

    def _capture(self) -> None:
        torch = self.torch
        # torch's documented capture recipe: warm up on a side stream, then capture with torch.cuda.graph.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                self.module(*self.inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self._static_out = self.module(*self.inputs)
        # Any failure to capture (an op CUDA graphs cannot hold, a capture-unsafe call) means this
        # block is timed eagerly instead; torch has already ended the capture on the way out.
        except Exception:  # noqa: BLE001
            torch.cuda.synchronize()
            return
        self.graph = graph

    def _launch(self) -> None:
        self.run()  # graph replay, or _eager (under no_grad)

    def close(self) -> None:
        self.graph = None
        self.module = self.inputs = None
        with contextlib.suppress(Exception):
            self.torch.cuda.empty_cache()


class TorchCudaBackend(LatencyBackend):
    """--backend torch-cuda: torch on the GPU, CUDA-event timing, CUDA graphs where capture works."""

    name = "torch-cuda"
    uses_tf32 = True

    def __init__(self, use_cuda_graph: bool = True, **options: Any):
        super().__init__(**options)
        self.use_cuda_graph = use_cuda_graph
        self._set_flags()

    def _set_flags(self) -> None:
        import torch

        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = self.tf32
        torch.backends.cudnn.allow_tf32 = self.tf32

    @classmethod
    def available(cls) -> str | None:
        return torch_status()

    def cache_key(self) -> dict:
        import torch

        library = (f"torch {torch.__version__} CUDA {torch.version.cuda} "
                   f"cuDNN {torch.backends.cudnn.version()}")
        return self._base_key(torch.cuda.get_device_name(0), library,
                              cuda_graph=self.use_cuda_graph)

    def _open(self, model: onnx.ModelProto) -> Session:
        self._set_flags()  # process-wide flags: set again in case other code changed them
        try:
            return _TorchSession(model, self.precision, self.use_cuda_graph)
        except LmoptError:
            raise
        except RuntimeError as exc:  # CUDA out of memory, shape errors
            raise LmoptError(f"torch could not run the model: {one_line(exc)[:300]}") from None
