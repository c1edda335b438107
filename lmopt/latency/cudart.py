"""The few CUDA runtime calls lmopt's TensorRT timing needs, through polygraphy's libcudart handle.

polygraphy.cuda wraps streams, device memory and copies but not events or graphs; those are
called here on the same libcudart (ctypes), following the CUDA runtime API:
  cudaEventCreate(cudaEvent_t*), cudaEventRecord(event, stream),
  cudaEventSynchronize(event), cudaEventElapsedTime(float* ms, start, end), cudaEventDestroy(event)
  cudaStreamBeginCapture(stream, mode), cudaStreamEndCapture(stream, cudaGraph_t*),
  cudaGraphInstantiateWithFlags(cudaGraphExec_t*, graph, unsigned long long flags),
  cudaGraphLaunch(exec, stream), cudaGraphDestroy, cudaGraphExecDestroy,
  cudaGetDeviceCount(int*), cudaGetDeviceProperties_v2(cudaDeviceProp*, device), cudaGetLastError().
CUDA 12 headers map cudaGetDeviceProperties to cudaGetDeviceProperties_v2, and later runtimes may not
export the old name; the _v2 symbol is used where the library has it, the old one elsewhere (CUDA 11).
cudaGraphInstantiateWithFlags is used rather than cudaGraphInstantiate because the latter's
C signature changed in CUDA 12 (flags replaced the error-node/log-buffer arguments of CUDA 11),
while ...WithFlags has the same signature in CUDA 11.4+ and 12 (JetPack 6 ships CUDA 12.2).
cudaStreamCaptureModeThreadLocal = 1 (Global 0, ThreadLocal 1, Relaxed 2), the mode trtexec's
TrtCudaGraph uses.

Finding libcudart: polygraphy searches LD_LIBRARY_PATH, /usr/local/cuda/lib64, /usr/lib and /lib
(and, from 0.53.4, the nvidia-cuda-runtime wheel). A pip-only machine keeps it in the wheel, under
site-packages/nvidia/cuda_runtime/lib: when polygraphy finds none, that folder is put on
LD_LIBRARY_PATH (the path polygraphy's own hint names) and polygraphy is asked again. cuda-python
is not used: polygraphy's ctypes handle already gives every call lmopt makes.
"""
from __future__ import annotations

import ctypes
import functools
import os
import sys
from pathlib import Path

CAPTURE_MODE_THREAD_LOCAL = 1


def wheel_runtime_dirs(paths: list[str] | None = None) -> list[Path]:
    """Folders nvidia/cuda_runtime/lib under `paths` (default sys.path, i.e. site-packages) holding a libcudart."""
    found = []
    for entry in filter(None, sys.path if paths is None else paths):
        lib_dir = Path(entry) / "nvidia" / "cuda_runtime" / "lib"
        if lib_dir not in found and lib_dir.is_dir() and any(lib_dir.glob("libcudart.so*")):
            found.append(lib_dir)
    return found


@functools.lru_cache(maxsize=1)
def lib():
    """polygraphy's global libcudart handle (ctypes.CDLL); raises if none can be loaded."""
    from polygraphy import cuda

    try:
        return cuda.wrapper().handle
    except OSError:  # polygraphy found no libcudart.so* and the default loader failed too
        dirs = wheel_runtime_dirs()
        if not dirs:
            raise
    os.environ["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [*map(str, dirs), os.environ.get("LD_LIBRARY_PATH")]))
    return cuda.wrapper().handle


def _check(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"{what} failed with CUDA error {status}")


def device_count() -> int:
    count = ctypes.c_int(0)
    status = lib().cudaGetDeviceCount(ctypes.byref(count))
    return count.value if status == 0 else 0


def device_name(device: int = 0) -> str:
    # cudaDeviceProp starts with `char name[256]` in every CUDA version; the struct is about 1 KiB,
    # so an 8 KiB buffer is safe whichever version of the struct the library fills.
    buffer = ctypes.create_string_buffer(8192)
    handle = lib()
    try:
        get_properties = handle.cudaGetDeviceProperties_v2
    except AttributeError:  # CUDA 11
        get_properties = handle.cudaGetDeviceProperties
    if get_properties(buffer, ctypes.c_int(device)) != 0:
        return "unknown NVIDIA GPU"
    return buffer.raw[:256].split(b"\0", 1)[0].decode("utf-8", "replace") or "unknown NVIDIA GPU"


class Event:
    def __init__(self):
        self.ptr = ctypes.c_void_p()
        _check(lib().cudaEventCreate(ctypes.byref(self.ptr)), "cudaEventCreate")

    def record(self, stream_ptr: int) -> None:
        _check(lib().cudaEventRecord(self.ptr, ctypes.c_void_p(stream_ptr)), "cudaEventRecord")

    def synchronize(self) -> None:
        _check(lib().cudaEventSynchronize(self.ptr), "cudaEventSynchronize")

    def elapsed_ms(self, start: "Event") -> float:
        ms = ctypes.c_float()
        _check(lib().cudaEventElapsedTime(ctypes.byref(ms), start.ptr, self.ptr), "cudaEventElapsedTime")
        return float(ms.value)

    def destroy(self) -> None:
        if self.ptr:
            lib().cudaEventDestroy(self.ptr)
            self.ptr = ctypes.c_void_p()


class Graph:
    """A CUDA graph captured from work enqueued on one stream."""

    def __init__(self):
        self.exec = ctypes.c_void_p()

    def begin_capture(self, stream_ptr: int) -> None:
        _check(lib().cudaStreamBeginCapture(ctypes.c_void_p(stream_ptr), ctypes.c_int(CAPTURE_MODE_THREAD_LOCAL)),
               "cudaStreamBeginCapture")

    def end_capture(self, stream_ptr: int, ok: bool) -> bool:
        """End the capture; instantiate it if the enqueue succeeded. False (error cleared) otherwise."""
        graph = ctypes.c_void_p()
        status = lib().cudaStreamEndCapture(ctypes.c_void_p(stream_ptr), ctypes.byref(graph))
        if ok and status == 0 and graph:
            status = lib().cudaGraphInstantiateWithFlags(ctypes.byref(self.exec), graph, ctypes.c_ulonglong(0))
        if graph:
            lib().cudaGraphDestroy(graph)
        if not (ok and status == 0 and self.exec):
            lib().cudaGetLastError()  # clear the sticky-free error left by a failed capture
            self.exec = ctypes.c_void_p()
            return False
        return True

    def launch(self, stream_ptr: int) -> None:
        _check(lib().cudaGraphLaunch(self.exec, ctypes.c_void_p(stream_ptr)), "cudaGraphLaunch")

    def destroy(self) -> None:
        if self.exec:
            lib().cudaGraphExecDestroy(self.exec)
            self.exec = ctypes.c_void_p()
