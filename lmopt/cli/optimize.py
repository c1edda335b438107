"""`lmopt optimize`: make a model about TARGET times faster on a runtime, and prove it."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from ..calib import Preprocess, parse_floats
from ..dynamic import keep_dynamic_batch
from ..errors import LmoptError
from ..latency.base import BACKENDS
from ..latency.cache import LatencyCache
from ..loader import parse_input_shapes
from ..onnxio import atomic_write_text, check_writable, save_model
from ..select import METHODS, check_target
from .common import add_model_arguments, check_output, print_json


def parse_target(text: str) -> float:
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*[xX]?\s*", text)
    if not match:
        raise LmoptError(f"--target {text!r}: expected a speed-up factor such as 1.5 or 2x")
    return check_target(float(match.group(1)))


def add_backend_arguments(parser) -> None:
    parser.add_argument("--backend", choices=list(BACKENDS), default=None,
                        help="runtime whose latency counts (default: TensorRT with a GPU, else torch-cuda, else "
                             "ort-cpu)")
    parser.add_argument("--precision", choices=["fp32", "fp16", "int8"], default="fp32",
                        help="precision to time in and to write; int8 (ort-cpu): static QDQ quantization with "
                             "the calibration data, stacked on depth; the target is against the fp32 original")
    parser.add_argument("--threads", type=int, default=None, help="ort-cpu: intra-op threads (default: physical cores)")
    parser.add_argument("--max-kernel", type=int, default=7, help="largest merged kernel considered (default 7)")
    parser.add_argument("--no-cache", action="store_true", help="do not read or write the latency cache")


def backend_options(args) -> dict:
    options = {"precision": args.precision}
    if args.threads and (args.backend in (None, "ort-cpu")):
        options["threads"] = args.threads
    return options


def add_parser(subparsers):
    parser = subparsers.add_parser("optimize", help="compress a model to a speed-up target (LayerMerge DP)")
    add_model_arguments(parser)
    parser.add_argument("--target", required=True, help="speed-up to reach, e.g. 1.5 or 2x")
    parser.add_argument("-o", "--output", help="optimized model path (default: MODEL.lmopt.onnx)")
    parser.add_argument("--method", choices=METHODS, default="layermerge",
                        help="layermerge (default); kim2023: activation removal + merging only; prune: layer "
                             "pruning only")
    add_backend_arguments(parser)
    parser.add_argument("--latency-table", help="plan from a table written by `lmopt profile` (e.g. on a Jetson)")
    parser.add_argument("--calib", help="folder of images or .npy/.npz arrays (default: random inputs)")
    parser.add_argument("--calib-count", type=int, default=None,
                        help="calibration samples used (default 256; 16 random inputs without --calib): "
                             "the last half, at most 256, scores; up to 512 of the rest fit refits and "
                             "repairs; --distill trains on all of the rest")
    parser.add_argument("--eval", dest="eval_data", metavar="DATA",
                        help="evaluation data from other sources than --calib (folder of images or .npy/.npz); "
                             "default: a held-out part of --calib")
    parser.add_argument("--eval-count", type=int, default=None,
                        help="evaluation samples for the fidelity figures (default 256; 16 without --calib)")
    parser.add_argument("--mean", default="0.485,0.456,0.406", help="image preprocessing mean, on [0,1] pixels")
    parser.add_argument("--std", default="0.229,0.224,0.225", help="image preprocessing std")
    parser.add_argument("--layout", choices=["NCHW", "NHWC"], default="NCHW", help="image input layout")
    parser.add_argument("--no-refit", action="store_true",
                        help="keep the composed weights of merged layers "
                             "(default: least-squares refit on calibration data)")
    parser.add_argument("--repair", action="store_true",
                        help="closed-form repair in context after the plan is applied (off by default: on real "
                             "pretrained CNNs it moved held-out images away from the original, see bench/RESULTS.md)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="rounds of re-scoring the chosen changes in the context of the plan (default 2; 0: off)")
    parser.add_argument("--corrections", type=int, default=2,
                        help="times a plan that measures below the target (or over 4%% above it) is chosen again "
                             "on latencies fit to its measurement (default 2; 0: keep the first plan)")
    parser.add_argument("--distill", action="store_true",
                        help="label-free distillation from the original after repair (needs lmopt[torch])")
    parser.add_argument("--distill-minutes", type=float, default=10.0, help="time bound of --distill (default 10)")
    parser.add_argument("--no-measure", action="store_true", help="skip the end-to-end measurement")
    parser.add_argument("--json", nargs="?", const="-", metavar="PATH",
                        help="write the report as JSON (to PATH, or stdout)")
    parser.add_argument("--best-effort", action="store_true",
                        help="when the target is out of reach, write the fastest plan found and exit 0 "
                             "(default: say so and exit 1 without writing)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    return parser


def check_outputs(model: str, output: Path, json_path: str | None, use_cache: bool) -> None:
    """Every path this run will write, checked before any profiling."""
    check_output(model, output)
    if json_path not in (None, "-"):
        if Path(json_path).resolve() in (output.resolve(), Path(model).resolve()):
            raise LmoptError(f"--json {json_path}: would overwrite the model; choose another path")
        check_writable(json_path, "--json")
    if use_cache:
        LatencyCache().close()  # creates, checks (and repairs) the cache before any work


def run(args) -> int:
    from ..optimizer import optimize
    from ..report import format_report

    target = parse_target(args.target)
    if (args.calib_count is not None and args.calib_count < 1) or (args.eval_count is not None and args.eval_count < 1):
        raise LmoptError("--calib-count and --eval-count must be at least 1")
    if args.rounds < 0 or args.corrections < 0:
        raise LmoptError("--rounds and --corrections must be at least 0")
    output = Path(args.output) if args.output else Path(args.model).with_suffix(".lmopt.onnx")
    check_outputs(args.model, output, args.json, not args.no_cache)
    prep = Preprocess(parse_floats(args.mean, "--mean"), parse_floats(args.std, "--std"), args.layout)
    quiet_json = args.json == "-"
    model, report = optimize(
        args.model, target, method=args.method, backend=args.backend, calib=args.calib, preprocess=prep,
        calib_count=args.calib_count, eval_count=args.eval_count, eval_data=args.eval_data,
        repair=args.repair, distill_minutes=args.distill_minutes if args.distill else 0.0,
        input_shapes=parse_input_shapes(args.input_shape),
        latency_table=args.latency_table, max_kernel=args.max_kernel, cache_path=False if args.no_cache else None,
        measure=not args.no_measure, rounds=args.rounds, corrections=args.corrections, refit=not args.no_refit,
        progress=not args.quiet,
        backend_options=backend_options(args))
    if not report.target_met:
        reached = f"the fastest plan found gives about {report.predicted_speedup:.2f}x (predicted)"
        if not args.best_effort:
            raise LmoptError(f"target {target:g}x is out of reach: {reached}; nothing written "
                             "(--best-effort writes that plan)")
        print(f"lmopt optimize: target {target:g}x is out of reach: {reached}; writing it (--best-effort)",
              file=sys.stderr)
    model, report.batch = keep_dynamic_batch(model, args.model)
    save_model(model, output)
    report.written_to = str(output)
    if args.json:
        if quiet_json:
            print_json(report.to_json())
        else:
            atomic_write_text(args.json, json.dumps(report.to_json(), indent=2, default=str) + "\n")
    if not quiet_json:
        print(format_report(report))
        print(f"wrote {output} ({report.batch})")
    return 0
