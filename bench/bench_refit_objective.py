"""Does a better least-squares fit at a block's output mean a less damaged model? MBConv blocks of a
real CNN, each changed alone, four ways:

- `removed`: the whole residual branch removed (the block becomes the identity);
- `refit`: the depthwise conv pruned and the rest merged into one 1x1 conv, refit in closed form from
  the block's input to the original's block output (lmopt's candidate `c0:S-E/pM`);
- `mean`: the branch replaced by its per-channel mean on the fitting crops (the first moment of the
  block output kept, as bias correction keeps it after quantization);
- `alpha A`: identity + A * (refit - identity), the refit shrunk toward the removal.

For each: the squared error at the block's output on the fitting crops and on the held-out scoring
crops (other source images), and the damage lmopt ranks candidates by (KL + confidence-weighted
flips at the model's output, on the scoring crops). Nothing is timed.

    python bench/bench_refit_objective.py --model efficientnet_lite0 --fold 1 --blocks 12-15 21-24 27-30
"""
from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np
from bench_accuracy import ROOT, model_and_data

from models.efficientnet_lite import NAMES


def block_span(text: str) -> tuple[int, int]:
    """START-END positions of chain 0, e.g. 12-15."""
    try:
        start, end = map(int, text.split("-"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give a block as START-END, e.g. 12-15") from None
    return start, end


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="efficientnet_lite0", choices=list(NAMES))
    parser.add_argument("--fold", type=int, choices=(0, 1), default=1)
    parser.add_argument("--blocks", nargs="+", type=block_span,
                        default=[(12, 15), (21, 24), (27, 30), (30, 33), (36, 39)],
                        help="residual MBConv blocks of chain 0 as START-END positions (expand, depthwise, project)")
    parser.add_argument("--alphas", nargs="*", type=float, default=[0.25, 0.5, 0.75])
    parser.add_argument("--calib-count", type=int, default=512)
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "bench" / "out" / "refit_objective")
    args = parser.parse_args()
    args.more_calib_sources = args.extra_calib_sources = False
    args.out.mkdir(parents=True, exist_ok=True)
    from lmopt.algebra.linear import ConvSpec
    from lmopt.calib import study_data
    from lmopt.candidates import Candidate
    from lmopt.metrics import damage
    from lmopt.passes.merge import rewrite_prefix
    from lmopt.prepare import candidate_graph, prepare
    from lmopt.score import Refits, Scorer, chain_positions

    model_path, calib_path, eval_path = model_and_data(args.model, args)
    prepared = prepare(str(model_path), None, 7, "layermerge")
    data = study_data(prepared.model, str(calib_path), args.calib_count, None, None, str(eval_path), fitting=True)
    refits = Refits(prepared, data.fit)
    damage_scorer = Scorer(prepared.model, data.score, chain_positions(prepared), kind=prepared.kind)
    chain = prepared.analysis.chains[0]

    def output_damage(cand: Candidate, operator) -> float:
        graph = candidate_graph(prepared, cand, operator)
        return max(0.0, damage(damage_scorer.score(graph, rewrite_prefix(cand))))

    def layer_error(weight: np.ndarray, bias: np.ndarray, x: np.ndarray, y: np.ndarray) -> float:
        return float(((np.einsum("oc,nchw->nohw", weight, x) + bias[None, :, None, None] - y) ** 2).mean())

    print(f"{args.model} fold {args.fold}: {len(data.fit)} fitting and {len(data.score)} scoring batches")
    print("| block | C x HW | change | squared error, fitting crops | held-out crops | damage (held-out) |")
    print("|---|---|---|---|---|---|")
    for start, end in args.blocks:
        block = f"{start}-{end}"
        names = [chain.positions[start], chain.units[end - 1].pre_act]
        x_fit, y_fit = refits.activations(names)
        x_held, y_held = damage_scorer.values(names)
        removed = Candidate(0, start, end, tuple(range(start + 1, end + 1)))
        refit_cand = Candidate(0, start, end, (start + 2,))
        refit = refits.operator(refit_cand)
        if refit is None or refit.weight.shape[2:] != (1, 1):
            raise SystemExit(f"c0:{block}: pruning unit {start + 2} leaves no 1x1 layer to refit here (is it an "
                             "expand / depthwise / project block?)")
        weight, bias = refit.weight[:, :, 0, 0], refit.bias
        identity, zero = np.eye(len(bias)), np.zeros(len(bias))

        def one_by_one(w: np.ndarray, b: np.ndarray) -> ConvSpec:  # the refit's 1x1 layer with other weights
            return ConvSpec(w[:, :, None, None].astype(refit.weight.dtype), b.astype(refit.bias.dtype), refit.strides,
                            refit.pads_begin, refit.pads_end, refit.dilations, refit.group)

        branch_mean = (y_fit - x_fit).mean(axis=(0, 2, 3))
        rows = [("removed", identity, zero, output_damage(removed, None)),
                ("refit", weight, bias, output_damage(refit_cand, refit)),
                ("mean", identity, branch_mean, output_damage(refit_cand, one_by_one(identity, branch_mean)))]
        for alpha in args.alphas:
            shrunk_w, shrunk_b = identity + alpha * (weight - identity), alpha * bias
            shrunk = output_damage(refit_cand, one_by_one(shrunk_w, shrunk_b))
            rows.append((f"alpha {alpha:g}", shrunk_w, shrunk_b, shrunk))
        for label, w, b, value in rows:
            print(f"| c0:{block} | {len(bias)} x {x_held.shape[2]} | {label} | {layer_error(w, b, x_fit, y_fit):.3f} | "
                  f"{layer_error(w, b, x_held, y_held):.3f} | {value:.4f} |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
