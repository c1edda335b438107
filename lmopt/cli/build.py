"""`lmopt build`: build the deployment TensorRT engine for a model and report its latency."""
from __future__ import annotations

import argparse


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "build",
        help="build a TensorRT engine for deployment and time it",
        description="Build a TensorRT engine from an ONNX model (polygraphy loaders), write it atomically, "
                    "print the equivalent trtexec command and the engine's median GPU compute time. "
                    "Needs TensorRT and an NVIDIA GPU; engines only run on the GPU and TensorRT version "
                    "that built them.",
    )
    parser.add_argument("model", help="ONNX model (fixed input shapes)")
    parser.add_argument("-o", "--output", required=True, metavar="ENGINE", help="engine file to write")
    parser.add_argument("--fp16", action="store_true",
                        help="fp16 engine (TensorRT 10: the FP16 builder flag; TensorRT 11: an fp16 ONNX, "
                             "strongly typed)")
    parser.add_argument("--workspace", type=int, metavar="MiB", help="builder workspace limit in MiB")
    parser.add_argument("--timing-cache", metavar="PATH",
                        help="TensorRT timing cache to read and update (speeds up rebuilds)")
    parser.add_argument("--sparsity", choices=["2:4"],
                        help="prune the weights of MatMul/Gemm/Conv layers to 2:4 structured sparsity (the 2 "
                             "smallest of every 4 along the input channels, no fine-tuning; written next to the "
                             "engine as .sparse.onnx) and let TensorRT use sparse kernels (Ampere and newer)")
    parser.add_argument("--no-measure", action="store_true", help="build only, do not time the engine")
    return parser


def run(args) -> int:
    from ..engine import build_engine, require_tensorrt
    from ..errors import LmoptError
    from ..onnxio import check_writable

    if args.workspace is not None and args.workspace <= 0:
        raise LmoptError("--workspace must be a positive number of MiB")
    check_writable(args.output, "-o")
    require_tensorrt()  # one clear line before any work when TensorRT or the GPU is missing
    result = build_engine(args.model, args.output, fp16=args.fp16, workspace_mib=args.workspace,
                          timing_cache=args.timing_cache, measure=not args.no_measure, sparsity=args.sparsity)
    kind = result.precision + (f", {args.sparsity} sparse weights" if args.sparsity else "")
    print(f"engine: {result.engine_path} (TensorRT {result.tensorrt_version}, {result.device}, {kind})")
    for note in result.notes:
        print(f"note: {note}")
    print(f"trtexec equivalent: {result.trtexec}")
    if result.median_ms is not None:
        print(f"latency: {result.median_ms:.3f} ms median GPU compute time per inference")
    return 0
