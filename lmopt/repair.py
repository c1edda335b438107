"""Closed-form repair in context, after a plan is applied.

Walking the compressed network in order, each changed layer (a merged layer, or the first
unchanged layer after a pruned block) is refit so that, fed the *compressed* network's own values
(every upstream repair already applied), it reproduces the *original* network's values at that
point (layer-wise reconstruction as in OBC/SparseGPT and CORP's ridge compensation). Two repairs
are tried per layer: a ridge refit of all its weights, and a per-channel scale and bias (few
unknowns, for when rows are few). A repair is kept only when the whole network's output, on
check data that no fit has seen, moves closer to the original's; otherwise the layer is left as
it was.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from .algebra.linear import ConvSpec, DenseSpec
from .algebra.refit import affine_fit, refit_conv, refit_dense
from .analysis import Analysis
from .candidates import Candidate
from .graph import to_model
from .metrics import compare, damage
from .passes.merge import layer_spec, rewrite_prefix
from .runtime import run_each

log = logging.getLogger("lmopt.repair")


@dataclass
class RepairStep:
    """What happened at one layer: the damage on the check data before and after, and the repair kept."""
    layer: str
    kept: str            # "refit", "scale+bias" or "none"
    damage_before: float
    damage_after: float

    def to_json(self) -> dict:
        return {"layer": self.layer, "kept": self.kept, "damage_before": self.damage_before,
                "damage_after": self.damage_after}


def run_with_outputs(model: onnx.ModelProto, feeds: list[dict], names: list[str]) -> list[np.ndarray]:
    """Values of the first graph output and of `names` over `feeds` (stacked along the batch axis)."""
    graph = gs.import_onnx(model)
    tensors = graph.tensors()
    graph.outputs = list(graph.outputs[:1]) + [tensors[n] for n in names if n != graph.outputs[0].name]
    for tensor in graph.outputs[1:]:
        tensor.dtype = tensor.dtype or np.float32
    runs = run_each(to_model(graph, like=model), feeds)
    values = [np.concatenate([r[i] for r in runs]) for i in range(len(runs[0]))]
    by_name = {graph.outputs[0].name: values[0], **dict(zip([t.name for t in graph.outputs[1:]], values[1:]))}
    return [values[0]] + [by_name[n] for n in names]


def repair_targets(optimized: onnx.ModelProto, analysis: Analysis, changes: list[Candidate]) -> list[str]:
    """Names of the layers to repair, in graph order: each change's merged layer, and the first
    layer after each change when that layer is unchanged (it sees the change's error first). Segments
    are fitted maps already, and repair reaches no MatMul: they are left as they are."""
    changes = [c for c in changes if isinstance(c, Candidate)]
    names = {node.name for node in optimized.graph.node}
    changed_starts = {(c.chain, c.start) for c in changes}
    wanted = set()
    for cand in changes:
        for op in ("Conv", "Gemm"):
            if rewrite_prefix(cand) + op in names:
                wanted.add(rewrite_prefix(cand) + op)
        chain = analysis.chains[cand.chain]
        if cand.end < len(chain) and (cand.chain, cand.end) not in changed_starts:
            layer = chain.units[cand.end].layer
            if layer in names:
                wanted.add(layer)
    return [node.name for node in optimized.graph.node if node.name in wanted and node.op_type in ("Conv", "Gemm")]


def _initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {init.name: init for init in model.graph.initializer}


def _set_weights(model: onnx.ModelProto, node_name: str, spec) -> onnx.ModelProto:
    """A copy of `model` whose node `node_name` carries `spec`'s weights (same shapes and attributes)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    node = next(n for n in model.graph.node if n.name == node_name)
    inits = _initializers(model)
    old = numpy_helper.to_array(inits[node.input[1]])
    if isinstance(spec, ConvSpec):
        weight = spec.weight
    else:  # DenseSpec is x W + b; write it back in the Gemm's own layout, alpha and beta 1
        trans_b = any(a.name == "transB" and a.i for a in node.attribute)
        weight = spec.weight.T if trans_b else spec.weight
        for attr in node.attribute:
            if attr.name in ("alpha", "beta"):
                attr.f = 1.0
    inits[node.input[1]].CopyFrom(numpy_helper.from_array(weight.astype(old.dtype), node.input[1]))
    bias = spec.bias.astype(old.dtype)
    if len(node.input) > 2 and node.input[2]:
        shape = numpy_helper.to_array(inits[node.input[2]]).shape
        inits[node.input[2]].CopyFrom(numpy_helper.from_array(bias.reshape(shape), node.input[2]))
    else:
        name = f"{node_name}/repair_bias"
        model.graph.initializer.append(numpy_helper.from_array(bias, name))
        while len(node.input) < 3:
            node.input.append("")
        node.input[2] = name
    return model


def _scaled(spec, scale: np.ndarray, shift: np.ndarray):
    """`spec` followed by a per-output-channel affine map y -> scale * y + shift."""
    if isinstance(spec, ConvSpec):
        weight = spec.weight * scale.reshape((-1,) + (1,) * (spec.weight.ndim - 1))
        return ConvSpec(weight, spec.bias * scale + shift, spec.strides, spec.pads_begin, spec.pads_end,
                        spec.dilations, spec.group)
    return DenseSpec(spec.weight * scale[None, :], spec.bias * scale + shift)


def _spec_of(model: onnx.ModelProto, node_name: str):
    graph = gs.import_onnx(model)
    node = next(n for n in graph.nodes if n.name == node_name)
    spec = layer_spec(node)
    if spec.bias is None:
        width = spec.out_channels if isinstance(spec, ConvSpec) else spec.out_features
        spec = (ConvSpec(spec.weight, np.zeros(width, spec.weight.dtype), spec.strides, spec.pads_begin,
                         spec.pads_end, spec.dilations, spec.group) if isinstance(spec, ConvSpec)
                else DenseSpec(spec.weight, np.zeros(width, spec.weight.dtype)))
    return spec, node.inputs[0].name, node.outputs[0].name


def _goal_of(original: onnx.ModelProto, optimized: onnx.ModelProto, output: str) -> tuple[str, str | None]:
    """(the original's tensor a layer writing `output` must reproduce, the shortcut added to it first or
    None). A merged layer whose residual shortcut could not be folded into its kernel writes a tensor of
    its own, which a shortcut Add then turns into the original's tensor."""
    if any(output in node.output for node in original.graph.node):
        return output, None
    add = next(n for n in optimized.graph.node if n.op_type == "Add" and output in n.input)
    return add.output[0], next(name for name in add.input if name != output)


def repair(original: onnx.ModelProto, optimized: onnx.ModelProto, analysis: Analysis, changes: list[Candidate],
           fit_feeds: list[dict], check_feeds: list[dict], output_kind: str | None = None,
           progress: Callable[[int, int], None] | None = None) -> tuple[onnx.ModelProto, list[RepairStep]]:
    """Repair `optimized` layer by layer in context (see the module's text). Returns the repaired
    model and one step per layer considered. `output_kind`: the first output's kind, as
    metrics.compare takes it (an embedding is checked by cosine, never as class scores)."""
    targets = repair_targets(optimized, analysis, changes)
    if not targets or not fit_feeds or not check_feeds:
        return optimized, []
    goals = [_goal_of(original, optimized, _spec_of(optimized, name)[2]) for name in targets]
    reference_check = run_with_outputs(original, check_feeds, [])[0]

    def check_damage(model: onnx.ModelProto) -> float:
        return damage(compare(reference_check, run_with_outputs(model, check_feeds, [])[0], kind=output_kind))

    current_damage = check_damage(optimized)
    steps = []
    for index, name in enumerate(targets):
        spec, x_name, y_name = _spec_of(optimized, name)
        # The original's values one layer at a time: all at once, the layers of a large network over
        # hundreds of feeds do not fit in memory.
        original_name, shortcut = goals[index]
        reference = run_with_outputs(original, fit_feeds, [original_name])[1]
        _, x_values, y_values, *joined = run_with_outputs(optimized, fit_feeds,
                                                          [x_name, y_name] + ([shortcut] if shortcut else []))
        # A layer whose shortcut is added after it must give the original's sum less the compressed
        # network's own shortcut value.
        goal = reference - joined[0] if joined else reference
        # Residual shortcuts that join after this layer are left alone: the target is the
        # layer's own output in the original network.
        tries = []
        refit = (refit_conv(spec, x_values, goal) if isinstance(spec, ConvSpec)
                 else refit_dense(spec, x_values, goal))
        if refit is not None:
            tries.append(("refit", refit))
        channel_axis = 1 if isinstance(spec, ConvSpec) else -1
        tries.append(("scale+bias", _scaled(spec, *affine_fit(y_values, goal, channel_axis))))
        best_kind, best_model, best_damage = "none", optimized, current_damage
        for kind, candidate_spec in tries:
            trial = _set_weights(optimized, name, candidate_spec)
            trial_damage = check_damage(trial)
            if np.isfinite(trial_damage) and trial_damage < best_damage:
                best_kind, best_model, best_damage = kind, trial, trial_damage
        steps.append(RepairStep(name, best_kind, current_damage, best_damage))
        log.info("repair %s: %s (damage %.4g -> %.4g)", name, best_kind, current_damage, best_damage)
        optimized, current_damage = best_model, best_damage
        if progress is not None:
            progress(index + 1, len(targets))
    return optimized, steps
