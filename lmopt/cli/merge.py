"""`lmopt merge`: fold every run of linear layers that has no activation between them."""
from __future__ import annotations

import numpy as np

from ..dynamic import keep_dynamic_batch
from ..errors import LmoptError
from ..inputs import random_feeds
from ..metrics import compare_named
from ..onnxio import load_model, save_model
from ..passes.merge_runs import merge_linear_runs
from ..report import format_op_table, op_table
from ..runtime import run_named
from .common import add_model_arguments, check_output, load_canonical, print_json

# An exact merge may differ by float rounding: this much relative to the largest output magnitude,
# or absolute when outputs are below 1 (a sigmoid map near 0 has rounding from much larger features).
EXACT_TOLERANCE = 1e-4


def add_parser(subparsers):
    parser = subparsers.add_parser(
        "merge", help="fold runs of linear layers with no activation between them (after fine-tuning)")
    add_model_arguments(parser)
    parser.add_argument("-o", "--output", required=True, help="where to write the merged model")
    parser.add_argument("--allow-inexact", action="store_true",
                        help="also merge runs whose zero padding makes the merge differ at the borders")
    parser.add_argument("--samples", type=int, default=4, help="random inputs used to verify (default 4)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    return parser


def run(args) -> int:
    if args.samples < 1:
        raise LmoptError("--samples must be at least 1")
    check_output(args.model, args.output)
    model, _ = load_canonical(args)
    merged, chosen, skipped = merge_linear_runs(model, args.allow_inexact)
    report = {"merged": chosen, "left_alone": skipped}
    if not chosen:  # still write -o, so that `lmopt merge in.onnx -o out.onnx && deploy out.onnx` works
        save_model(load_model(args.model), args.output)
        if args.json:
            print_json(report | {"output": args.output, "verified": True, "copy_of_input": True})
        else:
            print(f"{args.model}: nothing to merge" + (
                f" exactly ({len(skipped)} runs would be inexact at padded borders: --allow-inexact merges them)"
                if skipped else " (no run of linear layers without an activation between them)")
                + f"; wrote {args.output} as a copy of the input")
        return 0
    feeds = random_feeds(model, args.samples)
    reference = run_named(model, feeds)
    by_output = compare_named(reference, run_named(merged, feeds))
    worst = max(by_output.values(), key=lambda m: m["max_rel"])
    scale = max([1.0] + [float(np.abs(values).max()) for values in reference.values() if values.size])
    report["verification"] = worst
    report["outputs"] = by_output
    report["before"], report["after"] = op_table(model), op_table(merged)
    all_exact = all(r["exact"] for r in chosen)
    failed = all_exact and max(m["max_abs"] for m in by_output.values()) > EXACT_TOLERANCE * scale
    if not failed:
        written, report["batch"] = keep_dynamic_batch(merged, args.model)
        save_model(written, args.output)
    if args.json:
        print_json(report | {"output": None if failed else args.output, "verified": not failed})
    else:
        for run_info in chosen:
            note = "" if run_info["exact"] else "  (inexact at padded borders)"
            print(f"merged {run_info['block']}: {' + '.join(run_info['layers'])}{note}")
        for run_info in skipped:
            print(f"left alone {run_info['block']}: {' + '.join(run_info['layers'])} "
                  "(padding would make it inexact; --allow-inexact)")
        print(format_op_table(report["before"], report["after"]))
        border = "" if all_exact else " (includes border deviation of inexact merges)"
        for name, metrics in by_output.items():
            print(f"output {name} vs input model on {args.samples} random inputs: max abs {metrics['max_abs']:.3g}, "
                  f"max rel {metrics['max_rel']:.3g}{border}")
    if failed:
        raise LmoptError(f"verification failed: merged outputs differ by {worst['max_rel']:.3g} relative, "
                         f"{worst['max_abs']:.3g} absolute (> {EXACT_TOLERANCE}); nothing written")
    if not args.json:
        print(f"wrote {args.output} ({report['batch']})")
    return 0
