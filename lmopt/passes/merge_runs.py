"""`lmopt merge`'s rewrite: fold every run of linear layers that has no activation between them.

Runs whose zero padding makes the merge differ at the borders (see lmopt.algebra.linear) are
left alone unless allowed, but what merges exactly inside them still merges."""
from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs

from ..analysis import analyse
from ..apply import apply_candidates
from ..candidates import Candidate, merge_runs
from .merge import BlockBuilder


def merge_linear_runs(model: onnx.ModelProto,
                      allow_inexact: bool = False) -> tuple[onnx.ModelProto, list[dict], list[dict]]:
    """(merged model, merged runs, runs left alone) for a canonical model."""
    analysis = analyse(model)
    graph = gs.import_onnx(model)
    runs = merge_runs(analysis, graph)
    exact = {run.key: BlockBuilder(graph, analysis.chains[run.chain], run).is_exact() for run in runs}
    skipped = [run for run in runs if not exact[run.key] and not allow_inexact]
    chosen = [run for run in runs if run not in skipped]
    if skipped:  # what can still merge exactly inside the runs left alone
        inside = [r for r in merge_runs(analysis, graph, exact_only=True)
                  if any(s.chain == r.chain and s.start <= r.start and r.end <= s.end for s in skipped)]
        exact.update({r.key: BlockBuilder(graph, analysis.chains[r.chain], r).is_exact() for r in inside})
        chosen += [r for r in inside if exact[r.key]]
    merged = apply_candidates(model, analysis, chosen) if chosen else model

    def describe(run: Candidate) -> dict:
        layers = [u.layer for u in analysis.chains[run.chain].units[run.start:run.end]]
        return {"block": run.key, "layers": layers, "exact": exact[run.key]}

    return merged, [describe(r) for r in chosen], [describe(r) for r in skipped]
