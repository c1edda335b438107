"""Keep the symbolic dims of the user's model in the written one.

Planning works on a canonical model with every input dim fixed (`--input-shape`): that is what is
timed and scored. The same plan is then applied to the model canonicalised with its symbolic dims
kept (shape arithmetic left in place), with the planned model's final weights copied over, and
that model is written when it gives the planned model's outputs at the planning shape and runs at
another shape. Otherwise the planned model, with fixed dims, is written and the report says why.
"""
from __future__ import annotations

import os

import numpy as np
import onnx

from .analysis import Analysis
from .apply import apply_candidates
from .candidates import Candidate
from .graph import infer_shapes
from .inputs import integer_input, with_timing_shapes
from .loader import check_opsets
from .onnxio import graph_inputs, input_dtype, load_model, without_value_info
from .outputs import float_outputs, run_named
from .passes.base import run_passes
from .passes.canonical import CANONICAL_SYMBOLIC


def source_model(source: str | os.PathLike | onnx.ModelProto) -> onnx.ModelProto:
    model = source if isinstance(source, onnx.ModelProto) else load_model(source)
    return onnx.ModelProto.FromString(model.SerializeToString())


def symbolic_dims(model: onnx.ModelProto) -> dict[str, list]:
    """Inputs with a dim that is not a fixed number: name -> dims (ints and names)."""
    result = {}
    for vi in graph_inputs(model):
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or "?")
                for d in vi.type.tensor_type.shape.dim]
        if any(not isinstance(d, int) for d in dims):
            result[vi.name] = dims
    return result


def name_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give unnamed or duplicate nodes names from their place in the source (in place, returned), so
    that the fixed-shape and the symbolic canonical models name every node alike."""
    seen: set[str] = set()
    for index, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_src{index}"
        seen.add(node.name)
    return model


def canonical_symbolic(model: onnx.ModelProto) -> onnx.ModelProto:
    """loader.canonicalise without fixing the input shapes."""
    check_opsets(model)
    model = infer_shapes(model)
    return run_passes(CANONICAL_SYMBOLIC, model)[0]


def copy_weights(planned: onnx.ModelProto, target: onnx.ModelProto) -> None:
    """Every constant input of a node of `planned` becomes the same constant input of the node of the
    same name in `target` (in place): repair and distillation change weights after the rewrite."""
    inits = {init.name: init for init in planned.graph.initializer}
    theirs = {init.name: init for init in target.graph.initializer}
    nodes = {node.name: node for node in target.graph.node}
    for node in planned.graph.node:
        other = nodes.get(node.name)
        if other is None or other.op_type != node.op_type:
            continue
        for index, name in enumerate(node.input):
            if name not in inits:
                continue
            while len(other.input) <= index:
                other.input.append("")
            if other.input[index] and (other.input[index] != name or name not in theirs):
                continue  # computed there (shape arithmetic), or another tensor: the output check decides
            if name in theirs:
                theirs[name].CopyFrom(inits[name])
            else:
                target.graph.initializer.append(inits[name])
                theirs[name] = target.graph.initializer[-1]
            other.input[index] = name


def other_shape_feed(model: onnx.ModelProto, dims: dict[str, list], planned_feed: dict) -> dict:
    """A feed whose symbolic dims differ from the planning shape (each one larger by one)."""
    rng = np.random.default_rng(1)
    sizes: dict[str, int] = {}
    feed = {}
    for vi in graph_inputs(model):
        planned = planned_feed[vi.name].shape
        shape = tuple(sizes.setdefault(d, p + 1) if not isinstance(d, int) else d
                      for d, p in zip(dims.get(vi.name, list(planned)), planned))
        dtype = input_dtype(vi)
        if np.issubdtype(dtype, np.floating):
            feed[vi.name] = rng.standard_normal(shape).astype(dtype)
        else:
            feed[vi.name] = integer_input(model, vi.name, shape, dtype, rng)
    return feed


def keep_symbolic(source: str | os.PathLike | onnx.ModelProto, planned: onnx.ModelProto, analysis: Analysis,
                  changes: list[Candidate],
                  operators: dict, feeds: list[dict]) -> tuple[onnx.ModelProto | None, str]:
    """(the plan applied to the symbolic-dim model, or None; a one-line note for the report, empty when
    the source has fixed input shapes)."""
    original = name_nodes(source_model(source))
    dims = symbolic_dims(original)
    if not dims:
        return None, ""  # nothing to keep: the source has fixed input shapes
    try:
        canonical = canonical_symbolic(onnx.ModelProto.FromString(original.SerializeToString()))
        model = apply_candidates(canonical, analysis, changes, operators)
        copy_weights(planned, model)
        onnx.checker.check_model(model)
        names = float_outputs(planned)
        sample = feeds[:4]
        want, got = run_named(planned, sample, names), run_named(model, sample, names)
        for name in names:
            scale = float(np.abs(want[name]).max()) or 1.0
            if got[name].shape != want[name].shape or np.abs(got[name] - want[name]).max() > 1e-4 * scale + 1e-6:
                return None, f"kept fixed: with symbolic dims the rewritten model's {name!r} differs"
        other = other_shape_feed(original, dims, feeds[0])
        reference, result = run_named(original, [other], names), run_named(model, [other], names)
        for name in names:
            if reference[name].shape != result[name].shape:
                return None, f"kept fixed: at another shape the rewritten model's {name!r} has the wrong shape"
    except Exception as exc:  # noqa: BLE001 - any failure here only means the fixed-shape model is written
        return None, f"kept fixed: the plan does not apply with symbolic dims ({type(exc).__name__})"
    return without_value_info(model), "symbolic dims kept: " + ", ".join(f"{k}[{','.join(map(str, v))}]"
                                                                        for k, v in dims.items())


def with_node_names(source: str | os.PathLike | onnx.ModelProto) -> str | os.PathLike | onnx.ModelProto:
    """`source` with every node named (see name_nodes) when its inputs have symbolic dims, else as is."""
    model = source_model(source)
    return name_nodes(model) if symbolic_dims(model) else source


def timing_twin(source: str | os.PathLike | onnx.ModelProto, canonical: onnx.ModelProto, analysis: Analysis,
                tensors: set[str] = frozenset()) -> onnx.ModelProto | None:
    """What whole-model timings run for a model whose chains are all dense (a transformer) and whose
    source has symbolic input dims: the source canonicalised with those dims kept, carrying the
    planning shapes (`canonical`'s inputs) for its feeds. ONNX Runtime runs a fixed-shape transformer
    differently from the symbolic one a user deploys (MatMul+Add become Reshape+Gemm+Reshape, and the
    bias no longer fuses into GELU), slower and not by the same factor after a plan; timing the twin
    (without inner shapes: see prepare.whole_with) makes planned speed-ups those of the written model.
    None otherwise, or when the twin lacks a tensor the rewrites name (the chains', and `tensors`):
    convolutional networks are timed at their fixed shapes."""
    if not analysis.chains or any(c.kind != "dense" for c in analysis.chains):
        return None
    original = name_nodes(source_model(source))
    if not symbolic_dims(original):
        return None
    try:
        twin = canonical_symbolic(original)
    except Exception:  # noqa: BLE001 - without a twin, timings use the fixed-shape model as before
        return None
    names = {t for node in twin.graph.node for t in node.output} | {vi.name for vi in graph_inputs(twin)}
    needed = {t for c in analysis.chains for t in c.positions} | {u.pre_act for c in analysis.chains for u in c.units}
    if not (needed | set(tensors)) <= names:
        return None
    shapes = {vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim] for vi in graph_inputs(canonical)}
    return with_timing_shapes(twin, shapes)
