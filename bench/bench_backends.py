"""Time a few typical candidate blocks on every latency backend this machine has.

    python bench/bench_backends.py [--channels 64] [--size 56] [--batch 1] [--precision fp32]

Blocks: two 3x3 convs (each + ReLU), the same pair merged into one 5x5 conv (+ ReLU), and a
MobileNetV2-style 1x1 -> depthwise 3x3 -> 1x1 inverted residual next to its merged 3x3 form.
Prints per-backend medians and the merged/unmerged ratio: on a CPU the 5x5 is typically
slower than the two 3x3s, on a GPU at small batch merging tends to pay (DESIGN.md, Latency).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmopt.errors import LmoptError  # noqa: E402
from lmopt.latency import BACKENDS, get_backend  # noqa: E402
from lmopt.latency.base import backend_class  # noqa: E402
from lmopt.onnxio import DEFAULT_OPSET  # noqa: E402


def chain(batch, size, specs, name):
    """specs: list of (cin, cout, kernel, group, relu)."""
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i, (cin, cout, k, group, relu) in enumerate(specs):
        w = numpy_helper.from_array((rng.standard_normal((cout, cin // group, k, k)) * 0.1).astype(np.float32), f"w{i}")
        b = numpy_helper.from_array(np.zeros(cout, np.float32), f"b{i}")
        inits += [w, b]
        nodes.append(helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [f"c{i}"], pads=[k // 2] * 4, group=group))
        x = f"c{i}"
        if relu:
            nodes.append(helper.make_node("Relu", [x], [f"r{i}"]))
            x = f"r{i}"
    nodes.append(helper.make_node("Identity", [x], ["y"]))
    cin, cout = specs[0][0], specs[-1][1]
    graph = helper.make_graph(nodes, name,
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, cin, size, size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, cout, size, size])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", DEFAULT_OPSET)])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--size", type=int, default=56)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "fp16"])
    args = parser.parse_args()
    c, s, n = args.channels, args.size, args.batch
    blocks = {
        "3x3+3x3": chain(n, s, [(c, c, 3, 1, True), (c, c, 3, 1, True)], "two3x3"),
        "5x5 (merged)": chain(n, s, [(c, c, 5, 1, True)], "merged5x5"),
        "1x1-dw3x3-1x1": chain(n, s, [(c, 6 * c, 1, 1, True), (6 * c, 6 * c, 3, 6 * c, True), (6 * c, c, 1, 1, False)],
                               "ir"),
        "3x3 (merged IR)": chain(n, s, [(c, c, 3, 1, False)], "mergedir"),
    }
    for name in BACKENDS:
        reason = backend_class(name).available()
        if reason is not None:
            print(f"{name}: skipped ({reason})")
            continue
        try:
            backend = get_backend(name, precision=args.precision)
        except LmoptError as exc:
            print(f"{name}: skipped ({exc})")
            continue
        key = backend.cache_key()
        ms = dict(zip(blocks, backend.measure_interleaved(list(blocks.values()), rounds=20)))
        print(f"{name} on {key['device']} ({key['library']}, {args.precision}, batch {n}, {c}ch {s}x{s}):")
        for block, value in ms.items():
            print(f"  {block:18s} {value:8.3f} ms")
        print(f"  merge 3x3+3x3 -> 5x5: {ms['3x3+3x3'] / ms['5x5 (merged)']:.2f}x; "
              f"inverted residual -> 3x3: {ms['1x1-dw3x3-1x1'] / ms['3x3 (merged IR)']:.2f}x (>1 means merging pays)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
