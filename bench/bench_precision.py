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

from bench_accuracy import MEAN, STD, markdown  # noqa: E402
from image_data import write_sets  # noqa: E402

from models.efficientnet_lite import NAMES, image_size, save  # noqa: E402


def row(name: str, config: str, target, fidelity: dict, speedup, predicted=None, changes=None) -> dict:
    return {"model": name, "config": config, "target": target, "speedup": speedup, "predicted": predicted,
            "top1": fidelity["top1_agreement"], "confident": fidelity["confident_agreement"],
            "confident_n": fidelity["confident_count"], "top5": fidelity["top5_contains"], "kl": fidelity["kl"],
            "changes": changes, "minutes": None}


def bench_model(name: str, args) -> list[dict]:
    from lmopt.optimizer import Study

    out = args.out
    model_path = out / f"{name}.onnx"
    if not model_path.exists():
        save(name, model_path)
    calib_path, eval_path = write_sets(out / f"{name}_data", image_size(name), MEAN, STD)
    started = time.perf_counter()
    study = Study(str(model_path), calib=str(calib_path), eval_data=str(eval_path), calib_count=args.calib_count,
                  eval_count=args.eval_count, progress=False,
                  backend_options={"threads": args.threads, "precision": "int8"})
    print(f"{name}: int8 study {time.perf_counter() - started:.0f} s, precision gain (measured whole) "
          f"{study.latency.precision_gain:.2f}x", flush=True)
    rows = []
    for target in args.targets:
        _, report = study.plan(target, rounds=args.rounds)
        (out / f"{name}_int8_{target:g}.json").write_text(json.dumps(report.to_json(), indent=1, default=str))
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
    parser.add_argument("--models", nargs="+", default=["efficientnet_lite0"], choices=list(NAMES))
    parser.add_argument("--targets", nargs="+", type=float, default=[1.5, 2.0, 3.0])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--calib-count", type=int, default=256)
    parser.add_argument("--eval-count", type=int, default=384)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "bench" / "out" / "precision")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = [r for name in args.models for r in bench_model(name, args)]
    print("\n" + markdown(rows))
    (args.out / "precision.md").write_text(markdown(rows) + "\n")


if __name__ == "__main__":
    main()
