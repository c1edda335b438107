"""Optimize benchmark: predicted vs measured speed-up, fidelity and wall time per model, target
and method, on one backend (ONNX Runtime CPU by default). One Study per model scores and times
every candidate once; each (target, method) is then planned from it and measured end to end with
the original and the optimized model interleaved in one process.

    python bench/bench_optimize.py --models resnet34 mobilenetv2_1.0 --targets 1.25 1.5 2
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lmopt.latency.base import cpu_name, physical_cores  # noqa: E402
from lmopt.optimizer import Study  # noqa: E402
from lmopt.select import METHODS  # noqa: E402
from models.build import ensure_model  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet34", "mobilenetv2_1.0"])
    parser.add_argument("--targets", nargs="+", type=float, default=[1.25, 1.5, 2.0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--backend", default="ort-cpu")
    parser.add_argument("--calib-count", type=int, default=16)
    parser.add_argument("--warm", action="store_true", help="also time a second Study with the cache warm")
    parser.add_argument("--out", help="also write the markdown table here")
    args = parser.parse_args()

    lines = [f"command: python bench/{Path(__file__).name} {' '.join(sys.argv[1:])}",
             f"machine: {cpu_name()}, {physical_cores()} physical cores, backend {args.backend}", ""]
    lines.append("| model | target | method | predicted | measured | pred. error | top-1 agree | KL | nrmse "
                 "| changes |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|")
    timings = []
    for name in args.models:
        path = ensure_model(name)
        with tempfile.TemporaryDirectory() as cache_dir:  # cold: an empty latency cache
            cache = os.path.join(cache_dir, "latency.sqlite")
            started = time.perf_counter()
            study = Study(path, backend=args.backend, calib_count=args.calib_count, cache_path=cache,
                          progress=False)
            cold = time.perf_counter() - started
            warm = None
            if args.warm:
                started = time.perf_counter()
                Study(path, backend=args.backend, calib_count=args.calib_count, cache_path=cache,
                      progress=False)
                warm = time.perf_counter() - started
        timings.append((name, len(study.prepared.candidates), cold, warm))
        for target in args.targets:
            for method in args.methods:
                started = time.perf_counter()
                _, report = study.plan(target, method)
                fid = report.fidelity
                met = "" if report.target_met else " (best reachable)"
                lines.append(
                    f"| {name} | {target:g}x | {method} | {report.predicted_speedup:.2f}x{met} | "
                    f"{report.measured_speedup:.2f}x | {100 * report.prediction_error:+.1f}% | "
                    f"{100 * fid.get('top1_agreement', float('nan')):.1f}% | {fid.get('kl', float('nan')):.3f} | "
                    f"{fid['nrmse']:.3f} | {len(report.changes)} |")
                print(lines[-1], f"({time.perf_counter() - started:.0f} s)", flush=True)
    lines += ["", "| model | candidates | study, cold cache (s) | study, warm cache (s) |", "|---|---|---|---|"]
    lines += [f"| {n} | {c} | {cold:.0f} | {'' if warm is None else f'{warm:.0f}'} |" for n, c, cold, warm in timings]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
