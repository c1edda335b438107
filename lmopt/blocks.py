"""Cut standalone models out of a graph: a candidate block for timing, a suffix for scoring."""
from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs

from .graph import remove_passthrough_nodes, to_model


def upstream_nodes(tensors: list[gs.Tensor]) -> set[int]:
    """ids of the nodes upstream of `tensors`."""
    seen: set[int] = set()
    stack = [n for t in tensors for n in t.inputs]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        stack.extend(n for t in node.inputs for n in t.inputs)
    return seen


def downstream_nodes(tensor: gs.Tensor) -> set[int]:
    """ids of the nodes downstream of `tensor`."""
    seen: set[int] = set()
    stack = list(tensor.outputs)
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        stack.extend(n for t in node.outputs for n in t.outputs)
    return seen


def boundary_tensors(nodes: list[gs.Node]) -> list[gs.Tensor]:
    """Non-constant tensors the nodes read but do not produce, in a stable order."""
    produced = {id(t) for n in nodes for t in n.outputs}
    seen, result = set(), []
    for node in nodes:
        for t in node.inputs:
            if isinstance(t, gs.Constant) or not t.name or id(t) in produced or id(t) in seen:
                continue
            if t.inputs and t.inputs[0].op == "Constant":
                continue
            seen.add(id(t))
            result.append(t)
    return result


def _extract(graph: gs.Graph, keep: set[int], outputs: list[str], like: onnx.ModelProto) -> onnx.ModelProto:
    sub = graph.copy()
    kept_names = {n.name for n in graph.nodes if id(n) in keep}
    nodes = [n for n in sub.nodes if n.name in kept_names]
    inputs = boundary_tensors(nodes)
    for t in inputs:
        t.inputs.clear()
    sub.nodes = nodes
    sub.inputs = inputs
    tensors = sub.tensors()
    sub.outputs = [tensors[name] for name in outputs]
    remove_passthrough_nodes(sub)  # as the final model will have them removed
    return to_model(sub, like=like)


def block_model(graph: gs.Graph, start: str, end: str, like: onnx.ModelProto) -> onnx.ModelProto:
    """The nodes that compute `end` from `start` (and from whatever else they read, such as a
    shortcut from before the block), as a model whose inputs are those tensors."""
    tensors = graph.tensors()
    keep = upstream_nodes([tensors[end]]) - upstream_nodes([tensors[start]])
    return _extract(graph, keep, [end], like)


def suffix_model(graph: gs.Graph, changed_prefix: str, like: onnx.ModelProto) -> onnx.ModelProto | None:
    """The nodes whose values a rewrite can change (the new nodes named `changed_prefix...` and
    everything downstream of them) that feed the first graph output, as a model whose inputs are
    the unchanged tensors they read. None when the rewrite does not reach the output."""
    output = graph.outputs[0]
    changed = [n for n in graph.nodes if n.name.startswith(changed_prefix)]
    keep = {id(n) for n in changed}
    for node in changed:
        for t in node.outputs:
            keep |= downstream_nodes(t)
    keep &= upstream_nodes([output])
    if not keep:
        return None
    return _extract(graph, keep, [output.name], like)
