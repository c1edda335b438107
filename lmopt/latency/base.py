"""The latency backend interface and the registry of backends.

A backend times standalone ONNX models with fully static input shapes on one runtime
(onnxruntime on the CPU, torch on CUDA, TensorRT, onnxruntime-gpu). Every backend follows
the same method: prepare the model once, warm up, then time single inferences until at least
`runs` runs and `min_time_s` seconds have passed, and report the median in milliseconds.

Backends implement `_open(model) -> Session`; `measure` and `measure_interleaved` are built
on it here. GPU sessions time with CUDA events (EventTimedSession): many launches between one
pair of events, divided, so the GPU is never idle inside a sample; the host's enqueue time is
measured too, and a block whose enqueue takes most of its GPU time is flagged (trtexec's
"Throughput may be bound by Enqueue Time" check). The events come from the session's timer:
cudart.TimedStream for trt and onnxruntime-gpu, torch's CUDA events for torch-cuda.
Heavy libraries (torch, tensorrt) are imported only inside the backend modules, and those
modules are imported only when the backend is asked for.
"""
from __future__ import annotations

import abc
import functools
import importlib
import os
import platform
import statistics
import time
from typing import Protocol

import onnx

from ..errors import LmoptError, one_line

PRECISIONS = ("fp32", "fp16", "int8")
# trtexec's kENQUEUE_BOUND_REPORTING_THRESHOLD: enqueue-bound when median enqueue time > 0.8 x median GPU time.
ENQUEUE_BOUND_RATIO = 0.8

# name -> "module:Class", imported on demand.
BACKENDS = {
    "ort-cpu": "lmopt.latency.ort_cpu:OrtCpuBackend",
    "torch-cuda": "lmopt.latency.torch_cuda:TorchCudaBackend",
    "trt": "lmopt.latency.tensorrt:TensorrtBackend",
    "ort-cuda": "lmopt.latency.ort_gpu:OrtCudaBackend",
    "ort-trt": "lmopt.latency.ort_gpu:OrtTensorrtBackend",
}


class Session(abc.ABC):
    """One prepared model on a backend: runs timed single inferences."""

    # Runs per run_timed() call while collecting: GPU sessions queue several runs between
    # synchronisations; CPU sessions check the clock after every run.
    batch = 1
    # Host enqueue ms per launch, one entry per sample (GPU sessions only; None: not measured).
    enqueue_ms: list[float] | None = None

    @abc.abstractmethod
    def run_timed(self, count: int) -> list[float]:
        """Run `count` consecutive inferences; return samples of one inference's time in milliseconds
        (one per inference, or one averaged over all of them for an EventTimedSession)."""

    def close(self) -> None:
        """Release what the session holds (GPU buffers, engines)."""


class EventTimer(Protocol):
    """A start and an end event on the stream a session launches on."""

    def record(self, end: bool) -> None:
        """Record the start (end=False) or the end event."""

    def elapsed_ms(self) -> float:
        """Wait for the end event; milliseconds between the start and end events."""


class EventTimedSession(Session):
    """A GPU session timed with one pair of CUDA events around many launches.

    One launch is queued before the start event, so the GPU is busy when the event is recorded;
    then `count` launches are queued and timed by the host clock (enqueue time), then the end event.
    (end - start) / count is the GPU time of one launch, free of the host's gaps as long as the
    host queues launches faster than the GPU runs them; enqueue_ms tells when it does not.
    Subclasses queue launches (_launch) and set `timer`.
    """

    batch = 10
    clock = staticmethod(time.perf_counter)
    timer: EventTimer

    @abc.abstractmethod
    def _launch(self) -> None:
        """Queue one inference on the session's stream."""

    def _record(self, end: bool) -> None:
        self.timer.record(end)

    def _elapsed_ms(self) -> float:
        return self.timer.elapsed_ms()

    def run_timed(self, count: int) -> list[float]:
        if self.enqueue_ms is None:
            self.enqueue_ms = []
        self._launch()
        self._record(False)
        started = self.clock()
        for _ in range(count):
            self._launch()
        host_ms = (self.clock() - started) * 1000.0
        self._record(True)
        gpu_ms = self._elapsed_ms()
        self.enqueue_ms.append(host_ms / count)
        return [gpu_ms / count]


def enqueue_bound(gpu_ms: list[float], enqueue_ms: list[float] | None) -> bool:
    """True when the host's enqueue time is most of the GPU time (the GPU may have waited for the host)."""
    if not gpu_ms or not enqueue_ms:
        return False
    return statistics.median(enqueue_ms) > ENQUEUE_BOUND_RATIO * statistics.median(gpu_ms)


class LatencyBackend(abc.ABC):
    """Times standalone ONNX models on one runtime.

    Options shared by every backend:
      precision   'fp32', 'fp16' or 'int8' (each backend names the ones it times: `precisions`)
      batch       the batch size, recorded in cache_key() when known (it is also in the input shapes)
      warmup_s    seconds of untimed runs before timing (trtexec's default is 0.2 s)
      runs        at least this many timed runs
      min_time_s  and at least this many seconds of timed runs
      max_time_s  stop after this many seconds even if `runs` is not reached
      tf32        GPU backends: let fp32 convolutions and matmuls use TF32 (default, as trtexec does
                  unless --noTF32); recorded in cache_key(). The CPU backend has no TF32.

    After measure(), last_enqueue_bound tells whether that model's timing was enqueue-bound, and
    enqueue_bound counts such measurements.
    """

    name: str = ""
    precisions: tuple[str, ...] = ("fp32", "fp16")  # what this backend can time
    uses_tf32 = False  # GPU backends: True (the TF32 policy is applied and recorded in the cache key)
    # Times models with symbolic input dims at the shapes they carry (inputs.TIMING_SHAPES): what
    # prepare.timing_base needs. Engine builders that want an optimisation profile per shape do not.
    times_symbolic_inputs = False

    def __init__(self, precision: str = "fp32", batch: int | None = None, warmup_s: float = 0.2,
                 runs: int = 20, min_time_s: float = 0.5, max_time_s: float = 10.0, tf32: bool = True):
        if precision not in PRECISIONS:
            raise LmoptError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
        if precision not in self.precisions:
            raise LmoptError(f"the {self.name} backend times {' and '.join(self.precisions)}, not {precision}")
        if runs < 1:
            raise LmoptError("runs must be at least 1")
        self.precision = precision
        self.batch = batch
        self.warmup_s = warmup_s
        self.runs = runs
        self.min_time_s = min_time_s
        self.max_time_s = max(max_time_s, min_time_s)
        self.tf32 = bool(tf32)
        self.enqueue_bound = 0
        self.last_enqueue_bound = False

    # --- what a backend provides -------------------------------------------------------------
    @classmethod
    def available(cls) -> str | None:
        """None when this backend can run here, else one line naming what is missing and how to get it."""
        return None

    @abc.abstractmethod
    def cache_key(self) -> dict:
        """What a latency depends on besides the block: backend, device, library version, precision, ..."""

    @abc.abstractmethod
    def _open(self, model: onnx.ModelProto) -> Session:
        """Prepare `model` (static shapes) for timing."""

    # --- timing, shared by all backends --------------------------------------------------------
    def _base_key(self, device: str, library: str, **extra: object) -> dict:
        key = {"backend": self.name, "device": device, "library": library, "precision": self.precision}
        if self.batch is not None:
            key["batch"] = int(self.batch)
        if self.uses_tf32:
            key["tf32"] = self.tf32
        key.update({k: v for k, v in extra.items() if v is not None})
        return key

    def _warm(self, session: Session) -> None:
        session.run_timed(1)  # first run: lazy initialisation, autotuning
        deadline = time.perf_counter() + self.warmup_s
        while time.perf_counter() < deadline:
            session.run_timed(1)

    def _collect(self, session: Session) -> list[float]:
        samples: list[float] = []
        start = time.perf_counter()
        while True:
            # Time in small batches so GPU backends can queue several runs between synchronisations.
            samples += session.run_timed(session.batch)
            elapsed = time.perf_counter() - start
            if (len(samples) >= self.runs and elapsed >= self.min_time_s) or elapsed >= self.max_time_s:
                return samples

    def measure(self, model: onnx.ModelProto) -> float:
        """Median milliseconds of one inference of `model` (warm-up first)."""
        session = self._open(model)
        try:
            self._warm(session)
            if session.enqueue_ms is not None:
                session.enqueue_ms.clear()
            samples = self._collect(session)
            self.last_enqueue_bound = enqueue_bound(samples, session.enqueue_ms)
            self.enqueue_bound += self.last_enqueue_bound
            return float(statistics.median(samples))
        finally:
            session.close()

    def measure_interleaved(self, models: list[onnx.ModelProto], rounds: int = 20) -> list[float]:
        """Median milliseconds per model, timed by interleaving the models' runs in one process.

        Every round runs each model a few times, the order rotating from round to round, so that
        slow drifts (clock boost, thermal throttling, other load) hit all models alike. Rounds go on
        past `rounds` until every model has run for `min_time_s` (as `measure` does: 20 runs of a 5 ms
        model are 0.1 s, and their median moved by several percent from one measurement to the next),
        and stop after `max_time_s` per model. This is the measurement behind an end-to-end
        'measured speed-up'.
        """
        if not models:
            return []
        sessions: list[Session] = []
        try:
            for model in models:
                sessions.append(self._open(model))
            for session in sessions:
                self._warm(session)
            per_round = max(1, -(-self.runs // max(1, rounds)))
            samples: list[list[float]] = [[] for _ in sessions]
            started, r = time.perf_counter(), 0
            while r < max(1, rounds) or min(sum(s) for s in samples) < 1000 * self.min_time_s:
                if time.perf_counter() - started >= self.max_time_s * len(sessions):
                    break
                for k in range(len(sessions)):
                    i = (k + r) % len(sessions)
                    samples[i] += sessions[i].run_timed(per_round)
                r += 1
            return [float(statistics.median(s)) for s in samples]
        finally:
            for session in sessions:
                session.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} {self.precision}>"


# --- helpers for backends ---------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def cpu_name() -> str:
    """The CPU model string (/proc/cpuinfo 'model name'), else platform's description."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


@functools.lru_cache(maxsize=1)
def physical_cores() -> int:
    """Physical cores this process may use (hyper-threads not counted)."""
    try:
        allowed = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        allowed = os.cpu_count() or 1
    cores = set()
    try:
        with open("/proc/cpuinfo") as handle:
            physical = core = None
            for line in handle:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "physical id":
                    physical = value.strip()
                elif key == "core id":
                    core = value.strip()
                elif not line.strip():
                    if core is not None:
                        cores.add((physical, core))
                    physical = core = None
            if core is not None:
                cores.add((physical, core))
    except OSError:
        pass
    count = len(cores) or allowed
    return max(1, min(count, allowed))


# --- registry --------------------------------------------------------------------------------

def backend_class(name: str) -> type[LatencyBackend]:
    """The backend class registered as `name` (its module imported now); LmoptError for an unknown name."""
    if name not in BACKENDS:
        raise LmoptError(f"unknown latency backend {name!r} (choose from: {', '.join(BACKENDS)})")
    module_name, _, class_name = BACKENDS[name].partition(":")
    return getattr(importlib.import_module(module_name), class_name)


def default_backend_name() -> str:
    """'trt' where TensorRT imports and a GPU is present, else 'torch-cuda' where torch sees CUDA, else 'ort-cpu'."""
    for name in ("trt", "torch-cuda"):
        if backend_class(name).available() is None:
            return name
    return "ort-cpu"


def get_backend(name: str | None = None, **options: object) -> LatencyBackend:
    """The backend `name` (default: default_backend_name()) built with `options`.

    LmoptError (one line) for an unknown name or a backend that cannot run on this machine.
    """
    name = name or default_backend_name()
    cls = backend_class(name)
    reason = cls.available()
    if reason is not None:
        raise LmoptError(f"latency backend {name!r} is unavailable: {one_line(reason)}")
    return cls(**options)
