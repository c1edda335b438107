"""The first stage: a canonical model, its chains and the candidate blocks every later stage reads."""
from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import onnx
import onnx_graphsurgeon as gs

from .algebra import LayerSpec
from .analysis import Analysis, analyse
from .apply import apply_candidates
from .blocks import block_model
from .candidates import Candidate, enumerate_candidates
from .errors import LmoptError
from .inputs import timing_shapes, with_timing_shapes
from .loader import canonicalise
from .onnxio import without_value_info
from .outputs import output_kind, primary_first
from .passes.merge import rewrite_block
from .segments import Segment, find_segments, rewrite_segment
from .select import METHODS, method_filter
from .symbolic import timing_twin, with_node_names


@dataclass
class Prepared:
    """A canonical model with its analysis and candidate blocks."""
    model: onnx.ModelProto
    steps: dict  # what canonicalisation did, by pass
    analysis: Analysis
    candidates: list[Candidate]
    method: str
    output_order: list[str] = field(default_factory=list)  # the source's outputs (the primary is moved first)
    segments: list[Segment] = field(default_factory=list)  # whole-layer candidates (see lmopt.segments)
    twin: onnx.ModelProto | None = None  # what whole-model timings run, if not `model` (symbolic.timing_twin)

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
    named = with_node_names(source)  # canonicalise copies it; the timing twin reads it too
    model, steps = canonicalise(named, input_shapes)
    order = primary_first(model)
    analysis = analyse(model)
    if not analysis.chains:
        raise LmoptError("no chain of linear layers (Conv, Gemm, MatMul with constant weights) found: nothing to "
                         "optimize")
    candidates = [c for c in enumerate_candidates(analysis, gs.import_onnx(model), max_kernel=max_kernel, low_rank=True)
                  if method_filter(method, c)]
    segments = [s for s in find_segments(model, analysis) if method_filter(method, s)]
    twin = timing_twin(named, model, analysis, {t for s in segments for t in (s.start, s.end)})
    return Prepared(model, steps, analysis, candidates, method, order, segments, twin)


def candidate_graph(prepared: Prepared, cand: Candidate | Segment, operator: LayerSpec | None = None) -> gs.Graph:
    """The whole model with one candidate or segment rewritten (with refit weights, or a segment's
    fitted map, `operator`, where given)."""
    graph = gs.import_onnx(prepared.model)
    if isinstance(cand, Segment):
        rewrite_segment(graph, cand, operator)
    elif not cand.is_original:
        rewrite_block(graph, prepared.analysis.chains[cand.chain], cand, operator)
    return graph


def timing_base(prepared: Prepared, runner) -> onnx.ModelProto:
    """The model whole-model timings on `runner` run: the timing twin where there is one and the
    runner times symbolic input dims, else the canonical model. At int8 the model is written at its
    fixed shapes (quantized), so it is timed at them."""
    if prepared.twin is not None and runner.times_symbolic_inputs and runner.precision == "fp32":
        return prepared.twin
    return prepared.model


def whole_with(base: onnx.ModelProto, analysis: Analysis, changes: list, operators: dict | None = None):
    """What is timed of `base` (see timing_base) with `changes` applied: from the timing twin, with its
    timing shapes and without inner shapes, as lmopt writes it (see onnxio.without_value_info)."""
    changed = apply_candidates(base, analysis, changes, operators) if changes else base
    shapes = timing_shapes(base)
    return without_value_info(with_timing_shapes(changed, shapes)) if shapes else changed  # a copy: base stays


def segment_models(prepared: Prepared, base: onnx.ModelProto) -> dict[str, Callable[[], onnx.ModelProto]]:
    """Builders of `base` with each segment replaced, keyed by segment: what times a segment (a segment
    removes work no block holds, such as attention's softmax and its LayerNorm). Builders, not models:
    a whole model per segment of a large network does not fit in memory at once."""
    return {s.key: functools.partial(whole_with, base, prepared.analysis, [s]) for s in prepared.segments}


def block_of(prepared: Prepared, cand: Candidate, graph: gs.Graph) -> onnx.ModelProto:
    """The candidate's block of `graph` as a standalone model (what is timed)."""
    chain = prepared.analysis.chains[cand.chain]
    return block_model(graph, chain.positions[cand.start], chain.positions[cand.end], like=prepared.model)


def chain_models(prepared: Prepared) -> dict[str, onnx.ModelProto]:
    """Each whole chain as one standalone model, keyed `chain:N`: what calibrates block boundaries."""
    graph = gs.import_onnx(prepared.model)
    return {f"chain:{c.index}": block_model(graph, c.positions[0], c.positions[-1], like=prepared.model)
            for c in prepared.analysis.chains}
