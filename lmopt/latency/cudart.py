"""CUDA events, CUDA graphs and the device name for lmopt's GPU timing, called through ctypes.

The runtime calls go to the libcudart that polygraphy loads (polygraphy.cuda.wrapper().handle): the
library that already owns the streams and device buffers lmopt times with. polygraphy.cuda wraps
streams, memory and copies but not events or graphs, so those few calls are made here, each through
a C prototype declared from cuda_runtime_api.h (RUNTIME_PROTOTYPES): ctypes converts and checks every
argument against it instead of guessing a C type from the Python value.

The device name comes from the driver API's cuDeviceGetName(char *name, int len, CUdevice dev), which
is told the buffer's length. The runtime's only route to the name, cudaGetDeviceProperties, fills a
cudaDeviceProp whose size and layout change between CUDA versions (and whose symbol was renamed
cudaGetDeviceProperties_v2 in CUDA 12), so calling it from ctypes would mean guessing a buffer size.
Runtime device ordinals are the driver's ordinals, and cudaDeviceProp.name is this same string.

Why no library for these calls: cuda-python's cuda.bindings.runtime links its own static copy of the
CUDA runtime, built per CUDA major: cuda-bindings 13.x needs a CUDA 13 driver (580 or later), CUDA 12
machines (JetPack 6 ships CUDA 12.2) need 12.x. Using it would add a dependency pinned per CUDA major
beside TensorRT's own pins, and a second CUDA runtime in the process next to the libcudart polygraphy
uses for the streams being timed, for the dozen calls below. polygraphy (a core dependency) already
finds and loads the runtime, so lmopt calls that one.

Signatures that matter across versions: cudaGraphInstantiateWithFlags is used rather than
cudaGraphInstantiate, whose C signature changed in CUDA 12 (flags replaced CUDA 11's error-node and
log-buffer arguments), while ...WithFlags has had one signature since CUDA 11.4.
cudaStreamCaptureModeThreadLocal = 1 (Global 0, ThreadLocal 1, Relaxed 2) is the mode trtexec's
TrtCudaGraph uses.

Finding libcudart: polygraphy searches LD_LIBRARY_PATH, /usr/local/cuda/lib64, /usr/lib and /lib
(and, from 0.53.4, the nvidia-cuda-runtime wheel). A pip-only machine keeps it in the wheel, under
site-packages/nvidia/cuda_runtime/lib: when polygraphy finds none, that folder is put on
LD_LIBRARY_PATH (the path polygraphy's own hint names) and polygraphy is asked again.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import sys
from pathlib import Path
from typing import Any

CAPTURE_MODE_THREAD_LOCAL = 1
UNKNOWN_DEVICE = "unknown NVIDIA GPU"
# cudaDeviceProp.name is char[256]; cuDeviceGetName writes at most this many bytes, NUL included.
NAME_BYTES = 256
DRIVER_LIBRARY = "nvcuda.dll" if sys.platform.startswith("win") else "libcuda.so.1"

_int_p, _void_pp = ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_void_p)
# cudaError_t name(argument types...): every runtime call made here. Handles (cudaStream_t,
# cudaEvent_t, cudaGraph_t, cudaGraphExec_t) are opaque pointers.
RUNTIME_PROTOTYPES: dict[str, tuple] = {
    "cudaGetDeviceCount": (_int_p,),
    "cudaGetLastError": (),
    "cudaEventCreate": (_void_pp,),
    "cudaEventRecord": (ctypes.c_void_p, ctypes.c_void_p),
    "cudaEventSynchronize": (ctypes.c_void_p,),
    "cudaEventElapsedTime": (ctypes.POINTER(ctypes.c_float), ctypes.c_void_p, ctypes.c_void_p),
    "cudaEventDestroy": (ctypes.c_void_p,),
    "cudaStreamBeginCapture": (ctypes.c_void_p, ctypes.c_int),
    "cudaStreamEndCapture": (ctypes.c_void_p, _void_pp),
    "cudaGraphInstantiateWithFlags": (_void_pp, ctypes.c_void_p, ctypes.c_ulonglong),
    "cudaGraphLaunch": (ctypes.c_void_p, ctypes.c_void_p),
    "cudaGraphDestroy": (ctypes.c_void_p,),
    "cudaGraphExecDestroy": (ctypes.c_void_p,),
}
# CUresult name(argument types...): the driver calls behind device_name(). CUdevice is an int.
DRIVER_PROTOTYPES: dict[str, tuple] = {
    "cuInit": (ctypes.c_uint,),
    "cuDeviceGet": (_int_p, ctypes.c_int),
    "cuDeviceGetName": (ctypes.POINTER(ctypes.c_char), ctypes.c_int, ctypes.c_int),
}
_PROTOTYPES = {"runtime": RUNTIME_PROTOTYPES, "driver": DRIVER_PROTOTYPES}


class Api:
    """The functions of one loaded library, each called through its declared prototype (int status result).

    `handle` is a ctypes.CDLL, or anything whose attributes are ctypes function pointers (the tests'
    fakes are ctypes callbacks, so they receive arguments converted exactly as a C library would).
    A function is bound on first use; a name the library lacks raises AttributeError then.
    """

    def __init__(self, handle: Any, prototypes: dict[str, tuple]):
        self._handle = handle
        self._prototypes = prototypes

    def __getattr__(self, name: str) -> Any:
        prototypes = self.__dict__.get("_prototypes", {})
        if name not in prototypes:
            raise AttributeError(name)
        address = ctypes.cast(getattr(self._handle, name), ctypes.c_void_p).value
        function = ctypes.CFUNCTYPE(ctypes.c_int, *prototypes[name])(address)
        setattr(self, name, function)  # bound once
        return function


def wheel_runtime_dirs(paths: list[str] | None = None) -> list[Path]:
    """Folders nvidia/cuda_runtime/lib under `paths` (default sys.path, i.e. site-packages) holding a libcudart."""
    found = []
    for entry in filter(None, sys.path if paths is None else paths):
        lib_dir = Path(entry) / "nvidia" / "cuda_runtime" / "lib"
        if lib_dir not in found and lib_dir.is_dir() and any(lib_dir.glob("libcudart.so*")):
            found.append(lib_dir)
    return found


@functools.lru_cache(maxsize=1)
def lib() -> Any:
    """polygraphy's global libcudart handle (ctypes.CDLL); raises OSError if none can be loaded."""
    from polygraphy import cuda

    try:
        return cuda.wrapper().handle
    except OSError:  # polygraphy found no libcudart.so* and the default loader failed too
        dirs = wheel_runtime_dirs()
        if not dirs:
            raise
    os.environ["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [*map(str, dirs), os.environ.get("LD_LIBRARY_PATH")]))
    return cuda.wrapper().handle


@functools.lru_cache(maxsize=1)
def driver_lib() -> Any:
    """The CUDA driver library (libcuda.so.1, which libcudart itself loads); raises OSError if absent."""
    return ctypes.CDLL(DRIVER_LIBRARY)


@functools.lru_cache(maxsize=8)
def _api(handle: Any, kind: str) -> Api:
    return Api(handle, _PROTOTYPES[kind])


def runtime() -> Api:
    """The runtime calls of RUNTIME_PROTOTYPES on polygraphy's libcudart."""
    return _api(lib(), "runtime")


def driver() -> Api:
    """The driver calls of DRIVER_PROTOTYPES."""
    return _api(driver_lib(), "driver")


def _check(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"{what} failed with CUDA error {status}")


def device_count() -> int:
    """cudaGetDeviceCount, 0 when the runtime reports an error (no driver, no device)."""
    count = ctypes.c_int(0)
    status = runtime().cudaGetDeviceCount(ctypes.byref(count))
    return count.value if status == 0 else 0


def device_name(device: int = 0) -> str:
    """The name of CUDA device `device` (what cudaDeviceProp.name holds), else UNKNOWN_DEVICE."""
    try:
        api = driver()
    except OSError:
        return UNKNOWN_DEVICE
    handle = ctypes.c_int(0)
    name = ctypes.create_string_buffer(NAME_BYTES)
    if (api.cuInit(0) != 0 or api.cuDeviceGet(ctypes.byref(handle), device) != 0
            or api.cuDeviceGetName(name, NAME_BYTES, handle) != 0):
        return UNKNOWN_DEVICE
    return name.value.decode("utf-8", "replace") or UNKNOWN_DEVICE


class Event:
    """A CUDA event (cudaEventCreate: default flags, so it records timing)."""

    def __init__(self) -> None:
        self.ptr = ctypes.c_void_p()
        _check(runtime().cudaEventCreate(ctypes.byref(self.ptr)), "cudaEventCreate")

    def record(self, stream_ptr: int) -> None:
        _check(runtime().cudaEventRecord(self.ptr, stream_ptr), "cudaEventRecord")

    def synchronize(self) -> None:
        _check(runtime().cudaEventSynchronize(self.ptr), "cudaEventSynchronize")

    def elapsed_ms(self, start: Event) -> float:
        """Milliseconds from `start` to this event (both recorded and complete)."""
        ms = ctypes.c_float()
        _check(runtime().cudaEventElapsedTime(ctypes.byref(ms), start.ptr, self.ptr), "cudaEventElapsedTime")
        return float(ms.value)

    def destroy(self) -> None:
        if self.ptr:
            runtime().cudaEventDestroy(self.ptr)
            self.ptr = ctypes.c_void_p()


class Graph:
    """A CUDA graph captured from work enqueued on one stream."""

    def __init__(self) -> None:
        self.exec = ctypes.c_void_p()

    def begin_capture(self, stream_ptr: int) -> None:
        _check(runtime().cudaStreamBeginCapture(stream_ptr, CAPTURE_MODE_THREAD_LOCAL), "cudaStreamBeginCapture")

    def end_capture(self, stream_ptr: int, ok: bool) -> bool:
        """End the capture; instantiate it if the enqueue succeeded (`ok`). False, error state cleared, otherwise."""
        api = runtime()
        graph = ctypes.c_void_p()
        status = api.cudaStreamEndCapture(stream_ptr, ctypes.byref(graph))
        if ok and status == 0 and graph:
            status = api.cudaGraphInstantiateWithFlags(ctypes.byref(self.exec), graph, 0)
        if graph:
            api.cudaGraphDestroy(graph)
        if ok and status == 0 and self.exec:
            return True
        # A failed capture's error is not sticky, but it stays the runtime's last error until read:
        # read it here so a later call's check does not report it.
        api.cudaGetLastError()
        self.exec = ctypes.c_void_p()
        return False

    def launch(self, stream_ptr: int) -> None:
        _check(runtime().cudaGraphLaunch(self.exec, stream_ptr), "cudaGraphLaunch")

    def destroy(self) -> None:
        if self.exec:
            runtime().cudaGraphExecDestroy(self.exec)
            self.exec = ctypes.c_void_p()


class TimedStream:
    """A CUDA stream (polygraphy's) with a start and an end event on it.

    The timer of the trt and onnxruntime-gpu sessions (base.EventTimedSession): record(False) and
    record(True) mark a batch of launches, elapsed_ms() waits for the end event.
    """

    def __init__(self) -> None:
        from polygraphy import cuda

        lib()  # when polygraphy cannot find libcudart, lib() puts the wheel's on the path first
        self.stream = cuda.Stream()
        self.events: tuple[Event, ...] = ()
        try:
            self.events += (Event(),)
            self.events += (Event(),)
        except BaseException:
            self.close()
            raise

    @property
    def ptr(self) -> int:
        """The stream's handle (cudaStream_t as an int), for the libraries that enqueue on it."""
        return self.stream.ptr

    def synchronize(self) -> None:
        self.stream.synchronize()

    def record(self, end: bool) -> None:
        self.events[end].record(self.stream.ptr)

    def elapsed_ms(self) -> float:
        start, end = self.events
        end.synchronize()
        return end.elapsed_ms(start)

    def close(self) -> None:
        """Wait for the stream, then release the events and the stream.

        Called on error paths too, so a failure here (a CUDA error already raised) is not raised again.
        """
        stream, self.stream = self.stream, None
        if stream is not None:
            with contextlib.suppress(Exception):
                stream.synchronize()
        for event in self.events:
            event.destroy()
        self.events = ()
        if stream is not None:
            with contextlib.suppress(Exception):
                stream.free()
