"""Rewrite one candidate block of a chain as a single linear layer (plus its trailing activation).

The block's activations are dropped, pruned layers become identities (or their whole residual
branch disappears), residual shortcuts that start inside the block are folded into the merged
kernel, and a shortcut from before the block stays as an explicit Add.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..algebra import LayerSpec
from ..algebra.linear import (
    ConvSpec,
    DenseSpec,
    add_convs,
    add_dense,
    chain_is_exact,
    compose_convs,
    compose_dense,
    dense_from_gemm,
    identity_conv,
    identity_dense,
)
from ..algebra.lowrank import LowRankSpec, truncated
from ..analysis import Chain, Skip
from ..candidates import Candidate, branch_start, removed_branches
from ..graph import constant_values

Operator = ConvSpec | DenseSpec | str | None  # None: the identity (nothing merged yet); ZERO; MERGED
ZERO = "zero"  # the block contributes nothing from its input (a removed residual branch)
MERGED = "merged"  # a composed operator whose weights were not computed (BlockBuilder, composing off)


def layer_spec(node: gs.Node, bias_add: gs.Node | None = None) -> ConvSpec | DenseSpec:
    weight = constant_values(node.inputs[1])
    bias = constant_values(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else None
    if node.op == "Conv":
        n = weight.ndim - 2
        pads = node.attrs.get("pads", [0] * 2 * n)
        if node.attrs.get("auto_pad", "NOTSET") == "VALID":
            pads = [0] * 2 * n
        return ConvSpec(weight, bias, node.attrs.get("strides", [1] * n), pads[:n], pads[n:],
                        node.attrs.get("dilations", [1] * n), node.attrs.get("group", 1))
    if node.op == "Gemm":
        width = weight.shape[0] if node.attrs.get("transB", 0) else weight.shape[1]
        if bias is not None:
            bias = np.broadcast_to(bias.reshape(-1) if bias.size == width else bias, (width,))
        return dense_from_gemm(weight, bias, bool(node.attrs.get("transB", 0)),
                               node.attrs.get("alpha", 1.0), node.attrs.get("beta", 1.0))
    bias = constant_values(next(t for t in bias_add.inputs if constant_values(t) is not None)) if bias_add else None
    return DenseSpec(weight, None if bias is None else bias.reshape(-1))


class BlockBuilder:
    """Composes the linear operator of a block from x_start, with the graph's constants. With
    `composing` off it finds only the block's structure (whether anything of x_start survives, which
    skip stays explicit): what a rewrite with given weights needs, without the cost of composing."""

    def __init__(self, graph: gs.Graph, chain: Chain, cand: Candidate, composing: bool = True):
        self.graph, self.chain, self.cand, self.composing = graph, chain, cand, composing
        self.nodes = {n.name: n for n in graph.nodes}
        self.tensors = graph.tensors()
        first = self.tensors[chain.positions[cand.start]]
        self.in_shape = tuple(first.shape)
        self.channels = self.in_shape[1] if chain.kind == "conv" else self.in_shape[-1]

    def spec(self, name: str, bias_add: str | None = None) -> ConvSpec | DenseSpec:
        return layer_spec(self.nodes[name], self.nodes[bias_add] if bias_add else None)

    def identity(self) -> ConvSpec | DenseSpec:
        if self.chain.kind == "conv":
            return identity_conv(self.channels, len(self.in_shape) - 2)
        return identity_dense(self.channels)

    def compose(self, first: Operator, second: Operator) -> Operator:
        if first is None:
            return second
        if second is None:
            return first
        if not self.composing:
            return MERGED
        if self.chain.kind == "conv":
            return compose_convs(first, second, self.in_shape[2:])
        return compose_dense(first, second)

    def add(self, a: Operator, b: Operator) -> Operator:
        if not self.composing:
            return MERGED
        a = self.identity() if a is None else a
        b = self.identity() if b is None else b
        if self.chain.kind == "conv":
            return add_convs(a, b, self.in_shape[2:])
        return add_dense(a, b)

    def shortcut(self, skip: Skip, at_source: Operator) -> Operator:
        proj = self.spec(skip.projection) if skip.projection else None
        return self.compose(at_source, proj)

    def build(self) -> tuple[Operator | str, Skip | None]:
        """(operator from x_start or None for identity or ZERO, explicit Skip kept as an Add or None)."""
        chain, cand = self.chain, self.cand
        branches = set(removed_branches(chain, cand))
        at = {cand.start: None}
        current, explicit = None, None
        for k in range(cand.start + 1, cand.end + 1):
            unit = chain.units[k - 1]
            skip = unit.skip
            if k in branches:
                p = branch_start(chain, k)
                if skip.position is None:  # external shortcut: nothing of x_start survives
                    current, explicit = ZERO, skip
                else:
                    current = self.shortcut(skip, at[p])
            else:
                if k not in cand.pruned:
                    current = self.compose(current, self.spec(unit.layer, unit.bias_add))
                if skip is not None:
                    if skip.position is not None and skip.position >= cand.start:
                        current = self.add(current, self.shortcut(skip, at[skip.position]))
                    else:
                        explicit = skip  # only valid for the last unit (checked by enumeration)
            at[k] = current
        return current, explicit

    def is_exact(self) -> bool:
        """No activation removed, nothing pruned, and every kept conv after the first is unpadded."""
        chain, cand = self.chain, self.cand
        if cand.pruned or any(chain.units[k - 1].act for k in range(cand.start + 1, cand.end)):
            return False
        if chain.kind != "conv":
            return True
        specs = [self.spec(chain.units[k - 1].layer) for k in range(cand.start + 1, cand.end + 1)]
        return chain_is_exact(specs)


def rewrite_prefix(cand) -> str:
    """Name prefix of the nodes a rewrite (of a Candidate or a segments.Segment) creates: how scoring
    finds what changed."""
    return f"lmopt[{cand.key}]/"


def rewrite_block(graph: gs.Graph, chain: Chain, cand: Candidate, operator: LayerSpec | None = None) -> None:
    """Replace the producer of unit `end`'s pre-activation tensor by the merged block. `operator`
    overrides the merged layer's weights (a least-squares refit of the same shape)."""
    builder = BlockBuilder(graph, chain, cand, composing=operator is None)
    merged, explicit = builder.build()
    operator = merged if operator is None else operator
    if cand.rank and isinstance(operator, DenseSpec):
        operator = truncated(operator, cand.rank)
    tensors = builder.tensors
    x_in = tensors[chain.positions[cand.start]]
    target = tensors[chain.units[cand.end - 1].pre_act]
    dtype = target.dtype or np.float32
    prefix = rewrite_prefix(cand)

    skip_tensor = tensors[explicit.tensor] if explicit is not None else None
    target.inputs.clear()  # detaches the old producer; the old block becomes dead and is cleaned up
    if operator is ZERO or operator is None:
        source = skip_tensor if operator is ZERO else x_in
        if operator is None and skip_tensor is not None:
            graph.nodes.append(gs.Node("Add", f"{prefix}skip_add", {}, [x_in, skip_tensor], [target]))
        else:
            graph.nodes.append(gs.Node("Identity", f"{prefix}Identity", {}, [source], [target]))
        return
    value = target if skip_tensor is None else gs.Variable(f"{prefix}out", dtype=dtype, shape=target.shape)
    # Weights in the block's own float type: float32 weights in an fp16 model make it invalid.
    wdtype = constant_values(builder.nodes[chain.units[cand.start].layer].inputs[1]).dtype
    bias = gs.Constant(f"{prefix}bias", operator.bias.astype(wdtype))
    if isinstance(operator, LowRankSpec):
        _factored(graph, prefix, operator, x_in, bias, value, wdtype, dtype)
    elif isinstance(operator, ConvSpec):
        weight = gs.Constant(f"{prefix}weight", operator.weight.astype(wdtype))
        graph.nodes.append(gs.Node("Conv", f"{prefix}Conv", operator.onnx_attrs(), [x_in, weight, bias], [value]))
    elif len(x_in.shape) == 2:
        weight = gs.Constant(f"{prefix}weight", operator.weight.astype(wdtype))
        graph.nodes.append(gs.Node("Gemm", f"{prefix}Gemm", {}, [x_in, weight, bias], [value]))
    else:
        weight = gs.Constant(f"{prefix}weight", operator.weight.astype(wdtype))
        product = gs.Variable(f"{prefix}matmul", dtype=dtype, shape=target.shape)
        graph.nodes.append(gs.Node("MatMul", f"{prefix}MatMul", {}, [x_in, weight], [product]))
        graph.nodes.append(gs.Node("Add", f"{prefix}bias_add", {}, [product, bias], [value]))
    if skip_tensor is not None:
        graph.nodes.append(gs.Node("Add", f"{prefix}skip_add", {}, [value, skip_tensor], [target]))


def _factored(graph: gs.Graph, prefix: str, spec: LowRankSpec, x_in, bias, value, wdtype, dtype) -> None:
    """x -> first -> second (+ bias) -> value, as Gemms on 2-D inputs and MatMuls otherwise."""
    first = gs.Constant(f"{prefix}lowrank_first", spec.first.astype(wdtype))
    second = gs.Constant(f"{prefix}lowrank_second", spec.second.astype(wdtype))
    middle = gs.Variable(f"{prefix}lowrank_mid", dtype=dtype)
    if len(x_in.shape) == 2:
        graph.nodes.append(gs.Node("Gemm", f"{prefix}lowrank_a", {}, [x_in, first], [middle]))
        graph.nodes.append(gs.Node("Gemm", f"{prefix}lowrank_b", {}, [middle, second, bias], [value]))
        return
    product = gs.Variable(f"{prefix}lowrank_out", dtype=dtype)
    graph.nodes.append(gs.Node("MatMul", f"{prefix}lowrank_a", {}, [x_in, first], [middle]))
    graph.nodes.append(gs.Node("MatMul", f"{prefix}lowrank_b", {}, [middle, second], [product]))
    graph.nodes.append(gs.Node("Add", f"{prefix}bias_add", {}, [product, bias], [value]))
