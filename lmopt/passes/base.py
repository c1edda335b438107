"""Graph rewrites as passes, and a pipeline that runs them in order.

A pass takes a model and returns a `PassResult`: the model and whether it changed, the shape of
onnx-ir's `PassResult`, plus how many rewrites it made (for the report). lmopt's rewrites work on
onnx-graphsurgeon graphs in place (`GraphPass`); shape inference and onnxruntime probes work on
the ModelProto (`ModelPass`). The pipeline converts between the two only where consecutive passes
need different forms, so a run of graph passes shares one imported graph.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import onnx
import onnx_graphsurgeon as gs

from ..graph import to_graph, to_model


@dataclass
class PassResult:
    model: gs.Graph | onnx.ModelProto
    modified: bool
    count: int = 0  # rewrites made; what the report lists for the pass


@dataclass
class GraphPass:
    """A rewrite of an onnx-graphsurgeon graph: `rewrite(graph)` changes it in place and returns how
    many rewrites it made, or returns (new graph, count) when it had to rebuild the graph."""
    name: str
    rewrite: Callable[[gs.Graph], int | tuple[gs.Graph, int]]
    works_on = gs.Graph

    def __call__(self, graph: gs.Graph) -> PassResult:
        result = self.rewrite(graph)
        graph, count = result if isinstance(result, tuple) else (graph, result)
        return PassResult(graph, count > 0, count)


@dataclass
class ModelPass:
    """A step on the ModelProto: `run(model)` returns (model, count)."""
    name: str
    run: Callable[[onnx.ModelProto], tuple[onnx.ModelProto, int]]
    works_on = onnx.ModelProto

    def __call__(self, model: onnx.ModelProto) -> PassResult:
        model, count = self.run(model)
        return PassResult(model, count > 0, count)


def run_passes(passes: Sequence[GraphPass | ModelPass], model: onnx.ModelProto,
               like: onnx.ModelProto | None = None) -> tuple[onnx.ModelProto, dict[str, int]]:
    """Run `passes` in order on `model`: (the resulting ModelProto, rewrites made by each pass name).
    Exported graphs keep the opsets and IR version of `like` (default: `model`)."""
    like = like or model
    current: gs.Graph | onnx.ModelProto = model
    counts: dict[str, int] = {}
    for step in passes:
        if step.works_on is gs.Graph and isinstance(current, onnx.ModelProto):
            current = to_graph(current)
        elif step.works_on is onnx.ModelProto and isinstance(current, gs.Graph):
            current = to_model(current, like=like)
        result = step(current)
        current = result.model
        counts[step.name] = counts.get(step.name, 0) + result.count
    if isinstance(current, gs.Graph):
        current = to_model(current, like=like)
    return current, counts
