"""--backend trt: build each block with TensorRT (through polygraphy's loaders) and time it like trtexec.

Building: polygraphy's NetworkFromOnnxBytes -> CreateConfig -> EngineBytesFromNetwork, with
one timing cache file shared by every build of a run (CreateConfig(load_timing_cache=PATH)
reads it, EngineBytesFromNetwork(save_timing_cache=PATH) merges the new entries back under a
file lock, so concurrent processes are safe). Builds run one at a time: TensorRT times tactics
on the GPU while it builds, so concurrent builds would disturb each other's tactic choice (and
the timing of any block being measured); trtexec builds serially too.

Precision: TensorRT 10.x has BuilderFlag.FP16 (deprecated from 10.12): fp16 uses it, with
the block's float I/O set to half so a block does not pay fp32<->fp16 reformats a real fp16
network would not have (trtexec's --inputIOFormats/--outputIOFormats=fp16:chw).
TensorRT 11.x removed the precision builder flags: precision travels in the ONNX file
(lmopt.latency.fp16 converts it) and the network is always strongly typed, so the deprecated
STRONGLY_TYPED creation flag is not passed (docs: "Migrating from TensorRT 10.x to 11.x",
docs.nvidia.com/deeplearning/tensorrt/latest/api/migration/).
TF32 follows the backend's tf32 option (default on, as trtexec unless --noTF32).

polygraphy: 0.49 drives TensorRT 10; TensorRT 11 needs 0.50 or newer, because 0.49's CreateConfig
reads ILayer.precision_is_set, which TensorRT 11 removed (an AttributeError inside the build).

Timing (trtexec's "GPU Compute Time"): inputs are copied to the GPU once; one enqueue outside
any capture, then a CUDA graph is captured from execute_async_v3 (falling back to plain enqueues
when the engine cannot be captured, as trtexec --useCudaGraph does); batches of launches are
timed between CUDA events on the stream (base.EventTimedSession); median after warm-up.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from ..errors import LmoptError, one_line
from ..onnxio import graph_inputs, static_shape
from . import cudart
from .base import EventTimedSession, LatencyBackend, Session
from .cache import default_cache_dir
from .fp16 import convert_to_fp16

INSTALL_HINT = ("install it from NVIDIA (pip install tensorrt --extra-index-url https://pypi.nvidia.com) "
                "or use JetPack 6")
# The onnx-tensorrt parser of TensorRT 10.3 (JetPack 6) was built against onnx 1.16 (IR 10);
# onnx 1.23 writes IR 14. Lower IR versions are a superset for the opsets lmopt writes (17).
TRT_MAX_IR_VERSION = 10
# The oldest polygraphy that works with TensorRT 11 (see the module docstring).
POLYGRAPHY_FOR_TRT11 = "0.50"


def polygraphy_status(trt_version: str, polygraphy_version: str) -> str | None:
    """None when this polygraphy can drive this TensorRT, else the one-line reason."""
    from polygraphy import mod

    if int(trt_version.split(".")[0]) >= 11 and mod.version(polygraphy_version) < mod.version(POLYGRAPHY_FOR_TRT11):
        return (f"TensorRT {trt_version} needs polygraphy >= {POLYGRAPHY_FOR_TRT11}, this is polygraphy "
                f"{polygraphy_version}: pip install -U polygraphy")
    return None


@functools.lru_cache(maxsize=1)
def trt_status() -> str | None:
    """None when TensorRT imports and a GPU is visible, else the one-line reason."""
    if importlib.util.find_spec("tensorrt") is None:
        return f"TensorRT is not installed: {INSTALL_HINT}"
    try:
        import tensorrt as trt

        version = trt.__version__
    # The PyPI stub raises at import when its real wheel was never fetched, with whatever error its
    # build step hit: any exception means "not usable", and its first line says why.
    except Exception as exc:  # noqa: BLE001
        return f"TensorRT could not be imported ({one_line(exc)[:200]}): {INSTALL_HINT}"
    import polygraphy

    reason = polygraphy_status(version, polygraphy.__version__)
    if reason is not None:
        return reason
    try:
        count = cudart.device_count()
    # An availability check must answer, not raise: no libcudart (OSError), polygraphy's own error
    # (PolygraphyException on Windows), a runtime without the symbol all mean TensorRT cannot run here.
    except Exception as exc:  # noqa: BLE001
        return (f"no CUDA runtime (libcudart) could be loaded ({one_line(exc)[:200]}): "
                "TensorRT needs an NVIDIA GPU and driver")
    if count == 0:
        return "TensorRT is installed but no NVIDIA GPU is visible (cudaGetDeviceCount found none)"
    return None


def _trt() -> Any:
    import tensorrt as trt

    return trt


def trt_version() -> str:
    """The installed TensorRT's version string."""
    return _trt().__version__


def has_precision_flags() -> bool:
    """TensorRT 10.x has BuilderFlag.FP16; TensorRT 11.x removed it (strong typing only)."""
    return hasattr(_trt().BuilderFlag, "FP16")


@contextlib.contextmanager
def polygraphy_errors(what: str) -> Iterator[None]:
    """Turn polygraphy's exceptions (G_LOGGER.critical raises PolygraphyException) into one-line LmoptErrors."""
    from polygraphy.exception import PolygraphyException

    try:
        yield
    except PolygraphyException as exc:
        raise LmoptError(f"{what}: {one_line(exc)[:400]}") from None


def set_polygraphy_severity(level: str) -> None:
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = getattr(G_LOGGER, level)  # polygraphy >= 0.40; lmopt needs >= 0.49


def default_timing_cache() -> Path:
    """The timing cache file of this GPU and TensorRT version, in lmopt's cache folder."""
    tag = re.sub(r"[^A-Za-z0-9.]+", "-", f"{cudart.device_name()}-trt{trt_version()}").strip("-")
    return default_cache_dir() / f"trt-timing-{tag}.cache"


def _onnx_bytes(model: onnx.ModelProto) -> bytes:
    clone = onnx.ModelProto()
    clone.CopyFrom(model)
    clone.ir_version = min(clone.ir_version or TRT_MAX_IR_VERSION, TRT_MAX_IR_VERSION)
    return clone.SerializeToString()


def build_engine_bytes(model: onnx.ModelProto, precision: str = "fp32", workspace_mib: int | None = None,
                       timing_cache: str | Path | None = None, fp16_io: bool = False,
                       tf32: bool = True, sparse_weights: bool = False) -> tuple[bytes, onnx.ModelProto]:
    """Build a serialized engine; returns (engine bytes, the ONNX model TensorRT parsed).

    fp16_io: with precision 'fp16', make the float network inputs/outputs half (blocks);
    otherwise they stay as in the model (deployment: fp32 I/O). tf32: BuilderFlag.TF32 set or cleared.
    sparse_weights: BuilderFlag.SPARSE_WEIGHTS (2:4 structured-sparse kernels where they are faster).
    """
    trt = _trt()
    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxBytes, PostprocessNetwork

    fp16 = precision == "fp16"
    flags = has_precision_flags()
    parsed = model
    if fp16 and not flags:
        # TensorRT 11: precision travels in the ONNX file.
        parsed = convert_to_fp16(model, keep_io_types=not fp16_io)
    # No strongly_typed=: TensorRT 11 networks are always strongly typed (the flag is deprecated and ignored);
    # TensorRT 10 builds weakly typed networks, where the FP16 builder flag picks the precision.
    network = NetworkFromOnnxBytes(_onnx_bytes(parsed))
    if fp16 and flags and fp16_io:
        def half_io(network):
            # ITensor.dtype of a network input/output may be set on a weakly typed network
            # (what polygraphy's SetTensorDatatypes and trtexec --inputIOFormats do).
            for tensor in ([network.get_input(i) for i in range(network.num_inputs)]
                           + [network.get_output(i) for i in range(network.num_outputs)]):
                if tensor.dtype == trt.float32:
                    tensor.dtype = trt.float16

        network = PostprocessNetwork(network, half_io, name="half_io")
    config_args = {}
    if workspace_mib:
        # IBuilderConfig.set_memory_pool_limit(MemoryPoolType.WORKSPACE, bytes), via CreateConfig(memory_pool_limits=).
        config_args["memory_pool_limits"] = {trt.MemoryPoolType.WORKSPACE: int(workspace_mib) << 20}
    if sparse_weights:
        config_args["sparse_weights"] = True
    if timing_cache:
        Path(timing_cache).parent.mkdir(parents=True, exist_ok=True)
        # CreateConfig(load_timing_cache=PATH): IBuilderConfig.create_timing_cache(bytes) + set_timing_cache;
        # a missing file only warns and starts an empty cache.
        config_args["load_timing_cache"] = str(timing_cache)
    config = CreateConfig(
        fp16=fp16 and flags,  # BuilderFlag.FP16, TensorRT 10.x only
        tf32=tf32,            # BuilderFlag.TF32 set, or cleared (trtexec --noTF32); TensorRT 10 and 11 have it
        **config_args,
    )
    # EngineBytesFromNetwork(network, config, save_timing_cache=PATH): builder.build_serialized_network, then
    # config.get_timing_cache() combined with the file's cache (ITimingCache.combine) and written under a lock.
    loader = EngineBytesFromNetwork(network, config=config,
                                    save_timing_cache=str(timing_cache) if timing_cache else None)
    with polygraphy_errors("TensorRT could not build the model"):
        try:
            engine_bytes = loader()
        except AttributeError as exc:  # a polygraphy older than this TensorRT's API
            import polygraphy

            raise LmoptError(f"polygraphy {polygraphy.__version__} cannot drive TensorRT {trt.__version__} "
                             f"({one_line(exc)[:200]}): pip install -U polygraphy") from None
    return bytes(engine_bytes), parsed


_NP_OF_TRT = {"FLOAT": np.float32, "HALF": np.float16, "INT32": np.int32, "INT64": np.int64,
              "INT8": np.int8, "UINT8": np.uint8, "BOOL": np.bool_, "BF16": np.uint16}


def _np_dtype(trt_dtype: Any) -> type:
    name = getattr(trt_dtype, "name", str(trt_dtype).rsplit(".", 1)[-1])
    if name not in _NP_OF_TRT:
        raise LmoptError(f"TensorRT I/O tensor type {name} is not supported by lmopt's timing")
    return _NP_OF_TRT[name]


class EngineSession(EventTimedSession):
    """A deserialized engine with device buffers bound, timed with CUDA events (CUDA graph when possible)."""

    def __init__(self, engine_bytes: bytes, seed: int = 0, use_cuda_graph: bool = True):
        from polygraphy import cuda
        from polygraphy.backend.trt import EngineFromBytes

        self._cuda = cuda.wrapper()
        self._buffers: list[int] = []
        self.graph: cudart.Graph | None = None
        self.timer: cudart.TimedStream | None = None
        with polygraphy_errors("TensorRT could not load the engine"):
            self.engine = EngineFromBytes(engine_bytes)()
        # ICudaEngine.create_execution_context(); tensors by name: num_io_tensors, get_tensor_name(i),
        # get_tensor_mode(name), get_tensor_shape(name), get_tensor_dtype(name) (TensorRT 10 Python API, ICudaEngine).
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise LmoptError("TensorRT could not create an execution context (out of GPU memory?)")
        try:
            self.timer = cudart.TimedStream()
            self._bind_buffers(np.random.default_rng(seed))
            # Enqueue once outside any capture, so lazy initialisation is not captured (trtexec does the same).
            self._enqueue()
            self.timer.synchronize()
            self.launch: Callable[[], None] = self._enqueue
            if use_cuda_graph:
                self._capture()
        except BaseException:
            self.close()
            raise

    def _bind_buffers(self, rng: np.random.Generator) -> None:
        """One device buffer per I/O tensor; inputs filled with random values (floats) or zeros."""
        trt = _trt()
        from polygraphy import cuda

        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            shape = tuple(self.engine.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise LmoptError(f"engine tensor {name!r} has a dynamic shape {shape}: fix the input shapes")
            dtype = np.dtype(_np_dtype(self.engine.get_tensor_dtype(name)))
            nbytes = max(1, int(np.prod(shape, dtype=np.int64)) * dtype.itemsize)
            ptr = self._cuda.malloc(nbytes)
            self._buffers.append(ptr)
            if self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                if np.issubdtype(dtype, np.floating):
                    host = rng.standard_normal(shape).astype(dtype)
                else:
                    host = np.zeros(shape, dtype=dtype)
                host = np.ascontiguousarray(host)
                self._cuda.memcpy(dst=ptr, src=host.ctypes.data, nbytes=host.nbytes,
                                  kind=cuda.MemcpyKind.HostToDevice)
            # IExecutionContext.set_tensor_address(name, memory: int) -> bool
            if not self.context.set_tensor_address(name, ptr):
                raise LmoptError(f"TensorRT refused the buffer for tensor {name!r}")

    def _enqueue(self) -> None:
        # IExecutionContext.execute_async_v3(stream_handle: int) -> bool, the Python binding of enqueueV3.
        if not self.context.execute_async_v3(self.timer.ptr):
            raise LmoptError("TensorRT execute_async_v3 failed (see TensorRT's log above)")

    def _capture(self) -> None:
        graph = cudart.Graph()
        stream = self.timer.ptr
        try:
            graph.begin_capture(stream)
        except RuntimeError:
            return
        try:
            ok = bool(self.context.execute_async_v3(stream))
        # Whatever TensorRT raises while capturing, the capture must still be ended (end_capture
        # below), and the engine is then timed without a graph.
        except Exception:  # noqa: BLE001
            ok = False
        if graph.end_capture(stream, ok):
            self.graph = graph
            self.launch = lambda: graph.launch(stream)
        # else: the engine holds work CUDA graphs cannot capture; plain enqueues (trtexec warns and does the same)

    def _launch(self) -> None:
        self.launch()

    def close(self) -> None:
        timer, self.timer = self.timer, None
        if timer is not None:
            with contextlib.suppress(Exception):  # a CUDA error is already on its way up
                timer.synchronize()
        if self.graph is not None:
            self.graph.destroy()
            self.graph = None
        for ptr in self._buffers:
            with contextlib.suppress(Exception):
                self._cuda.free(ptr)
        self._buffers = []
        self.context = None
        self.engine = None
        if timer is not None:
            timer.close()


class TensorrtBackend(LatencyBackend):
    """--backend trt: TensorRT engines built per block, GPU compute time per inference."""

    name = "trt"
    uses_tf32 = True

    def __init__(self, timing_cache: str | Path | None = None, workspace_mib: int | None = None,
                 use_cuda_graph: bool = True, quiet: bool = True, **options: Any):
        super().__init__(**options)
        self.timing_cache = Path(timing_cache) if timing_cache else default_timing_cache()
        self.workspace_mib = workspace_mib
        self.use_cuda_graph = use_cuda_graph
        if quiet:
            set_polygraphy_severity("ERROR")

    @classmethod
    def available(cls) -> str | None:
        return trt_status()

    def cache_key(self) -> dict:
        return self._base_key(cudart.device_name(), f"TensorRT {trt_version()}",
                              io="fp16" if self.precision == "fp16" else None)

    def _open(self, model: onnx.ModelProto) -> Session:
        for vi in graph_inputs(model):
            static_shape(vi)  # a clear error before building
        engine_bytes, _ = build_engine_bytes(model, self.precision, self.workspace_mib, self.timing_cache,
                                             fp16_io=True, tf32=self.tf32)
        return EngineSession(engine_bytes, use_cuda_graph=self.use_cuda_graph)
