"""Find the structure depth compression works on, from the graph alone (no architecture tables).

A *chain* is a path of linear layers (Conv, Gemm, MatMul with a constant weight) in which each
layer's output, after an optional residual Add and an optional activation, feeds the next layer.
Chain positions 0..L are the tensors between units: x_0 is the first layer's input, x_k the
output of unit k (after its activation). A *unit* is one layer plus what follows it up to the
next layer: bias Add (MatMul), residual Add (skip), activation.

All references are tensor and node *names*, so the analysis of a canonical model applies to any
fresh graph imported from that model.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import onnx
import onnx_graphsurgeon as gs

from .graph import constant_values

LINEAR_OPS = ("Conv", "Gemm", "MatMul")

# Element-wise ops that may make up an activation. Linear ones (Add, Mul, ...) only count when
# the region they form also holds a nonlinear op.
NONLINEAR_ELEMENTWISE = {
    "Relu", "Clip", "LeakyRelu", "PRelu", "HardSwish", "HardSigmoid", "Sigmoid", "Tanh", "Erf",
    "Gelu", "Elu", "Selu", "Celu", "Softplus", "Softsign", "Mish", "ThresholdedRelu", "Pow", "Max", "Min",
}
LINEAR_ELEMENTWISE = {"Add", "Sub", "Mul", "Div"}

# Recognised activation forms, keyed by the sorted op types of the region (exporters' spellings).
ACTIVATION_NAMES = {
    ("Relu",): "relu",
    ("LeakyRelu",): "leaky_relu",
    ("PRelu",): "prelu",
    ("HardSwish",): "hardswish",
    ("HardSigmoid", "Mul"): "hardswish",
    ("Add", "Clip", "Div", "Mul"): "hardswish",
    ("Add", "Clip", "Mul", "Mul"): "hardswish",
    ("Mul", "Sigmoid"): "silu",
    ("Gelu",): "gelu",
    ("Add", "Div", "Erf", "Mul", "Mul"): "gelu",
    ("Add", "Erf", "Mul", "Mul", "Mul"): "gelu",
    ("Add", "Add", "Mul", "Mul", "Mul", "Mul", "Pow", "Tanh"): "gelu_tanh",
    ("Add", "Add", "Mul", "Mul", "Mul", "Mul", "Mul", "Tanh"): "gelu_tanh",
    ("Sigmoid",): "sigmoid",
    ("Tanh",): "tanh",
    ("HardSigmoid",): "hardsigmoid",
    ("Elu",): "elu",
    ("Selu",): "selu",
    ("Softplus",): "softplus",
    ("Mish",): "mish",
}


@dataclass
class Activation:
    kind: str
    nodes: list[str]
    input: str
    output: str


@dataclass
class Skip:
    add: str                  # the residual Add node
    tensor: str               # the Add operand that is the shortcut
    source: str               # tensor the shortcut starts from (the projection's input, or `tensor`)
    projection: str | None    # linear node on the shortcut (a 1x1 projection), None for identity
    position: int | None = None  # chain position of `source`, None when it lies outside the chain
    # For a shortcut from outside the chain: whether the branch from `source` to the chain start
    # holds no linear layer, so removing the branch removes only this chain's prefix (a LayerNorm...)
    external_branch_removable: bool = False


@dataclass
class Unit:
    layer: str                # Conv / Gemm / MatMul node
    op: str
    bias_add: str | None      # Add of a constant bias after a MatMul
    skip: Skip | None
    act: Activation | None
    input: str                # x_{k-1}
    pre_act: str              # the tensor the activation reads (or the unit output when none)
    output: str               # x_k
    in_shape: tuple
    out_shape: tuple
    prunable: bool            # the layer can become an identity (same shape in and out)


@dataclass
class Chain:
    index: int
    kind: str                 # "conv" or "dense"
    units: list[Unit]

    @property
    def positions(self) -> list[str]:
        return [self.units[0].input] + [u.output for u in self.units]

    def __len__(self) -> int:
        return len(self.units)


@dataclass
class Analysis:
    chains: list[Chain]
    stops: dict[str, int] = field(default_factory=dict)         # non-linear ops that end chains
    unsupported: list[str] = field(default_factory=list)        # what lmopt cannot handle, and why
    activations: dict[str, int] = field(default_factory=dict)   # kinds found on chains

    def chain(self, index: int) -> Chain:
        return self.chains[index]


def shape_of(tensor: gs.Tensor) -> tuple:
    return tuple(tensor.shape) if tensor.shape is not None else ()


def _single_producer(tensor: gs.Tensor) -> gs.Node | None:
    return tensor.inputs[0] if len(tensor.inputs) == 1 else None


def linear_layer(node: gs.Node) -> tuple[bool, str | None]:
    """(is a mergeable linear layer, reason it is not when it is a linear op we cannot handle)."""
    if node.op not in LINEAR_OPS:
        return False, None
    if len(node.inputs) < 2 or constant_values(node.inputs[1]) is None:
        return False, f"{node.op} {node.name}: weight is not a constant"
    if len(node.inputs) > 2 and node.inputs[2].name and constant_values(node.inputs[2]) is None:
        return False, f"{node.op} {node.name}: bias is not a constant"
    if node.op == "Conv":
        if node.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
            return False, f"Conv {node.name}: auto_pad={node.attrs['auto_pad']} (re-export with explicit pads)"
        if len(shape_of(node.inputs[0])) < 3:
            return False, f"Conv {node.name}: input shape unknown"
    if node.op == "Gemm" and node.attrs.get("transA", 0):
        return False, f"Gemm {node.name}: transA=1 is not supported"
    if node.op == "Gemm" and len(node.inputs) > 2 and node.inputs[2].name:
        bias = constant_values(node.inputs[2])
        if bias.ndim == 2 and bias.shape[0] > 1:
            return False, f"Gemm {node.name}: a bias with one row per batch row is not a layer bias"
    if node.op == "MatMul":
        weight = constant_values(node.inputs[1])
        if weight.ndim != 2:
            return False, f"MatMul {node.name}: weight is not 2-D"
    return True, None


def _bias_add(node: gs.Node) -> gs.Node | None:
    """The Add(const) that carries a MatMul's bias, as exporters write `x @ W + b`."""
    out = node.outputs[0]
    if node.op != "MatMul" or len(out.outputs) != 1 or out.outputs[0].op != "Add":
        return None
    add = out.outputs[0]
    other = [t for t in add.inputs if t is not out]
    if len(other) != 1:
        return None
    bias = constant_values(other[0])
    width = constant_values(node.inputs[1]).shape[1]
    if bias is None or bias.size != width or bias.shape[-1] != width:
        return None
    return add


def _ancestors(tensor: gs.Tensor, limit: int = 400) -> set[int]:
    """ids of tensors upstream of `tensor` (inclusive), bounded for speed."""
    seen, stack = {id(tensor)}, [tensor]
    while stack and len(seen) < limit:
        current = stack.pop()
        for producer in current.inputs:
            for t in producer.inputs:
                if id(t) not in seen and not isinstance(t, gs.Constant):
                    seen.add(id(t))
                    stack.append(t)
    return seen


def _layer_tail(node: gs.Node) -> gs.Variable:
    """The layer's output after its bias Add, if any."""
    bias = _bias_add(node)
    return (bias or node).outputs[0]


def residual_adds(graph: gs.Graph) -> dict[str, tuple[str, Skip]]:
    """Map each residual Add to (main operand name, Skip). An operand is the shortcut when its
    source (itself, or the input of the single linear layer producing it) is upstream of the other."""
    result = {}
    for add in graph.nodes:
        if add.op != "Add" or len(add.inputs) != 2 or any(constant_values(t) is not None for t in add.inputs):
            continue
        a, b = add.inputs
        if shape_of(a) != shape_of(b):
            continue  # broadcasting adds are not residuals we can fold
        for main, short in ((a, b), (b, a)):
            upstream = _ancestors(main)
            producer = _single_producer(short)
            projection = None
            if id(short) in upstream:
                source = short
            elif (producer is not None and producer.op in LINEAR_OPS and linear_layer(producer)[0]
                  and len(short.outputs) == 1 and _layer_tail(producer) is short
                  and id(producer.inputs[0]) in upstream):
                projection, source = producer, producer.inputs[0]
            else:
                continue
            result[add.name] = (main.name, Skip(add.name, short.name, source.name,
                                                projection.name if projection is not None else None))
            break
    return result


def match_activation(tensor: gs.Variable, graph_outputs: set[str]) -> Activation | None:
    """The element-wise region that reads only `tensor` (and constants) and has one exit."""
    region: list[gs.Node] = []
    inside = {tensor.name}
    changed = True
    while changed:
        changed = False
        for name in list(inside):
            for consumer in _tensor_consumers(tensor, region, name):
                if consumer in region:
                    continue
                if consumer.op not in NONLINEAR_ELEMENTWISE | LINEAR_ELEMENTWISE:
                    continue
                variables = [t for t in consumer.inputs if t.name and constant_values(t) is None]
                if not all(t.name in inside for t in variables):
                    continue
                constants = [constant_values(t) for t in consumer.inputs if t.name and constant_values(t) is not None]
                if consumer.op != "PRelu" and any(c.size != 1 for c in constants):
                    continue
                region.append(consumer)
                inside.update(t.name for t in consumer.outputs)
                changed = True
    if not region or not any(n.op in NONLINEAR_ELEMENTWISE for n in region):
        return None
    if any(c not in region for c in tensor.outputs):
        return None  # the pre-activation tensor is also read elsewhere
    exits = [t for n in region for t in n.outputs
             if t.name in graph_outputs or any(c not in region for c in t.outputs)]
    if len(exits) != 1:
        return None
    ops = tuple(sorted(n.op for n in region))
    kind = ACTIVATION_NAMES.get(ops) or f"elementwise({'+'.join(ops)})"
    if ops == ("Clip",):
        low, high = _clip_bounds(region[0])
        kind = "relu6" if (low, high) == (0.0, 6.0) else ("relu" if low == 0.0 and high is None else "clip")
    return Activation(kind, [n.name for n in region], tensor.name, exits[0].name)


def _tensor_consumers(root: gs.Variable, region: list[gs.Node], name: str) -> list[gs.Node]:
    if name == root.name:
        return list(root.outputs)
    for node in region:
        for t in node.outputs:
            if t.name == name:
                return list(t.outputs)
    return []


def _clip_bounds(node: gs.Node) -> tuple[float | None, float | None]:
    if len(node.inputs) > 1:  # opset >= 11: bounds are inputs
        bounds = [constant_values(t) if t.name else None for t in node.inputs[1:3]]
        bounds += [None] * (2 - len(bounds))
        return tuple(float(b) if b is not None else None for b in bounds)
    return node.attrs.get("min"), node.attrs.get("max")


def _prunable(node: gs.Node, in_shape: tuple, out_shape: tuple) -> bool:
    if in_shape != out_shape or not in_shape:
        return False
    if node.op == "Conv":
        return all(s == 1 for s in node.attrs.get("strides", [1]))
    return True


@dataclass
class _GraphView:
    """An imported graph and what the unit and chain builders look up in it."""
    graph: gs.Graph
    tensors: dict[str, gs.Tensor]
    outputs: set[str]                           # graph output names
    residuals: dict[str, tuple[str, Skip]]      # residual_adds(graph)
    projections: set[str]                       # linear layers on shortcuts: not chain layers

    @classmethod
    def of(cls, model: onnx.ModelProto) -> _GraphView:
        graph = gs.import_onnx(model)
        residuals = residual_adds(graph)
        projections = {skip.projection for _, skip in residuals.values() if skip.projection}
        return cls(graph, graph.tensors(), {t.name for t in graph.outputs}, residuals, projections)


def analyse(model: onnx.ModelProto) -> Analysis:
    """Chains, activations, residual spans and stops of a canonical model."""
    view = _GraphView.of(model)
    layers, unsupported = _layers(view)
    units = {name: _build_unit(node, view) for name, node in layers.items()}
    chains = _chains(view, units)
    return Analysis(chains, _stops(view, chains), unsupported, _activation_kinds(chains))


def _layers(view: _GraphView) -> tuple[dict[str, gs.Node], list[str]]:
    """The chain layers (linear layers lmopt can merge, shortcut projections excepted) by name, and
    why each linear op lmopt cannot merge is not one."""
    layers, unsupported = {}, []
    for node in view.graph.nodes:
        ok, reason = linear_layer(node)
        if ok and node.name not in view.projections:
            layers[node.name] = node
        elif reason:
            unsupported.append(reason)
    return layers, unsupported


def _build_unit(node: gs.Node, view: _GraphView) -> Unit:
    """The layer with its bias Add, the residual Add it is the main operand of, and its activation."""
    tail = _layer_tail(node)
    bias = _bias_add(node)
    skip = None
    if len(tail.outputs) == 1 and tail.name not in view.outputs:
        add = tail.outputs[0]
        entry = view.residuals.get(add.name)
        if entry and entry[0] == tail.name:
            skip = entry[1]
            tail = add.outputs[0]
    pre_act = tail
    act = match_activation(tail, view.outputs) if tail.name not in view.outputs else None
    out = view.tensors[act.output] if act else tail
    in_shape, out_shape = shape_of(node.inputs[0]), shape_of(out)
    return Unit(node.name, node.op, bias.name if bias else None, skip, act, node.inputs[0].name,
                pre_act.name, out.name, in_shape, out_shape, _prunable(node, in_shape, out_shape))


def _successor(unit: Unit, units: dict[str, Unit], view: _GraphView) -> str | None:
    """The layer of the next unit on the chain: the only main-path reader of the unit's output,
    when it is a chain layer reading it as its input."""
    if unit.output in view.outputs:
        return None
    main = []
    for consumer in view.tensors[unit.output].outputs:
        if consumer.name in view.projections:
            continue
        entry = view.residuals.get(consumer.name)
        if entry and entry[1].tensor == unit.output:
            continue  # read as a shortcut
        main.append(consumer)
    if len(main) == 1 and main[0].name in units:
        nxt = units[main[0].name]
        if nxt.input == unit.output:
            return main[0].name
    return None


def _chains(view: _GraphView, units: dict[str, Unit]) -> list[Chain]:
    """Maximal runs of units, each followed from its first layer and split where the kind changes."""
    following = {name: _successor(u, units, view) for name, u in units.items()}
    has_predecessor = {n for n in following.values() if n}
    chains: list[Chain] = []
    order = [n.name for n in view.graph.nodes]  # graph order is topological after canonicalisation
    for name in order:
        if name not in units or name in has_predecessor:
            continue
        members = [units[name]]
        while following[members[-1].layer]:
            members.append(units[following[members[-1].layer]])
        for run in _same_kind_runs(members):
            chain = Chain(len(chains), "conv" if run[0].op == "Conv" else "dense", run)
            _place_skips(chain, view.tensors)
            chains.append(chain)
    return chains


def _same_kind_runs(members: list[Unit]) -> list[list[Unit]]:
    """`members` cut where Conv meets MatMul/Gemm: a chain's kind holds for all its units."""
    runs: list[list[Unit]] = []
    for unit in members:
        if runs and (runs[-1][0].op == "Conv") == (unit.op == "Conv"):
            runs[-1].append(unit)
        else:
            runs.append([unit])
    return runs


def _place_skips(chain: Chain, tensors: dict[str, gs.Tensor]) -> None:
    """Set each skip's chain position, and for shortcuts from outside the chain whether their
    branch is removable."""
    positions = {t: k for k, t in enumerate(chain.positions)}
    for k, unit in enumerate(chain.units, start=1):
        if unit.skip is None:
            continue
        p = positions.get(unit.skip.source)
        unit.skip.position = p if p is not None and p < k else None
        if unit.skip.position is None and unit.skip.projection is None:
            unit.skip.external_branch_removable = _plain_prefix(tensors, unit.skip.source, chain.positions[0])


def _stops(view: _GraphView, chains: list[Chain]) -> dict[str, int]:
    """Counts by op type of the nodes that are neither on a chain, nor constants, nor projections."""
    on_chain = {n for c in chains for u in c.units for n in _unit_nodes(u)}
    stops: dict[str, int] = {}
    for node in view.graph.nodes:
        if node.name not in on_chain and node.op not in ("Constant",) and node.name not in view.projections:
            stops[node.op] = stops.get(node.op, 0) + 1
    return stops


def _activation_kinds(chains: list[Chain]) -> dict[str, int]:
    kinds: dict[str, int] = {}
    for chain in chains:
        for unit in chain.units:
            if unit.act:
                kinds[unit.act.kind] = kinds.get(unit.act.kind, 0) + 1
    return kinds


def _plain_prefix(tensors: dict[str, gs.Tensor], source: str, start: str) -> bool:
    """True when every node between `source` and `start` is something other than a linear layer
    (so that what dies with a removed branch is not timed by another chain)."""
    nodes, stack, seen = [], [tensors[start]], set()
    while stack:
        tensor = stack.pop()
        if tensor.name == source:
            continue
        for producer in tensor.inputs:
            if id(producer) in seen:
                continue
            seen.add(id(producer))
            nodes.append(producer)
            if len(nodes) > 50:
                return False
            stack.extend(t for t in producer.inputs if not isinstance(t, gs.Constant) and t.inputs)
    reaches_source = any(t.name == source for n in nodes for t in n.inputs)
    return reaches_source and not any(n.op in LINEAR_OPS for n in nodes)


def _unit_nodes(unit: Unit) -> list[str]:
    names = [unit.layer]
    if unit.bias_add:
        names.append(unit.bias_add)
    if unit.skip:
        names.append(unit.skip.add)
    if unit.act:
        names.extend(unit.act.nodes)
    return names

