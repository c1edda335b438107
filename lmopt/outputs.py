"""Which outputs fidelity is measured on, and how: float outputs only, each with the measure its kind calls for.

Exports of sentence encoders return int64 pass-throughs of their inputs beside the embeddings: a
rewrite never moves those, and fidelity measured on them would call every plan free. lmopt scores
candidates on one *primary* output (the first float output of rank 2, the pooled embedding or the
logits; else the first float output) and reports every float output separately. Embeddings (an
output named like one, or any rank-3 token output) are compared by cosine similarity per vector;
other outputs as before (top-1 agreement and KL for classifiers, NRMSE otherwise).
"""
from __future__ import annotations

import re

import onnx

from .errors import LmoptError
from .metrics import compare
from .runtime import run_named

EMBEDDING_NAME = re.compile(r"embed|pool|sentence|hidden|feature|vector|token", re.IGNORECASE)
FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16)


def _rank(value_info: onnx.ValueInfoProto) -> int | None:
    shape = value_info.type.tensor_type
    return len(shape.shape.dim) if shape.HasField("shape") else None


def pass_throughs(model: onnx.ModelProto) -> set[str]:
    """Outputs that are a graph input, directly or through Identity/Cast nodes only."""
    producers = {out: node for node in model.graph.node for out in node.output}
    inputs = {vi.name for vi in model.graph.input}
    result = set()
    for out in model.graph.output:
        name = out.name
        while name in producers and producers[name].op_type in ("Identity", "Cast"):
            name = producers[name].input[0]
        if name in inputs:
            result.add(out.name)
    return result


def float_outputs(model: onnx.ModelProto) -> list[str]:
    """Names of the outputs fidelity is measured on: float, and not a pass-through of an input."""
    skip = pass_throughs(model)
    return [o.name for o in model.graph.output if o.type.tensor_type.elem_type in FLOAT_TYPES and o.name not in skip]


def output_kind(model: onnx.ModelProto, name: str) -> str | None:
    """"embedding" for outputs compared by cosine similarity; None for the default measure."""
    info = next(o for o in model.graph.output if o.name == name)
    rank = _rank(info)
    if rank == 3 or (rank is not None and rank >= 2 and EMBEDDING_NAME.search(name)):
        return "embedding"
    return None


def primary_output(model: onnx.ModelProto) -> str:
    names = float_outputs(model)
    if not names:
        raise LmoptError("the model has no float output to measure fidelity on (only integer or pass-through outputs)")
    ranks = {o.name: _rank(o) for o in model.graph.output}
    return next((n for n in names if ranks[n] == 2), names[0])


def primary_first(model: onnx.ModelProto) -> list[str]:
    """Move the primary output to the front (in place; what scoring and repair measure); returns the
    original order, for `restore_order`."""
    order = [o.name for o in model.graph.output]
    primary = primary_output(model)
    if order[0] != primary:
        outputs = list(model.graph.output)
        outputs.sort(key=lambda o: o.name != primary)
        del model.graph.output[:]
        model.graph.output.extend(outputs)
    return order


def restore_order(model: onnx.ModelProto, order: list[str]) -> onnx.ModelProto:
    """Put the outputs back in `order` (in place, returned)."""
    if [o.name for o in model.graph.output] != order:
        by_name = {o.name: o for o in model.graph.output}
        outputs = [by_name[name] for name in order if name in by_name]
        del model.graph.output[:]
        model.graph.output.extend(outputs)
    return model


def output_fidelity(original: onnx.ModelProto, optimized: onnx.ModelProto, feeds: list[dict]) -> dict[str, dict]:
    """Fidelity of every float output of `optimized` against `original`, keyed by output name."""
    names = float_outputs(original)
    reference, values = run_named(original, feeds, names), run_named(optimized, feeds, names)
    return {name: compare(reference[name], values[name], kind=output_kind(original, name)) for name in names}
