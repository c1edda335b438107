"""The main job: load -> analyse -> candidates -> profile -> score -> select -> apply -> verify."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import onnx
import onnx_graphsurgeon as gs
from tqdm import tqdm

from .analysis import Analysis, analyse
from .blocks import block_model
from .calib import Preprocess, calibration_sets
from .candidates import Candidate, enumerate_candidates, removed_activations, removed_branches
from .errors import LmoptError
from .importance import Scorer
from .latency.base import get_backend
from .latency.cache import LatencyCache
from .latency.profiler import make_table, profile_blocks, read_table
from .latency.signature import model_fingerprint
from .loader import canonicalise
from .passes.apply import apply_candidates
from .passes.merge import rewrite_block
from .select import METHODS, fastest, method_filter, select
from .verify import compare, op_table, run_outputs


@dataclass
class Prepared:
    """A canonical model with its analysis and candidate blocks as standalone models."""
    model: onnx.ModelProto
    steps: dict
    analysis: Analysis
    candidates: list[Candidate]
    blocks: dict[str, onnx.ModelProto] = field(default_factory=dict)


def candidate_graph(model: onnx.ModelProto, analysis: Analysis, cand: Candidate) -> gs.Graph:
    graph = gs.import_onnx(model)
    if not cand.is_original:
        rewrite_block(graph, analysis.chains[cand.chain], cand)
    return graph


def block_of(model, analysis, cand, graph) -> onnx.ModelProto:
    chain = analysis.chains[cand.chain]
    return block_model(graph, chain.positions[cand.start], chain.positions[cand.end], like=model)


def prepare(source, input_shapes=None, max_kernel: int = 7, method: str = "layermerge") -> Prepared:
    model, steps = canonicalise(source, input_shapes)
    analysis = analyse(model)
    if not analysis.chains:
        raise LmoptError("no chain of linear layers (Conv, Gemm, MatMul with constant weights) found: nothing to optimize")
    candidates = [c for c in enumerate_candidates(analysis, gs.import_onnx(model), max_kernel=max_kernel)
                  if method_filter(method, c)]
    return Prepared(model, steps, analysis, candidates)


def profile_prepared(prepared: Prepared, backend, cache, progress: bool) -> tuple[dict, dict, float]:
    """(block latency ms, signatures, whole-model ms) on `backend`."""
    blocks = {}
    for cand in tqdm(prepared.candidates, desc="building blocks", unit="cand", disable=not progress, leave=False):
        graph = candidate_graph(prepared.model, prepared.analysis, cand)
        blocks[cand.key] = block_of(prepared.model, prepared.analysis, cand, graph)
    signatures: dict[str, str] = {}
    latency = profile_blocks(blocks, backend, cache, progress=progress, signatures=signatures)
    whole = backend.measure(prepared.model)
    return latency, signatures, whole


def profile_table(source, backend_name=None, input_shapes=None, max_kernel=7, cache_path=None,
                  progress=True, **backend_options) -> dict:
    """A latency table of every candidate block (all methods), for `lmopt profile`."""
    prepared = prepare(source, input_shapes, max_kernel)
    backend = get_backend(backend_name, **backend_options)
    cache = LatencyCache(cache_path) if cache_path is not False else None
    latency, signatures, whole = profile_prepared(prepared, backend, cache, progress)
    table = make_table(prepared.model, backend.cache_key(), latency, signatures)
    table["model_ms"] = whole
    return table


def optimize(source, target: float = 2.0, *, method: str = "layermerge", backend: str | None = None,
             calib: str | None = None, preprocess: Preprocess | None = None, calib_count: int = 16,
             eval_count: int = 16, input_shapes: dict | None = None, latency_table: str | None = None,
             max_kernel: int = 7, cache_path=None, measure: bool = True, progress: bool = True,
             backend_options: dict | None = None, log=print) -> tuple[onnx.ModelProto, dict]:
    """Compress `source` (path or ModelProto) to run about `target` times faster. Returns (model, report)."""
    started = time.perf_counter()
    if not target or target < 1.0:
        raise LmoptError(f"--target must be at least 1 (a speed-up factor such as 1.5 or 2x), got {target}")
    if method not in METHODS:
        raise LmoptError(f"unknown method {method!r} (choose from: {', '.join(METHODS)})")
    prepared = prepare(source, input_shapes, max_kernel, method)
    model, analysis, candidates = prepared.model, prepared.analysis, prepared.candidates
    cal_feeds, eval_feeds, data_note = calibration_sets(model, calib, calib_count, eval_count, preprocess)
    log(f"lmopt: {len(analysis.chains)} chains, {len(candidates)} candidates ({method}); importance from {data_note}")

    table = read_table(latency_table) if latency_table else None
    runner = None
    if table is not None:
        if table["model_fingerprint"] != model_fingerprint(model):
            raise LmoptError(f"{latency_table} was profiled on another model (or other input shapes): re-run lmopt profile")
        missing = [c.key for c in candidates if c.key not in table["blocks"]]
        if missing or "model_ms" not in table:
            raise LmoptError(f"{latency_table} lacks {len(missing)} of this run's blocks (profiled with other options?): re-run lmopt profile")
        if backend is not None and backend != table["backend"]["backend"]:
            raise LmoptError(f"{latency_table} holds {table['backend']['backend']} latencies, not {backend}")
        latency = {c.key: table["blocks"][c.key]["ms"] for c in candidates}
        whole_ms, backend_key = float(table["model_ms"]), table["backend"]
        if measure and _same_machine(table["backend"]):
            runner = get_backend(table["backend"]["backend"], **(backend_options or {}))
    else:
        runner = get_backend(backend, **(backend_options or {}))
        backend_key = runner.cache_key()
        cache = LatencyCache(cache_path) if cache_path is not False else None
    # Importance, and block models for timing, from one rewrite per candidate.
    scorer = Scorer(model, cal_feeds, [p for chain in analysis.chains for p in chain.positions])
    damage, blocks, fidelity = {}, {}, {}
    for cand in tqdm(candidates, desc="scoring", unit="cand", disable=not progress, leave=False):
        graph = candidate_graph(model, analysis, cand)
        if table is None:
            blocks[cand.key] = block_of(model, analysis, cand, graph)
        if cand.is_original:
            damage[cand.key] = 0.0
            continue
        start = analysis.chains[cand.chain].positions[cand.start]
        metrics = scorer.score(graph, start)
        fidelity[cand.key] = metrics
        damage[cand.key] = max(0.0, metrics.get("kl", metrics["nrmse"] ** 2))
    if table is None:
        latency = profile_blocks(blocks, runner, cache, progress=progress)
        whole_ms = runner.measure(model)

    chain_lengths = {c.index: len(c) for c in analysis.chains}
    original = [c for c in candidates if c.is_original]
    blocks_ms = sum(latency[c.key] for c in original)
    fixed_ms = max(0.0, whole_ms - blocks_ms)  # what no candidate changes (stem, pooling, ...)
    budget = whole_ms / target - fixed_ms
    chosen = select(chain_lengths, candidates, latency, damage, budget)
    target_met = chosen is not None
    if chosen is None:
        best_blocks = fastest(chain_lengths, candidates, latency)
        best_speedup = whole_ms / (fixed_ms + best_blocks)
        log(f"lmopt: target {target:g}x is out of reach with {method}: the best achievable is about {best_speedup:.2f}x; using that")
        chosen = select(chain_lengths, candidates, latency, damage, best_blocks * 1.002)
    plan, planned_ms = chosen
    changes = [c for c in plan if not c.is_original]
    optimized = apply_candidates(model, analysis, changes)
    onnx.checker.check_model(optimized)

    eval_metrics = compare(run_outputs(model, eval_feeds), run_outputs(optimized, eval_feeds))
    predicted = whole_ms / (fixed_ms + planned_ms)
    measured = None
    measured_ms = None
    if runner is not None and measure:
        measured_ms = runner.measure_interleaved([model, optimized])
        measured = measured_ms[0] / measured_ms[1]
    report = {
        "target": target,
        "method": method,
        "backend": backend_key,
        "latency_source": latency_table or "measured in this run",
        "target_met": target_met,
        "original_ms": whole_ms,
        "predicted_ms": fixed_ms + planned_ms,
        "predicted_speedup": predicted,
        "measured_ms": measured_ms,
        "measured_speedup": measured,
        "prediction_error": None if measured is None else (predicted - measured) / measured,
        "fidelity": eval_metrics,
        "importance_data": data_note,
        "candidates": len(candidates),
        "changes": [_describe(analysis, c, latency, damage) for c in changes],
        "before": op_table(model),
        "after": op_table(optimized),
        "canonicalisation": prepared.steps,
        "seconds": round(time.perf_counter() - started, 1),
    }
    return optimized, report


def _same_machine(key: dict) -> bool:
    try:
        return get_backend(key["backend"]).cache_key().get("device") == key.get("device")
    except LmoptError:
        return False


def _describe(analysis: Analysis, cand: Candidate, latency: dict, damage: dict) -> dict:
    chain = analysis.chains[cand.chain]
    layers = [chain.units[k - 1].layer for k in range(cand.start + 1, cand.end + 1)]
    branches = removed_branches(chain, cand)
    kind = ("remove residual branch" if branches and len(cand.pruned) == cand.length else
            "prune" if len(cand.pruned) == cand.length else
            "merge" if cand.length > 1 else "prune")
    return {
        "block": cand.key,
        "action": kind,
        "layers": layers,
        "pruned": [chain.units[k - 1].layer for k in cand.pruned],
        "activations_removed": [chain.units[k - 1].act.kind for k in removed_activations(chain, cand)],
        "latency_ms": latency[cand.key],
        "damage": damage[cand.key],
    }


def format_report(report: dict) -> str:
    from .verify import format_op_table

    lines = [f"target {report['target']:g}x with {report['method']} on {report['backend'].get('backend')} "
             f"({report['backend'].get('device', '?')})"]
    if not report["target_met"]:
        lines.append("  target out of reach: this is the fastest plan found")
    lines.append(f"  original {report['original_ms']:.3f} ms, predicted {report['predicted_ms']:.3f} ms "
                 f"-> predicted speed-up {report['predicted_speedup']:.2f}x")
    if report["measured_speedup"] is not None:
        before, after = report["measured_ms"]
        lines.append(f"  measured (interleaved, one process): {before:.3f} ms -> {after:.3f} ms "
                     f"= {report['measured_speedup']:.2f}x (prediction off by {100 * report['prediction_error']:+.1f}%)")
    else:
        lines.append("  measured speed-up: not measured here (latencies come from another device: measure there)")
    fid = report["fidelity"]
    text = f"  fidelity on held-out inputs: nrmse {fid['nrmse']:.4f}, max abs {fid['max_abs']:.4g}"
    if "kl" in fid:
        text += f", top-1 agreement {100 * fid['top1_agreement']:.1f}%, KL {fid['kl']:.4f}"
    lines.append(text)
    lines.append(f"  importance from {report['importance_data']}")
    lines.append(f"  {len(report['changes'])} changes:")
    for change in report["changes"]:
        acts = f", activations removed: {', '.join(change['activations_removed'])}" if change["activations_removed"] else ""
        pruned = f", pruned: {', '.join(change['pruned'])}" if change["pruned"] and change["action"] != "prune" else ""
        lines.append(f"    {change['action']:<22} {' + '.join(change['layers'])}{pruned}{acts}")
    lines.append(format_op_table(report["before"], report["after"]))
    lines.append(f"  ({report['candidates']} candidates, {report['seconds']} s)")
    return "\n".join(lines)
