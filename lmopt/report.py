"""The human-readable side of results: op tables, change descriptions, the optimize report as text."""
from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

import numpy as np
import onnx

from .analysis import Analysis
from .candidates import Candidate, removed_activations, removed_branches

if TYPE_CHECKING:  # verify imports this module
    from .verify import Report


def op_table(model: onnx.ModelProto) -> dict:
    counts = Counter(node.op_type for node in model.graph.node)
    params = sum(int(np.prod(init.dims)) for init in model.graph.initializer)
    return {"nodes": len(model.graph.node), "ops": dict(sorted(counts.items())), "params": params,
            "size_mb": round(model.ByteSize() / 2 ** 20, 2)}


def format_op_table(before: dict, after: dict) -> str:
    ops = sorted(set(before["ops"]) | set(after["ops"]))
    rows = [("", "before", "after")]
    rows += [(op, str(before["ops"].get(op, 0)), str(after["ops"].get(op, 0))) for op in ops]
    rows += [("nodes", str(before["nodes"]), str(after["nodes"])),
             ("params", f"{before['params']:,}", f"{after['params']:,}"),
             ("size MB", str(before["size_mb"]), str(after["size_mb"]))]
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(f"  {r[0]:<{width[0]}}  {r[1]:>{width[1]}}  {r[2]:>{width[2]}}" for r in rows)


def describe_change(analysis: Analysis, cand: Candidate, latency: dict, damage: dict) -> dict:
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


def _speed_lines(report) -> list[str]:
    backend = report.backend
    lines = [f"target {report.target:g}x with {report.method} on {backend.get('backend')} "
             f"({backend.get('device', '?')})"]
    if not report.target_met:
        lines.append("  target out of reach: this is the fastest plan found")
    lines.append(f"  original {report.original_ms:.3f} ms, predicted {report.predicted_ms:.3f} ms "
                 f"-> predicted speed-up {report.predicted_speedup:.2f}x")
    if report.latency_scale != 1.0:
        lines.append(f"  block latencies x{report.latency_scale:.2f}: dense layers cost more inside the network "
                     "than timed alone (fit to the original and the fastest plan, measured whole)")
    if report.measured_speedup is not None:
        before, after = report.measured_ms
        lines.append(f"  measured (interleaved, one process): {before:.3f} ms -> {after:.3f} ms "
                     f"= {report.measured_speedup:.2f}x (prediction off by {100 * report.prediction_error:+.1f}%)")
    else:
        lines.append("  measured speed-up: not measured here (latencies come from another device: measure there)")
    return lines


def _fidelity_lines(report) -> list[str]:
    lines = [f"  fidelity on evaluation inputs before {step}: {fidelity_text(fid)}"
             for step, fid in report.fidelity_before.items()]
    lines.append(f"  fidelity on evaluation inputs: {fidelity_text(report.fidelity)}")
    if len(report.outputs) > 1:
        lines += [f"    output {name}: {fidelity_text(fid)}" for name, fid in report.outputs.items()]
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
        lines.append(f"    {change['action']:<22} {' + '.join(change['layers'])}{pruned}{acts}")
    lines.append(format_op_table(report.before, report.after))
    lines.append(f"  ({report.candidates} candidates, {report.seconds} s)")
    return "\n".join(lines)
