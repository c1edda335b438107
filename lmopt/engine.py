"""Build the deployment TensorRT engine for a model (`lmopt build`) and time it.

The engine is built with the same polygraphy loaders the trt latency backend uses
(lmopt.latency.tensorrt.build_engine_bytes), written atomically, and timed as trtexec
reports "GPU Compute Time" (CUDA events around batches of inferences, CUDA graph when possible,
median after warm-up). The equivalent trtexec command line is returned for the record.
Engines are specific to the GPU and TensorRT version they were built with: build on the target.

sparsity="2:4": the weights are pruned to 2:4 structured sparsity first (lmopt.passes.sparsity)
and the builder gets BuilderFlag.SPARSE_WEIGHTS (polygraphy CreateConfig(sparse_weights=True),
trtexec --sparsity=enable), so TensorRT may pick sparse Tensor Core kernels where they time faster.
"""
from __future__ import annotations

import os
import shlex
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from .errors import LmoptError
from .onnxio import atomic_write_bytes, load_model, save_model

SPARSITY_PATTERNS = ("2:4",)


@dataclass
class BuildResult:
    engine_path: Path
    trtexec: str
    tensorrt_version: str
    device: str
    precision: str
    median_ms: float | None = None
    notes: list[str] = field(default_factory=list)
    sparsity: dict | None = None  # sparsify_2_4's info when built with sparsity="2:4"


def require_tensorrt() -> None:
    """LmoptError (one line, naming what to install) unless TensorRT and a GPU are usable."""
    from .latency.tensorrt import trt_status

    reason = trt_status()
    if reason is not None:
        raise LmoptError(reason)


def trtexec_command(onnx_path: str | os.PathLike, engine_path: str | os.PathLike, fp16: bool = False,
                    workspace_mib: int | None = None, timing_cache: str | os.PathLike | None = None,
                    fp16_flag: bool = True, sparse: bool = False) -> str:
    """The trtexec command line equivalent to `lmopt build`.

    fp16_flag=False: TensorRT 11, precision in the ONNX; its trtexec is always strongly typed
    (--stronglyTyped is a deprecated no-op there). sparse: the ONNX weights are already 2:4 sparse
    (--sparsity=enable; --sparsity=force would prune them itself, differently).
    """
    args = ["trtexec", f"--onnx={onnx_path}", f"--saveEngine={engine_path}"]
    if fp16 and fp16_flag:
        args.append("--fp16")
    if sparse:
        args.append("--sparsity=enable")
    if workspace_mib:
        args.append(f"--memPoolSize=workspace:{int(workspace_mib)}M")
    if timing_cache:
        args.append(f"--timingCacheFile={timing_cache}")
    return " ".join(shlex.quote(a) for a in args)


def time_engine(engine_bytes: bytes, warmup_s: float = 0.2, runs: int = 100, min_time_s: float = 1.0,
                max_time_s: float = 10.0) -> float:
    """Median GPU compute time (ms) of one inference of a serialized engine."""
    from .latency.tensorrt import EngineSession

    session = EngineSession(engine_bytes)
    try:
        session.run_timed(1)
        deadline = time.perf_counter() + warmup_s
        while time.perf_counter() < deadline:
            session.run_timed(1)
        samples: list[float] = []
        start = time.perf_counter()
        while True:
            samples += session.run_timed(10)
            elapsed = time.perf_counter() - start
            if (len(samples) >= runs and elapsed >= min_time_s) or elapsed >= max_time_s:
                break
        return float(statistics.median(samples))
    finally:
        session.close()


def _sparsify(model: onnx.ModelProto, model_path: Path,
              engine_path: Path) -> tuple[onnx.ModelProto, dict, Path, list[str]]:
    """(2:4 sparse model, sparsify_2_4's info, where the sparse ONNX goes, notes for the user)."""
    from .passes.sparsity import sparsify_2_4

    onnx_path = engine_path.with_suffix(".sparse.onnx")
    if onnx_path.resolve() == model_path.resolve():
        raise LmoptError(f"the sparse model would be written over the input model {model_path}: "
                         "choose another engine name")
    model, info = sparsify_2_4(model)
    weights = len({e["weight"] for e in info["sparsified"]})
    tensors = f"{weights} weight tensor" + ("s" if weights != 1 else "")
    notes = [f"2:4 sparsity: {tensors} pruned ({info['params_pruned']:,} of the model's {info['params_model']:,} "
             f"weights set to zero), {len(info['skipped'])} layers left dense; the sparse model is {onnx_path}",
             "the weights were pruned by magnitude without fine-tuning: check the sparse model's accuracy; "
             "TensorRT uses sparse kernels only where they time faster (Ampere and newer GPUs): compare the "
             "latency with a build without --sparsity"]
    if not weights:
        notes = [f"2:4 sparsity: no layer could be pruned ({len(info['skipped'])} left dense): the engine is dense"]
    return model, info, onnx_path, notes


def build_engine(model_path: str | os.PathLike, engine_path: str | os.PathLike, fp16: bool = False,
                 workspace_mib: int | None = None, timing_cache: str | os.PathLike | None = None,
                 measure: bool = True, sparsity: str | None = None) -> BuildResult:
    """Build `model_path` into a TensorRT engine at `engine_path` and (optionally) time it.

    sparsity="2:4": prune the weights to 2:4 structured sparsity (written next to the engine as
    .sparse.onnx) and let TensorRT use sparse kernels for them."""
    if sparsity is not None and sparsity not in SPARSITY_PATTERNS:
        raise LmoptError(f"sparsity {sparsity!r} is not supported (supported: {', '.join(SPARSITY_PATTERNS)})")
    require_tensorrt()
    from .latency import cudart
    from .latency.tensorrt import build_engine_bytes, has_precision_flags, set_polygraphy_severity, trt_version

    model = load_model(model_path)
    engine_path = Path(engine_path)
    precision = "fp16" if fp16 else "fp32"
    flags = has_precision_flags()
    onnx_for_trtexec = Path(model_path)
    notes: list[str] = []
    info = None
    if sparsity:
        model, info, onnx_for_trtexec, notes = _sparsify(model, Path(model_path), engine_path)
    set_polygraphy_severity("WARNING")
    engine_bytes, parsed = build_engine_bytes(model, precision, workspace_mib, timing_cache, fp16_io=False,
                                              sparse_weights=bool(sparsity))
    atomic_write_bytes(engine_path, engine_bytes)
    if sparsity:
        save_model(model, onnx_for_trtexec)
    if fp16 and not flags:
        # TensorRT 11: the fp16 precision is in the converted ONNX; keep it so the trtexec line reproduces the build.
        onnx_for_trtexec = engine_path.with_suffix(".fp16.onnx")
        save_model(parsed, onnx_for_trtexec)
        notes.append(f"TensorRT {trt_version()} has no FP16 builder flag: the fp16 model TensorRT parsed "
                     f"was written to {onnx_for_trtexec}")
    result = BuildResult(
        engine_path=engine_path,
        trtexec=trtexec_command(onnx_for_trtexec, engine_path, fp16, workspace_mib, timing_cache, fp16_flag=flags,
                                sparse=bool(sparsity)),
        tensorrt_version=trt_version(),
        device=cudart.device_name(),
        precision=precision,
        notes=notes,
        sparsity=info,
    )
    if measure:
        result.median_ms = time_engine(engine_bytes)
    return result
