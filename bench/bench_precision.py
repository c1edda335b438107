"""Precision stacked on depth: INT8 alone, depth alone and both, on real ImageNet-pretrained CNNs,
with calibration and evaluation images from different sources (bench/image_data.py).

    python bench/bench_precision.py [--models efficientnet_lite0] [--targets 1.5 2 3] [--threads 2]

One lmopt Study per model at `--precision int8` (block latencies timed after static QDQ quantization
with lmopt.quantize's settings) serves every target. For each target the report gives, measured
interleaved in one process against the fp32 original: INT8 alone (the original quantized the same
way), depth alone (the plan before quantization) and both (the written model), with the fidelity of
each on the evaluation images. Needs `pip install -e '.[bench]'`.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_accuracy import add_run_arguments, markdown, row, study_of, write_markdown  # noqa: E402


def bench_model(name: str, args) -> list[dict]:
    started = time.perf_counter()
    study, _, _ = study_of(name, args, precision="int8")
    print(f"{name}: int8 study {time.perf_counter() - started:.0f} s, precision gain (measured whole) "
          f"{study.latency.precision_gain:.2f}x", flush=True)
    rows = []
    for target in args.targets:
        _, report = study.plan(target, rounds=args.rounds)
        (args.out / f"{name}_int8_{target:g}.json").write_text(json.dumps(report.to_json(), indent=1, default=str))
        parts, changes = report.speedup_parts, len(report.changes)
        if not rows:
            rows.append(row(name, "int8 alone", None, report.baselines["int8 alone"], parts.get("precision")))
        rows.append(row(name, "depth alone (the plan in fp32)", target, report.fidelity_before["quantization"],
                        parts.get("depth"), changes=changes))
        rows.append(row(name, "depth + int8", target, report.fidelity, report.measured_speedup,
                        report.predicted_speedup, changes))
        print(markdown(rows[-2:]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_arguments(parser, ["efficientnet_lite0"], [1.5, 2.0, 3.0], 1, "precision")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    write_markdown([r for name in args.models for r in bench_model(name, args)], args.out / "precision.md")


if __name__ == "__main__":
    main()
