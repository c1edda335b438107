"""The first stage: a canonical model, its chains and the candidate blocks every later stage reads."""
from __future__ import annotations

from dataclasses import dataclass, field

import onnx
import onnx_graphsurgeon as gs

from .algebra import LayerSpec
from .analysis import Analysis, analyse
from .blocks import block_model
from .candidates import Candidate, enumerate_candidates
from .errors import LmoptError
from .loader import canonicalise
from .outputs import output_kind, primary_first
from .passes.merge import rewrite_block
from .select import METHODS, method_filter
from .symbolic import with_node_names


@dataclass
class Prepared:
    """A canonical model with its analysis and candidate blocks."""
    model: onnx.ModelProto
    steps: dict  # what canonicalisation did, by pass
    analysis: Analysis
    candidates: list[Candidate]
    method: str
    output_order: list[str] = field(default_factory=list)  # the source's outputs (the primary is moved first)

    @property
    def kind(self) -> str | None:
        """How the primary output is compared: "embedding", or None (classifier or plain values)."""
        return output_kind(self.model, self.model.graph.output[0].name)

    @property
    def chain_lengths(self) -> dict[int, int]:
        return {c.index: len(c) for c in self.analysis.chains}


def prepare(source: str | onnx.ModelProto, input_shapes: dict | None = None, max_kernel: int = 7,
            method: str = "layermerge") -> Prepared:
    """Canonicalise `source`, find its chains and the candidates `method` may use."""
    if method not in METHODS:
        raise LmoptError(f"unknown method {method!r} (choose from: {', '.join(METHODS)})")
    model, steps = canonicalise(with_node_names(source), input_shapes)
    order = primary_first(model)
    analysis = analyse(model)
    if not analysis.chains:
        raise LmoptError("no chain of linear layers (Conv, Gemm, MatMul with constant weights) found: nothing to "
                         "optimize")
    candidates = [c for c in enumerate_candidates(analysis, gs.import_onnx(model), max_kernel=max_kernel, low_rank=True)
                  if method_filter(method, c)]
    return Prepared(model, steps, analysis, candidates, method, order)


def candidate_graph(prepared: Prepared, cand: Candidate, operator: LayerSpec | None = None) -> gs.Graph:
    """The whole model with one candidate rewritten (with refit weights `operator`, where given)."""
    graph = gs.import_onnx(prepared.model)
    if not cand.is_original:
        rewrite_block(graph, prepared.analysis.chains[cand.chain], cand, operator)
    return graph


def block_of(prepared: Prepared, cand: Candidate, graph: gs.Graph) -> onnx.ModelProto:
    """The candidate's block of `graph` as a standalone model (what is timed)."""
    chain = prepared.analysis.chains[cand.chain]
    return block_model(graph, chain.positions[cand.start], chain.positions[cand.end], like=prepared.model)


def chain_models(prepared: Prepared) -> dict[str, onnx.ModelProto]:
    """Each whole chain as one standalone model, keyed `chain:N`: what calibrates block boundaries."""
    graph = gs.import_onnx(prepared.model)
    return {f"chain:{c.index}": block_model(graph, c.positions[0], c.positions[-1], like=prepared.model)
            for c in prepared.analysis.chains}
