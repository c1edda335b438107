"""The human-readable side of results: op tables, change descriptions, the optimize report as text."""
from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

import numpy as np
import onnx

from .analysis import Analysis
from .candidates import Candidate, removed_activations, removed_branches
from .segments import Segment

if TYPE_CHECKING:  # verify imports this module
    from .verify import Report


# Bits per element of the types ONNX packs below a byte (two int4 values per byte, ...).
_PACKED_BITS = {getattr(onnx.TensorProto, name): bits for name, bits in
                [("INT4", 4), ("UINT4", 4), ("FLOAT4E2M1", 4), ("INT2", 2), ("UINT2", 2),
                 ("FLOAT6E2M3", 6), ("FLOAT6E3M2", 6)] if hasattr(onnx.TensorProto, name)}


def _tensor_bytes(tensor: onnx.TensorProto) -> tuple[str, int]:
    """(dtype name, bytes of its data) from the declared type and dims, so tensors stored externally count too."""
    count = int(np.prod(tensor.dims, dtype=np.int64))
    if tensor.data_type == onnx.TensorProto.STRING:
        return "string", sum(len(s) for s in tensor.string_data)
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))
    bits = _PACKED_BITS.get(tensor.data_type, 8 * dtype.itemsize)
    return dtype.name, (count * bits + 7) // 8


# Constant's list and scalar attributes: (element type, element count).
_SCALAR_CONSTANTS = {
    "value_float": lambda a: (onnx.TensorProto.FLOAT, 1),
    "value_floats": lambda a: (onnx.TensorProto.FLOAT, len(a.floats)),
    "value_int": lambda a: (onnx.TensorProto.INT64, 1),
    "value_ints": lambda a: (onnx.TensorProto.INT64, len(a.ints)),
}


def _constant_tensors(graph: onnx.GraphProto) -> list[onnx.TensorProto]:
    """Initializers and Constant-node values of `graph` and its subgraphs (If/Loop/Scan bodies)."""
    found = list(graph.initializer)
    for node in graph.node:
        for attr in node.attribute:
            if node.op_type == "Constant" and attr.name == "value":
                found.append(attr.t)
            elif node.op_type == "Constant" and attr.name in _SCALAR_CONSTANTS:
                kind, count = _SCALAR_CONSTANTS[attr.name](attr)
                found.append(onnx.TensorProto(data_type=kind, dims=[count]))  # the size is all that is read
            elif attr.type == onnx.AttributeProto.GRAPH:
                found += _constant_tensors(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                found += [t for g in attr.graphs for t in _constant_tensors(g)]
    return found


def weight_bytes(model: onnx.ModelProto) -> dict[str, int]:
    """Bytes of the model's constant data by element type (initializers and Constant nodes, subgraphs
    included), largest first: what the weights cost stored at their own precision, so the int8
    weights of a QDQ model count 1 byte each (Deep Compression's measure of model size)."""
    totals: Counter[str] = Counter()
    for tensor in _constant_tensors(model.graph):
        name, size = _tensor_bytes(tensor)
        totals[name] += size
    return dict(sorted(totals.items(), key=lambda item: (-item[1], item[0])))


def op_table(model: onnx.ModelProto) -> dict:
    """Op counts, parameter count, serialised size (size_mb) and weight bytes at their own precision."""
    counts = Counter(node.op_type for node in model.graph.node)
    params = sum(int(np.prod(init.dims)) for init in model.graph.initializer)
    return {"nodes": len(model.graph.node), "ops": dict(sorted(counts.items())), "params": params,
            "size_mb": round(model.ByteSize() / 2 ** 20, 2), "weight_bytes": sum(weight_bytes(model).values())}


def _mb(size: int | None) -> str:
    return "?" if size is None else str(round(size / 2 ** 20, 2))  # as size_mb; "?": a table from before weight_bytes


def format_op_table(before: dict, after: dict) -> str:
    ops = sorted(set(before["ops"]) | set(after["ops"]))
    rows = [("", "before", "after")]
    rows += [(op, str(before["ops"].get(op, 0)), str(after["ops"].get(op, 0))) for op in ops]
    rows += [("nodes", str(before["nodes"]), str(after["nodes"])),
             ("params", f"{before['params']:,}", f"{after['params']:,}"),
             ("size MB", str(before["size_mb"]), str(after["size_mb"])),
             ("weights MB", _mb(before.get("weight_bytes")), _mb(after.get("weight_bytes")))]
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(f"  {r[0]:<{width[0]}}  {r[1]:>{width[1]}}  {r[2]:>{width[2]}}" for r in rows)


def describe_change(analysis: Analysis, cand: Candidate | Segment, latency: dict, damage: dict) -> dict:
    if isinstance(cand, Segment):
        units = [u for index in cand.chains for u in analysis.chains[index].units]
        return {
            "block": cand.key,
            "action": "replace layers by identity" if cand.mode == "identity" else "replace layers by linear map",
            "layers": [u.layer for u in units],
            "pruned": [],  # every layer of the segment goes: `layers` says which
            "span": [cand.start, cand.end],
            "activations_removed": [u.act.kind for u in units if u.act is not None],
            "latency_ms": latency[cand.key],
            "damage": damage[cand.key],
        }
    chain = analysis.chains[cand.chain]
    layers = [chain.units[k - 1].layer for k in range(cand.start + 1, cand.end + 1)]
    branches = removed_branches(chain, cand)
    kind = ("remove residual branch" if branches and len(cand.pruned) == cand.length else
            "prune" if len(cand.pruned) == cand.length else
            f"merge (rank {cand.rank})" if cand.rank else "merge" if cand.length > 1 else "prune")
    return {
        "block": cand.key,
        "action": kind,
        "layers": layers,
        "pruned": [chain.units[k - 1].layer for k in cand.pruned],
        "activations_removed": [chain.units[k - 1].act.kind for k in removed_activations(chain, cand)],
        "latency_ms": latency[cand.key],
        "damage": damage[cand.key],
    }


def fidelity_text(fid: dict) -> str:
    text = f"nrmse {fid['nrmse']:.4f}"
    if "cosine_mean" in fid:
        text += f", cosine similarity mean {fid['cosine_mean']:.4f} min {fid['cosine_min']:.4f}"
    if "kl" in fid:
        confident = ("n/a" if fid["confident_agreement"] is None else
                     f"{100 * fid['confident_agreement']:.1f}% of {fid['confident_count']}")
        text += (f", top-1 agreement {100 * fid['top1_agreement']:.1f}% (confident inputs {confident}), "
                 f"top-5 {100 * fid['top5_contains']:.1f}%, KL {fid['kl']:.4f}")
    return text


FAMILY_NAMES = {"layermerge": "LayerMerge's DP", "prune": "its removal-only DP"}


def _family_lines(report) -> list[str]:
    """Where the plan was chosen between DPs over different candidates (Study.choose), each one's
    least damage on the held-out calibration data and which was kept."""
    least: dict[str, tuple[float, list]] = {}
    for step in report.rounds:
        family = step.get("candidates")
        if family and (family not in least or step["check_damage"] < least[family][0]):
            least[family] = (step["check_damage"], step["changes"])
    if len({tuple(changes) for _, changes in least.values()}) < 2:
        return []  # one DP, or both found the same plan
    kept = [c["block"] for c in report.changes]
    parts = ", ".join(f"{FAMILY_NAMES.get(family, family)} {damage:.4f}{' (kept)' if changes == kept else ''}"
                      for family, (damage, changes) in least.items())
    return [f"  damage on held-out calibration data of the plan of {parts}"]


def _speed_lines(report) -> list[str]:
    backend = report.backend
    lines = [f"target {report.target:g}x with {report.method} on {backend.get('backend')} "
             f"({backend.get('device', '?')}) at {report.precision}"]
    if not report.target_met:
        lines.append("  target out of reach: this is the fastest plan found")
    lines += _family_lines(report)
    lines.append(f"  original {report.original_ms:.3f} ms, predicted {report.predicted_ms:.3f} ms "
                 f"-> predicted speed-up {report.predicted_speedup:.2f}x")
    if report.latency_scale != 1.0:
        fit = report.latency_fit or "whole-model timings"
        lines.append(f"  block latencies x{report.latency_scale:.2f}, fit to {fit}")
    # The kept plan's measurement while it was chosen: the report measures it again, and the two can
    # differ by a few percent (run-to-run noise), on either side of the target.
    chosen_at = next((c["measured_speedup"] for c in report.speed_checks if c["kept"]), None)
    if len(report.speed_checks) > 1:
        tried = "; ".join(f"{len(c['changes'])} changes predicted {c['predicted_speedup']:.2f}x measured "
                          f"{c['measured_speedup']:.2f}x{_speed_check_marks(c)}" for c in report.speed_checks)
        lines.append(f"  plans measured while choosing: {tried}")
    elif chosen_at is not None:
        lines.append(f"  measured {chosen_at:.2f}x while it was chosen")
    if report.measured_speedup is not None:
        before, after = report.measured_ms
        runs = f", the median of {report.measured_runs} measurements" if report.measured_runs > 1 else ""
        lines.append(f"  measured (interleaved with the original, one process{runs}; {report.measured_models}): "
                     f"{before:.3f} ms -> {after:.3f} ms = {report.measured_speedup:.2f}x "
                     f"(prediction off by {100 * report.prediction_error:+.1f}%)")
        if report.target_met and report.measured_speedup < report.target:
            if chosen_at is not None and chosen_at >= report.target:
                lines.append(f"  measured below the {report.target:g}x target here, though {chosen_at:.2f}x while "
                             "it was chosen: one measurement varies by a few percent from run to run; a higher "
                             "--target buys the margin, at some fidelity")
            else:  # the plan meets the target by prediction only; say so rather than let the user find out
                lines.append(f"  measured below the {report.target:g}x target: the prediction was optimistic "
                             "here (measurements also vary by a few percent from run to run); a higher --target "
                             "buys the margin, at some fidelity")
        if report.speedup_parts:
            parts = ", ".join(f"{name} alone {value:.2f}x" for name, value in report.speedup_parts.items())
            lines.append(f"  of which (each measured in a pair with the fp32 original, one process): {parts}, "
                         f"both {report.measured_speedup:.2f}x")
    else:
        lines.append("  measured speed-up: not measured here (latencies come from another device: measure there)")
    return lines


# How to get each baseline the report compares with, for the note that recommends it, by the
# precision the plan was made at.
BASELINE_FLAGS = {("int8 alone", "fp32"): "--precision int8 writes it (and stacks depth on it for a higher --target)",
                  ("int8 alone", "int8"): "a --target at or below its speed-up writes it with no depth change"}


def _fidelity_lines(report) -> list[str]:
    lines = [f"  fidelity on evaluation inputs before {step}: {fidelity_text(fid)}"
             for step, fid in report.fidelity_before.items()]
    lines.append(f"  fidelity on evaluation inputs: {fidelity_text(report.fidelity)}")
    for name, fid in report.baselines.items():
        speed = report.baseline_speedups.get(name)
        alongside = f" ({speed:.2f}x, measured alongside)" if speed is not None else ""
        lines.append(f"  for comparison, {name}{alongside}: {fidelity_text(fid)}")
    if report.quantization:
        lines.append(f"  int8 quantization: {report.quantization}")
    for name in report.better_baselines:
        flags = BASELINE_FLAGS.get((name, report.precision))
        how = f": {flags}" if flags else ""
        lines.append(f"  note: {name} reaches the {report.target:g}x target too and moves the outputs less than "
                     f"this plan{how}")
    if len(report.outputs) > 1:
        lines += [f"    output {name}: {fidelity_text(fid)}" for name, fid in report.outputs.items()]
    if report.sizes:
        sizes = ", ".join(f"{name} {size / 2 ** 20:.2f}" for name, size in report.sizes.items())
        lines.append(f"  weights MB (at their own precision): {sizes}")
    if report.symbolic_dims:
        lines.append(f"  written model: {report.symbolic_dims}")
    lines.append(f"  importance from {report.importance_data}"
                 + ("; merged layers refit by least squares on it" if report.refit else ""))
    if report.distill:
        lines.append(f"  distilled {report.distill['minutes']:.1f} min ({report.distill['epochs']} epochs)")
    if report.repair:
        kept = [step for step in report.repair if step["kept"] != "none"]
        lines.append(f"  repair in context: {len(kept)} of {len(report.repair)} layers refit "
                     f"({', '.join(sorted(set(step['kept'] for step in kept))) or 'none kept'})")
    return lines


def format_report(report: Report) -> str:
    """The optimize report (a verify.Report) as text."""
    lines = _speed_lines(report) + _fidelity_lines(report)
    lines.append(f"  {len(report.changes)} changes:")
    for change in report.changes:
        removed = change["activations_removed"]
        acts = f", activations removed: {', '.join(removed)}" if removed else ""
        pruned = f", pruned: {', '.join(change['pruned'])}" if change["pruned"] and change["action"] != "prune" else ""
        if "span" in change:  # a segment: the tensors it joins, and how many layers it holds
            lines.append(f"    {change['action']:<22} {change['span'][0]} -> {change['span'][1]} "
                         f"({len(change['layers'])} layers){acts}")
            continue
        lines.append(f"    {change['action']:<22} {' + '.join(change['layers'])}{pruned}{acts}")
    lines.append(format_op_table(report.before, report.after))
    lines.append(f"  ({report.candidates} candidates, {report.seconds} s)")
    return "\n".join(lines)


def _speed_check_marks(check: dict) -> str:
    """' (kept)', ' (the other DP's plan)' or both, for a plan measured while choosing."""
    marks = ([] if check["chosen"] else ["the other DP's plan"]) + (["kept"] if check["kept"] else [])
    return "".join(f" ({mark})" for mark in marks)
