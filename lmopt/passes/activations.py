"""Activation removal: whatever read an activation's output reads its input instead.

`without_activations` is the model as a LayerMerge fine-tune leaves it (activations replaced by
Identity), before `lmopt merge` folds the layers that became adjacent."""
from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs

from ..analysis import Activation, Analysis, analyse
from ..graph import replace_uses
from .cleanup import finish


def remove_activation(graph: gs.Graph, act: Activation) -> None:
    tensors = graph.tensors()
    pre, post = tensors[act.input], tensors[act.output]
    if post in graph.outputs:
        # keep the graph output's name: the region's last node becomes an Identity
        post.inputs.clear()
        graph.nodes.append(gs.Node("Identity", f"lmopt/noact/{act.output}", {}, [pre], [post]))
        return
    replace_uses(post, pre)


def without_activations(model: onnx.ModelProto, analysis: Analysis | None = None,
                        units: set[tuple[int, int]] | None = None) -> onnx.ModelProto:
    """`model` with the activation of every chain unit removed, or of the (chain, k) in `units`."""
    graph = gs.import_onnx(model)
    for chain in (analysis or analyse(model)).chains:
        for k, unit in enumerate(chain.units, 1):
            if unit.act and (units is None or (chain.index, k) in units):
                remove_activation(graph, unit.act)
    return finish(graph, like=model)
