"""What `lmopt inspect` finds in every model of models/ and in the two pretrained classifiers,
and whether `lmopt merge` is exact on each zoo model once its activations are removed (the
deployment step after fine-tuning with activations replaced by Identity).

    python bench/bench_structure.py [--skip-merge]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


from lmopt.cli.inspect import summary  # noqa: E402
from lmopt.inputs import random_feeds  # noqa: E402
from lmopt.loader import canonicalise  # noqa: E402
from lmopt.metrics import compare  # noqa: E402
from lmopt.passes.activations import without_activations  # noqa: E402
from lmopt.passes.merge_runs import merge_linear_runs  # noqa: E402
from lmopt.runtime import run_outputs  # noqa: E402
from models.build import ensure_model  # noqa: E402
from models.pretrained import find_pretrained  # noqa: E402
from models.zoo import NAMES  # noqa: E402

PRETRAINED_SHAPES = {"text_direction": {"x": [1, 3, 48, 192]}, "doc_orientation": {"x": [1, 3, 224, 224]}}
LAYERMERGE = {"resnet34": "62 blocks / 150 entries", "mobilenetv2_1.0": "171 blocks / 391 entries"}




def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-merge", action="store_true")
    args = parser.parse_args()
    subjects = [(name, ensure_model(name), None) for name in NAMES]
    for name, shapes in PRETRAINED_SHAPES.items():
        path = find_pretrained(name)
        if path is not None:
            subjects.append((name, path, shapes))
    print(f"command: python bench/{Path(__file__).name} {' '.join(sys.argv[1:])}\n")
    print("| model | chains | layers on chains | residual spans | activations | blocks | candidates "
          "| LayerMerge paper |")
    print("|---|---|---|---|---|---|---|---|")
    merge_rows = []
    for name, path, shapes in subjects:
        model, steps = canonicalise(path, shapes)
        info = summary(model, steps, max_kernel=7)
        acts = ", ".join(f"{k} x{v}" for k, v in info["activations"].items())
        layers = sum(c["layers"] for c in info["chains"])
        print(f"| {name} | {len(info['chains'])} | {layers} | {info['residual_spans']} | {acts} | "
              f"{info['blocks']} | {info['candidates']} | {LAYERMERGE.get(name, '')} |", flush=True)
        if args.skip_merge or shapes is not None:
            continue
        started = time.perf_counter()
        linear = without_activations(model)
        merged, chosen, skipped = merge_linear_runs(linear, allow_inexact=False)
        feeds = random_feeds(linear, 2)
        metrics = compare(run_outputs(linear, feeds), run_outputs(merged, feeds))
        merge_rows.append(f"| {name} | {len(chosen)} | {len(skipped)} | {metrics['max_rel']:.2e} | "
                          f"{len(linear.graph.node)} -> {len(merged.graph.node)} "
                          f"| {time.perf_counter() - started:.0f} |")
    if merge_rows:
        print("\n`lmopt merge` (exact merges only) on each model with its activations removed, vs that model:\n")
        print("| model | runs merged exactly | maximal runs padding makes inexact (their exact parts are merged) "
              "| max rel. error | nodes | seconds |")
        print("|---|---|---|---|---|---|")
        print("\n".join(merge_rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
