"""Whole-layer candidates: a run of the network between two residual-stream tensors (a transformer
sublayer, or a whole layer) replaced by the identity or by a linear map fitted in closed form, as
TOAST does training-free.

The residual stream is found from the graph: the tensors residual shortcuts start from (plus the end
of the last chain), kept where every path from the first chain to the primary output passes through
them. A *region* lies between two consecutive such cuts with the same shape and holds whole chains
only; a segment is one region or two consecutive ones (a transformer layer: attention and MLP).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .algebra.linear import DenseSpec, identity_dense
from .algebra.refit import affine_fit, refit_dense
from .analysis import Analysis
from .blocks import downstream_nodes, upstream_nodes
from .passes.merge import rewrite_prefix

MODES = ("identity", "linear")
MAX_REGIONS = 2  # regions per segment


@dataclass(frozen=True)
class Segment:
    """A whole-layer candidate; like a Candidate, it has a key and is never the original."""
    start: str                 # the residual-stream tensor the segment reads
    end: str                   # the tensor it replaces (same shape)
    chains: tuple[int, ...]    # the chains inside it, a run of consecutive chain indices
    mode: str                  # "identity" or "linear"
    regions: int = 1           # how many regions it spans
    width: int = 0             # the last dim of start and end (the map's size)

    @property
    def key(self) -> str:
        return f"s{self.chains[0]}-{self.chains[-1]}/{self.mode}"

    @property
    def is_original(self) -> bool:
        return False


def _reaches_output_avoiding(start: gs.Tensor, cut: gs.Tensor, output: gs.Tensor) -> bool:
    """Whether some path from `start` to `output` avoids `cut`."""
    seen, stack = set(), [start]
    while stack:
        tensor = stack.pop()
        if tensor is output:
            return True
        if tensor is cut or id(tensor) in seen:
            continue
        seen.add(id(tensor))
        stack.extend(t for node in tensor.outputs for t in node.outputs)
    return False


def find_segments(model: onnx.ModelProto, analysis: Analysis) -> list[Segment]:
    """Every segment of the model's residual stream (none for a model without residual chains)."""
    chains = [c for c in analysis.chains if c.kind == "dense"]
    if not chains:
        return []
    graph = gs.import_onnx(model)
    graph.toposort()
    tensors = graph.tensors()
    order = {t.name: i for i, node in enumerate(graph.nodes) for t in node.outputs}
    output = graph.outputs[0]
    names = {u.skip.source for c in chains for u in c.units if u.skip is not None} | {chains[-1].positions[-1]}
    first = tensors[chains[0].positions[0]]
    order[first.name] = order.get(first.name, -1)
    cuts = sorted((n for n in names if n in tensors and n in order and order[n] >= order[first.name]
                   and not _reaches_output_avoiding(first, tensors[n], output)), key=order.get)
    layers = {c.index: [u.layer for u in c.units] for c in chains}
    node_ids = {n.name: id(n) for n in graph.nodes}
    regions = []  # (start, end, chains)
    for start, end in zip(cuts, cuts[1:]):
        inside = downstream_nodes(tensors[start]) & upstream_nodes([tensors[end]])
        held = [i for i, nodes in layers.items() if all(node_ids[n] in inside for n in nodes)]
        partial = [i for i, nodes in layers.items() if i not in held and any(node_ids[n] in inside for n in nodes)]
        regions.append((start, end, held if held and not partial else None))
    shapes = {name: tensors[name].shape for name in cuts}
    segments = []
    for first_region in range(len(regions)):
        for count in range(1, MAX_REGIONS + 1):
            span = regions[first_region:first_region + count]
            if len(span) < count or any(r[2] is None for r in span):
                break
            start, end = span[0][0], span[-1][1]
            held = sorted(i for r in span for i in r[2])
            if (shapes[start] != shapes[end] or not shapes[start] or not isinstance(shapes[start][-1], int)
                    or held != list(range(held[0], held[-1] + 1))):
                continue
            segments += [Segment(start, end, tuple(held), mode, count, int(shapes[start][-1])) for mode in MODES]
    return segments


def fit_linear(x: np.ndarray, y: np.ndarray) -> DenseSpec:
    """The map y ~ x W + b by ridge least squares, fitted as a correction of the identity (x + ...),
    so that the regulariser pulls towards the layer removed rather than towards zero. With too few
    rows for a full map (see algebra.refit), a per-channel scale and shift (a diagonal W), which
    still corrects what the identity gets most wrong in a post-norm network: the LayerNorm scale
    and bias of the segment's end against those of its start."""
    width = x.shape[-1]
    residual = refit_dense(identity_dense(width), x, y - x)
    if residual is None:
        scale, shift = affine_fit(x, y, channel_axis=-1)
        return DenseSpec(np.diag(scale), shift)
    return DenseSpec(residual.weight + np.eye(width), residual.bias)


def rewrite_segment(graph: gs.Graph, segment: Segment, operator: DenseSpec | None = None) -> None:
    """The segment's end computed from its start by the identity, or by `operator` (the fitted map;
    without one, a linear segment gets the identity's weights: right structure, for timing)."""
    tensors = graph.tensors()
    x, y = tensors[segment.start], tensors[segment.end]
    prefix = rewrite_prefix(segment)
    y.inputs.clear()  # detaches the old producer; the segment's nodes become dead and are cleaned up
    if segment.mode == "identity":
        graph.nodes.append(gs.Node("Identity", f"{prefix}Identity", {}, [x], [y]))
        return
    operator = operator or identity_dense(segment.width)
    dtype = y.dtype or np.float32
    product = gs.Variable(f"{prefix}matmul", dtype=dtype, shape=y.shape)
    weight = gs.Constant(f"{prefix}weight", operator.weight.astype(dtype))
    bias = gs.Constant(f"{prefix}bias", operator.bias.astype(dtype))
    graph.nodes.append(gs.Node("MatMul", f"{prefix}MatMul", {}, [x, weight], [product]))
    graph.nodes.append(gs.Node("Add", f"{prefix}bias_add", {}, [product, bias], [y]))
