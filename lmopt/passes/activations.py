"""Remove chosen activations: whatever read the activation's output reads its input instead."""
from __future__ import annotations

import onnx_graphsurgeon as gs

from ..analysis import Activation
from ..loader import replace_uses


def remove_activation(graph: gs.Graph, act: Activation) -> None:
    tensors = graph.tensors()
    pre, post = tensors[act.input], tensors[act.output]
    if post in graph.outputs:
        # keep the graph output's name: the region's last node becomes an Identity
        post.inputs.clear()
        graph.nodes.append(gs.Node("Identity", f"lmopt/noact/{act.output}", {}, [pre], [post]))
        return
    replace_uses(post, pre)
