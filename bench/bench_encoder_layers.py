"""Probe for whole-layer candidates: each all-MiniLM-L6-v2 layer replaced by the identity or by a linear
map fitted by ridge regression from its input to its output (TOAST's training-free replacement).

    python bench/bench_encoder_layers.py [--data bench/out/encoder_data] [--fit-count 256]

Reads what bench/bench_encoder.py wrote (the exported model, calib.npz, eval.npz); needs no torch.
For each layer and replacement: mean and minimum cosine similarity of the sentence embeddings on the
evaluation sentences, and the latency of the whole model with that layer replaced (ORT CPU, 2
threads, interleaved with the original, medians of 100 runs). lmopt offers these candidates as segments
(lmopt.segments, chosen by the DP beside the blocks inside them); this probe measures each one alone.
"""
from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np
import onnx_graphsurgeon as gs

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lmopt.calib import load_calibration  # noqa: E402
from lmopt.graph import replace_uses, to_model  # noqa: E402
from lmopt.inputs import real_tokens  # noqa: E402
from lmopt.prepare import prepare  # noqa: E402
from lmopt.repair import run_with_outputs  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from bench_encoder import bench_session, time_pair  # noqa: E402

LAYERS = 6


def replaced(model, x_name: str, y_name: str, fit: tuple[np.ndarray, np.ndarray] | None):
    """`model` with tensor y computed from x as the identity (fit None) or x @ W + b (ridge on `fit`)."""
    graph = gs.import_onnx(model)
    tensors = graph.tensors()
    x, y = tensors[x_name], tensors[y_name]
    new = gs.Variable("probe_out", dtype=np.float32)
    if fit is None:
        graph.nodes.append(gs.Node("Identity", "probe_identity", {}, [x], [new]))
    else:
        inputs = np.concatenate([fit[0], np.ones((len(fit[0]), 1))], 1)
        gram = inputs.T @ inputs
        solution = np.linalg.solve(gram + 1e-3 * np.trace(gram) / len(gram) * np.eye(len(gram)), inputs.T @ fit[1])
        middle = gs.Variable("probe_mm", dtype=np.float32)
        weight = gs.Constant("probe_weight", solution[:-1].astype(np.float32))
        bias = gs.Constant("probe_bias", solution[-1].astype(np.float32))
        graph.nodes.append(gs.Node("MatMul", "probe_matmul", {}, [x, weight], [middle]))
        graph.nodes.append(gs.Node("Add", "probe_add", {}, [middle, bias], [new]))
    replace_uses(y, new)
    return to_model(graph, like=model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT / "bench" / "out" / "encoder_data"))
    parser.add_argument("--fit-count", type=int, default=256)
    parser.add_argument("--seq", type=int, default=32)
    args = parser.parse_args()
    data = pathlib.Path(args.data)
    shapes = {name: [1, args.seq] for name in ("input_ids", "attention_mask", "token_type_ids")}
    prepared = prepare(data / "all-MiniLM-L6-v2.onnx", shapes)
    model, chains = prepared.model, prepared.analysis.chains
    # five chains per layer (query, key, value, attention output, MLP); a layer reads the tensor its
    # query projection reads and ends where the next layer reads, or at its last LayerNorm
    inputs = [chains[5 * i].units[0].input for i in range(LAYERS)]
    last = next(n.output[0] for n in model.graph.node
                if n.name.startswith(f"/bert/encoder/layer.{LAYERS - 1}/output/LayerNorm"))
    outputs = inputs[1:] + [last]
    fit_feeds = load_calibration(data / "calib.npz", model)[:args.fit_count]
    eval_feeds = load_calibration(data / "eval.npz", model)
    values = run_with_outputs(model, fit_feeds, inputs + [last])[1:]
    keep = real_tokens(fit_feeds, values[0].shape)
    output = model.graph.output[0].name
    reference = np.concatenate([bench_session(model).run([output], f)[0] for f in eval_feeds])
    print("| layer | replaced by | cosine mean | cosine min | latency (original -> replaced) |")
    print("|---|---|---|---|---|")
    for i in range(LAYERS):
        for kind in ("identity", "linear"):
            fit = None if kind == "identity" else (values[i][keep].astype(np.float64),
                                                   values[i + 1][keep].astype(np.float64))
            probe = replaced(model, inputs[i], outputs[i], fit)
            sess = bench_session(probe)
            new = np.concatenate([sess.run([output], f)[0] for f in eval_feeds])
            cos = (new * reference).sum(1) / np.linalg.norm(new, axis=1) / np.linalg.norm(reference, axis=1)
            before, after = time_pair(model, probe, eval_feeds[0], runs=100, warmup=10)
            print(f"| {i} | {kind} | {cos.mean():.4f} | {cos.min():.4f} | {before:.2f} -> {after:.2f} ms "
                  f"({before / after:.2f}x) |", flush=True)


if __name__ == "__main__":
    main()
