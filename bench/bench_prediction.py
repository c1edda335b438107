"""Predicted against measured speed-up of plans for several targets, on the study's latency table
as profiled (before any fit to a measured plan), and how well a fit through one measured plan
predicts the others (profile.two_point_fit, as profile.fit_to_measured uses it). Each plan is also
predicted with the blocks' standalone boundaries shared equally among the chain's positions instead
of by tensor size (profile.boundary_corrected's by_size=False), for comparison.

    LMOPT_CACHE_DIR=... python bench/bench_prediction.py [--model efficientnet_lite1] [--threads 2]
        [--out bench/out/accuracy]

Builds the model and the fold-0 data as bench_accuracy does (64 calibration crops: only the plans'
latencies matter here).
"""
from __future__ import annotations

import argparse
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from image_data import write_sets  # noqa: E402

from models.efficientnet_lite import NAMES, image_size, save  # noqa: E402

TARGETS = (1.15, 1.25, 1.35, 1.5, 1.75, 2.0)


def main() -> None:
    from lmopt.optimizer import Study
    from lmopt.prepare import timing_base, whole_with
    from lmopt.profile import boundary_corrected, two_point_fit
    from lmopt.select import choose

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="efficientnet_lite1", choices=list(NAMES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "bench" / "out" / "accuracy")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model_path = args.out / f"{args.model}.onnx"
    if not model_path.exists():
        save(args.model, model_path)
    calib, evals = write_sets(args.out / f"{args.model}_data_fold0", image_size(args.model), (0.5,) * 3, (0.5,) * 3,
                              fold=0)
    study = Study(str(model_path), calib=str(calib), eval_data=str(evals), calib_count=64, eval_count=64,
                  progress=False, backend_options={"threads": args.threads})
    prepared, table = study.prepared, study.latency
    base = timing_base(prepared, study.runner)
    original_blocks = table.estimate_ms - table.fixed_ms
    equal = boundary_corrected(prepared.model, prepared.analysis, prepared.candidates, table.timed_ms,
                               table.chain_ms, by_size=False)
    equal_estimate = table.fixed_ms + sum(equal[c.key] for c in prepared.candidates if c.is_original)
    measured, errors = {}, {"by size (lmopt's)": [], "equal shares": []}
    print("| target | predicted | predicted, boundaries shared equally | measured |\n|---|---|---|---|")
    for target in TARGETS:
        plan = choose(table, prepared.chain_lengths, prepared.candidates, study.scores.damage, target, "layermerge",
                      prepared.segments)
        whole_ms, plan_ms = study.runner.measure_interleaved([whole_with(base, prepared.analysis, []),
                                                              whole_with(base, prepared.analysis, plan.changes)])
        speedup = whole_ms / plan_ms
        measured[target] = (plan.planned_ms, speedup)
        shared = equal_estimate / (table.fixed_ms + sum(equal.get(b.key, table.block_ms[b.key]) for b in plan.blocks))
        errors["by size (lmopt's)"].append(plan.predicted_speedup / speedup - 1)
        errors["equal shares"].append(shared / speedup - 1)
        print(f"| {target:g}x | {plan.predicted_speedup:.3f}x | {shared:.3f}x | {speedup:.3f}x |", flush=True)
    for form, values in errors.items():
        rms = (sum(e * e for e in values) / len(values)) ** 0.5
        print(f"{form}: prediction error rms {100 * rms:.1f}%, largest {100 * max(values, key=abs):+.1f}%")
    for anchor, (planned_ms, speedup) in measured.items():
        fit = two_point_fit(table.estimate_ms, original_blocks, table.estimate_ms / speedup, planned_ms)
        if fit is None:
            print(f"fit through {anchor:g}x: none")
            continue
        scale, fixed = fit
        predicted = " ".join(f"{t:g}x {table.estimate_ms / (fixed + scale * ms):.3f}/{s:.3f}"
                             for t, (ms, s) in measured.items())
        print(f"fit through {anchor:g}x: block scale {scale:.3f}; predicted/measured {predicted}")


if __name__ == "__main__":
    main()
