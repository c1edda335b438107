"""Apply a set of disjoint candidates (a plan's changes) to a canonical model: the application stage."""
from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs

from .analysis import Analysis
from .candidates import Candidate
from .passes.cleanup import finish
from .passes.merge import rewrite_block
from .segments import Segment, rewrite_segment


def apply_candidates(model: onnx.ModelProto, analysis: Analysis, candidates: list[Candidate | Segment],
                     operators: dict | None = None) -> onnx.ModelProto:
    """Rewrite every non-original candidate and segment (with refit weights from `operators`, by
    candidate key, where given); the rest of the graph is untouched."""
    graph = gs.import_onnx(model)
    operators = operators or {}
    for cand in candidates:
        if isinstance(cand, Segment):
            rewrite_segment(graph, cand, operators.get(cand.key))
        elif not cand.is_original:
            rewrite_block(graph, analysis.chains[cand.chain], cand, operators.get(cand.key))
    return finish(graph, like=model)
