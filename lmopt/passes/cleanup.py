"""Clean-up after rewriting: pass-through nodes, dead nodes, topological order, unique names."""
from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs

from ..graph import remove_passthrough_nodes, to_model, unique_node_names


def finish(graph: gs.Graph, like: onnx.ModelProto) -> onnx.ModelProto:
    remove_passthrough_nodes(graph)
    unique_node_names(graph)
    return to_model(graph, like=like)
