"""The main job: load -> analyse -> candidates -> profile -> score -> select -> apply -> verify."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .analysis import Analysis, analyse
from .blocks import block_model
from .calib import Preprocess, calibration_sets
from .candidates import Candidate, enumerate_candidates, removed_activations, removed_branches
from .symbolic import keep_symbolic, with_node_names
from .errors import LmoptError
from .inputs import real_tokens
from .importance import SCORE_VERSION, Scorer, feeds_fingerprint
from .latency.base import get_backend
from .latency.cache import LatencyCache
from .latency.profiler import make_table, profile_blocks, read_table
from .latency.signature import model_fingerprint, structural_signature
from .latency_fit import two_point_fit
from .loader import canonicalise
from .outputs import compare_outputs, output_kind, primary_first, restore_order
from .passes.apply import apply_candidates
from .algebra.linear import ConvSpec
from .algebra.lowrank import reduced_rank
from .passes.merge import ZERO, BlockBuilder, rewrite_block, rewrite_prefix
from .algebra.refit import refit_conv, refit_dense
from .progress import stage
from .repair import repair as repair_model
from .select import METHODS, fastest, fastest_plan, method_filter, select
from .verify import compare, damage, op_table, run_outputs


@dataclass
class Prepared:
    """A canonical model with its analysis and candidate blocks."""
    model: onnx.ModelProto
    steps: dict
    analysis: Analysis
    candidates: list[Candidate]
    output_order: list[str] = field(default_factory=list)  # the source's outputs (the primary is moved first)


def candidate_graph(model: onnx.ModelProto, analysis: Analysis, cand: Candidate, operator=None) -> gs.Graph:
    graph = gs.import_onnx(model)
    if not cand.is_original:
        rewrite_block(graph, analysis.chains[cand.chain], cand, operator)
    return graph


def block_of(model, analysis, cand, graph) -> onnx.ModelProto:
    chain = analysis.chains[cand.chain]
    return block_model(graph, chain.positions[cand.start], chain.positions[cand.end], like=model)


def prepare(source, input_shapes=None, max_kernel: int = 7, method: str = "layermerge") -> Prepared:
    model, steps = canonicalise(with_node_names(source), input_shapes)
    order = primary_first(model)
    analysis = analyse(model)
    if not analysis.chains:
        raise LmoptError("no chain of linear layers (Conv, Gemm, MatMul with constant weights) found: nothing to optimize")
    candidates = [c for c in enumerate_candidates(analysis, gs.import_onnx(model), max_kernel=max_kernel, low_rank=True)
                  if method_filter(method, c)]
    return Prepared(model, steps, analysis, candidates, order)


def chain_models(model: onnx.ModelProto, analysis: Analysis) -> dict[str, onnx.ModelProto]:
    """Each whole chain as one standalone model, keyed `chain:N`: what calibrates block boundaries."""
    graph = gs.import_onnx(model)
    return {f"chain:{c.index}": block_model(graph, c.positions[0], c.positions[-1], like=model) for c in analysis.chains}


def boundary_corrected(model: onnx.ModelProto, analysis: Analysis, candidates: list[Candidate],
                       latency: dict, chain_ms: dict) -> dict:
    """Block latencies with the cost of their standalone boundaries taken out.

    A block timed alone pays at its input and output what it does not pay inside the network
    (layout reorders such as ONNX Runtime's NCHWc, TensorRT's reformats, per-run overhead). The
    chain timed as one model shows how much: sum(original blocks) - chain = beta * sum of the
    sizes of the chain's inner positions. Each block then gives back beta/2 * size at each inner
    end, so any plan sums to (timed blocks - the boundaries it removes); the original plan sums
    to the chain's own time."""
    sizes = {t.name: tensor_size(t.shape) for t in gs.import_onnx(model).tensors().values()}
    corrected = {}
    for chain in analysis.chains:
        mine = [c for c in candidates if c.chain == chain.index]
        inner = sum(sizes.get(name, 0) for name in chain.positions[1:-1])
        original = sum(latency[c.key] for c in mine if c.is_original)
        beta = max(0.0, (original - chain_ms[chain.index]) / inner) if inner else 0.0
        for cand in mine:
            ends = [p for p in (cand.start, cand.end) if 0 < p < len(chain)]
            give_back = beta / 2 * sum(sizes.get(chain.positions[p], 0) for p in ends)
            corrected[cand.key] = max(0.0, latency[cand.key] - give_back)
    return corrected


WHOLE_MODEL = "model"


def tensor_size(shape) -> int:
    """Elements of a tensor; a symbolic or unknown dim counts as 1 (0 when the shape is unknown)."""
    if not shape:
        return 0
    return int(np.prod([d if isinstance(d, (int, np.integer)) and d > 0 else 1 for d in shape]))


def time_blocks(runner, model: onnx.ModelProto, blocks: dict, cache, progress: bool) -> tuple[dict, dict, float]:
    """(block latency ms, block signatures, whole-model ms) on `runner`. The whole model is timed and
    cached like a block: a warm run then compares cached blocks with a whole-model time taken in the
    same conditions, not with one taken under whatever load the machine has now."""
    signatures: dict[str, str] = {}
    latency = profile_blocks({**blocks, WHOLE_MODEL: model}, runner, cache, progress=progress, signatures=signatures)
    signatures.pop(WHOLE_MODEL)
    return latency, signatures, latency.pop(WHOLE_MODEL)


def profile_table(source, backend_name=None, input_shapes=None, max_kernel=7, cache_path=None,
                  progress=True, **backend_options) -> dict:
    """A latency table of every candidate block (all methods), for `lmopt profile`."""
    prepared = prepare(source, input_shapes, max_kernel)
    backend = get_backend(backend_name, **backend_options)
    cache = LatencyCache(cache_path) if cache_path is not False else None
    blocks = {}
    for cand in stage(prepared.candidates, desc="building blocks", unit="cand", enabled=progress):
        graph = candidate_graph(prepared.model, prepared.analysis, cand)
        blocks[cand.key] = block_of(prepared.model, prepared.analysis, cand, graph)
    blocks.update(chain_models(prepared.model, prepared.analysis))
    latency, signatures, whole = time_blocks(backend, prepared.model, blocks, cache, progress)
    table = make_table(prepared.model, backend.cache_key(), latency, signatures)
    table["model_ms"] = whole
    return table


class Study:
    """Everything a plan is chosen from: candidates, their latency and their damage. Built once,
    it plans for any target and method (the bench uses one study for all of them)."""

    def __init__(self, source, *, method: str = "layermerge", backend: str | None = None,
                 calib: str | None = None, preprocess: Preprocess | None = None, calib_count: int | None = None,
                 eval_count: int | None = None, eval_data: str | None = None, repair: bool = False,
                 distill_minutes: float = 0.0,
                 input_shapes: dict | None = None, latency_table: str | None = None,
                 max_kernel: int = 7, cache_path=None, progress: bool = True, refit: bool = True,
                 backend_options: dict | None = None, log=print):
        started = time.perf_counter()
        if method not in METHODS:
            raise LmoptError(f"unknown method {method!r} (choose from: {', '.join(METHODS)})")
        self.prepared = prepare(source, input_shapes, max_kernel, method)
        model, analysis, candidates = self.prepared.model, self.prepared.analysis, self.prepared.candidates
        self.model, self.analysis, self.candidates = model, analysis, candidates
        self.source, self.kind = source, output_kind(model, model.graph.output[0].name)
        cal_feeds, self.eval_feeds, self.data_note = calibration_sets(model, calib, calib_count, eval_count, preprocess,
                                                                      eval_data)
        # Half the calibration data fits (refit, repair) and the other half scores candidates and
        # checks repairs: scored on its own fitting data, a fit would look better than it is.
        split = len(cal_feeds) // 2 if (refit or repair or distill_minutes) and len(cal_feeds) > 1 else 0
        self.fit_feeds, self.score_feeds = cal_feeds[:split], cal_feeds[split:]
        self.refit, self.repair, self._scorers, self._operators = refit, repair, {}, {}
        self.distill_minutes, self.progress = distill_minutes, progress
        log(f"lmopt: {len(analysis.chains)} chains, {len(candidates)} candidates ({method}); importance from {self.data_note}")

        table = read_table(latency_table) if latency_table else None
        self.runner = None
        self.latency_source = latency_table or "measured in this run"
        if table is not None:
            self._check_table(table, latency_table, backend)
            self.backend_key = table["backend"]
            if _same_machine(table["backend"]):
                self.runner = get_backend(table["backend"]["backend"], **(backend_options or {}))
        else:
            self.runner = get_backend(backend, **(backend_options or {}))
            self.backend_key = self.runner.cache_key()
        # Importance, and the block models to time, from one rewrite per candidate. Scores and
        # block signatures are cached by model (+ calibration data): a warm run rewrites nothing.
        cache = LatencyCache(cache_path) if cache_path is not False else None
        model_key = model_fingerprint(model)
        refit_note = ("refit-tokens" if refit else "plain") + f"-{self.kind}"  # what the scores depend on
        score_prefix = f"{SCORE_VERSION}:{refit_note}:{model_key}:{feeds_fingerprint(cal_feeds)}:"
        # Blocks to time, one model per structural signature (the same block recurs across a
        # network, and holding hundreds of block models with their weights costs gigabytes).
        self.damage, self.latency, pending, representatives = {}, {}, {}, {}
        for cand in stage(candidates, desc="scoring", unit="cand", enabled=progress):
            score = 0.0 if cand.is_original else (cache.get_score(score_prefix + cand.key) if cache is not None else None)
            if table is not None:
                self.latency[cand.key] = table["blocks"][cand.key]["ms"]
            elif cache is not None:
                signature = cache.get_signature(f"{model_key}:{cand.key}")
                ms = cache.get(signature, self.backend_key) if signature else None
                if ms is not None:
                    self.latency[cand.key] = ms
            if score is not None and cand.key in self.latency:
                self.damage[cand.key] = score
                continue
            graph = candidate_graph(model, analysis, cand, self.operator_for(cand) if score is None else None)
            if cand.key not in self.latency:
                block = block_of(model, analysis, cand, graph)
                pending[cand.key] = structural_signature(block)
                representatives.setdefault(pending[cand.key], block)
            if score is None:
                score = max(0.0, damage(self.scorer("score").score(graph, rewrite_prefix(cand))))
                if cache is not None:
                    cache.put_score(score_prefix + cand.key, score)
            self.damage[cand.key] = score
        if table is None:
            blocks = {**representatives, **chain_models(model, analysis)}
            timed, _, self.whole_ms = time_blocks(self.runner, model, blocks, cache, progress)
            for key, signature in pending.items():
                self.latency[key] = timed[signature]
                if cache is not None:
                    cache.put_signature(f"{model_key}:{key}", signature)
            self.latency.update({key: ms for key, ms in timed.items() if key.startswith("chain:")})
        else:
            self.whole_ms = float(table["model_ms"])
            self.latency.update({key: entry["ms"] for key, entry in table["blocks"].items() if key.startswith("chain:")})
        self.chain_lengths = {c.index: len(c) for c in analysis.chains}
        self.chain_ms = {c.index: self.latency.pop(f"chain:{c.index}") for c in analysis.chains}
        self.timed_latency = self.latency  # as measured, block by block
        self.latency = boundary_corrected(model, analysis, candidates, self.timed_latency, self.chain_ms)
        # What no candidate changes (pooling, reshapes, the head's glue); clamped at zero, as
        # chains timed alone can add up to a little more than the whole model.
        self.fixed_ms = max(0.0, self.whole_ms - sum(self.chain_ms.values()))
        self.estimate_ms = self.fixed_ms + sum(self.latency[c.key] for c in candidates if c.is_original)
        self.latency_scale = 1.0
        if self.runner is not None and table is None and all(c.kind == "dense" for c in analysis.chains):
            self._fit_in_context(candidates)
        self.seconds = time.perf_counter() - started

    def _fit_in_context(self, candidates: list[Candidate]) -> None:
        """Scale dense blocks' latencies to what they cost inside the network (see lmopt.latency_fit)."""
        plan = fastest_plan(self.chain_lengths, candidates, self.latency)
        changes = [c for c in plan or [] if not c.is_original]
        if not changes:
            return
        fast_ms = self.runner.measure(apply_candidates(self.model, self.analysis, changes))
        original = sum(self.latency[c.key] for c in candidates if c.is_original)
        fit = two_point_fit(self.whole_ms, original, fast_ms, sum(self.latency[c.key] for c in plan))
        if fit is not None:
            self.latency_scale, self.fixed_ms = fit
            self.latency = {key: ms * self.latency_scale for key, ms in self.latency.items()}
            self.estimate_ms = self.fixed_ms + self.latency_scale * original

    def scorer(self, role: str) -> Scorer:
        """Original activations on the scoring ("score") or fitting ("fit") feeds, made on first
        use: a warm run may need none, or only those of the blocks it refits."""
        if role not in self._scorers:
            positions = [p for chain in self.analysis.chains for p in chain.positions]
            feeds = self.score_feeds if role == "score" else self.fit_feeds
            self._scorers[role] = Scorer(self.model, feeds, positions, kind=self.kind)
        return self._scorers[role]

    def operator_for(self, cand: Candidate):
        """The least-squares refit of a candidate's merged layer, or None to keep the composed
        weights (refit off, an exact merge, an identity, or too large to solve)."""
        if not self.refit or not self.fit_feeds or cand.is_original:
            return None
        if cand.key not in self._operators:
            self._operators[cand.key] = self._refit(cand)
        return self._operators[cand.key]

    def _refit(self, cand: Candidate):
        chain = self.analysis.chains[cand.chain]
        builder = BlockBuilder(gs.import_onnx(self.model), chain, cand)
        merged, explicit = builder.build()
        if merged is None or merged is ZERO or builder.is_exact():
            return None
        names = [chain.positions[cand.start], chain.units[cand.end - 1].pre_act]
        if explicit is not None:
            names.append(explicit.tensor)
        values = self.scorer("fit").values(names)
        keep = real_tokens(self.fit_feeds, values[0].shape) if not isinstance(merged, ConvSpec) else None
        if keep is not None and all(v.shape[:2] == keep.shape for v in values):
            values = [v[keep] for v in values]
        target = values[1] - values[2] if explicit is not None else values[1]
        if isinstance(merged, ConvSpec):
            return refit_conv(merged, values[0], target)
        fitted = refit_dense(merged, values[0], target)
        return reduced_rank(fitted, cand.rank, values[0]) if cand.rank and fitted is not None else fitted

    def _check_table(self, table: dict, path: str, backend: str | None) -> None:
        if table["model_fingerprint"] != model_fingerprint(self.model):
            raise LmoptError(f"{path} was profiled on another model (or other input shapes): re-run lmopt profile")
        needed = [c.key for c in self.candidates] + [f"chain:{c.index}" for c in self.analysis.chains]
        missing = [key for key in needed if key not in table["blocks"]]
        if missing or "model_ms" not in table:
            raise LmoptError(f"{path} lacks {len(missing)} of this run's blocks (profiled with other options?): re-run lmopt profile")
        if backend is not None and backend != table["backend"]["backend"]:
            raise LmoptError(f"{path} holds {table['backend']['backend']} latencies, not {backend}")

    def choose(self, target: float, candidates: list[Candidate], damage: dict, log=print):
        """(plan, planned block ms, target met) of least summed `damage` within the target's budget;
        the fastest plan when the target is out of reach."""
        budget = self.estimate_ms / target - self.fixed_ms
        ranking = tie_broken(candidates, self.latency, damage)
        chosen = select(self.chain_lengths, candidates, self.latency, ranking, budget)
        if chosen is not None:
            return chosen[0], chosen[1], True
        best_blocks = fastest(self.chain_lengths, candidates, self.latency)
        log(f"lmopt: target {target:g}x is out of reach: the best achievable is about "
            f"{self.estimate_ms / (self.fixed_ms + best_blocks):.2f}x; using that")
        chosen = select(self.chain_lengths, candidates, self.latency, ranking, best_blocks * 1.002)
        if chosen is None:  # cannot happen: the fastest plan fits its own latency
            raise LmoptError("internal error: the planner found no plan at the fastest latency")
        return chosen[0], chosen[1], False

    def build(self, changes: list[Candidate]) -> tuple[onnx.ModelProto, list]:
        """The canonical model with `changes` applied (refit weights where made), then repaired in context."""
        optimized = apply_candidates(self.model, self.analysis, changes,
                                     {c.key: self.operator_for(c) for c in changes})
        if not (self.repair and changes):
            return optimized, []
        return repair_model(self.model, optimized, self.analysis, changes, self.fit_feeds, self.score_feeds)

    def check_damage(self, model: onnx.ModelProto) -> float:
        """Damage on the scoring half of the calibration data (never the evaluation data)."""
        return damage(compare(self.scorer("score").reference, run_outputs(model, self.score_feeds), kind=self.kind))

    def rescored(self, changes: list[Candidate], damages: dict) -> dict:
        """Damages with each chosen change's in-context cost: how much worse the plan is with it than
        without it (unrepaired, for speed). A change only gets dearer: damages do not add up, and
        what is harmless alone can hurt beside its neighbours."""
        whole = self.check_damage(apply_candidates(self.model, self.analysis, changes,
                                                   {c.key: self.operator_for(c) for c in changes}))
        updated = dict(damages)
        for cand in changes:
            rest = [c for c in changes if c is not cand]
            without = self.check_damage(apply_candidates(self.model, self.analysis, rest,
                                                         {c.key: self.operator_for(c) for c in rest}))
            updated[cand.key] = max(damages[cand.key], whole - without)
        return updated

    def plan(self, target: float, method: str = "layermerge", measure: bool = True, rounds: int = 2,
             log=print) -> tuple[onnx.ModelProto, dict]:
        """The least-damage plan for `target` with `method`, applied, repaired, verified and measured.

        With `rounds` > 0, the chosen changes are re-scored in the context of the plan and the plan
        chosen again, while the damage on held-out calibration data keeps falling."""
        started = time.perf_counter()
        if not target or target < 1.0:
            raise LmoptError(f"--target must be at least 1 (a speed-up factor such as 1.5 or 2x), got {target}")
        candidates = [c for c in self.candidates if method_filter(method, c)]
        damages, history, best = dict(self.damage), [], None
        for round_index in range(rounds + 1):
            plan, planned_ms, target_met = self.choose(target, candidates, damages, log)
            changes = [c for c in plan if not c.is_original]
            optimized, repair_steps = self.build(changes)
            check = self.check_damage(optimized)
            history.append({"round": round_index, "changes": [c.key for c in changes], "check_damage": check,
                            "predicted_speedup": self.estimate_ms / (self.fixed_ms + planned_ms)})
            log(f"lmopt: round {round_index}: {len(changes)} changes, damage on held-out calibration data {check:.4f}")
            if best is not None and check >= best[0]:
                break
            best = (check, plan, planned_ms, target_met, changes, optimized, repair_steps)
            if round_index == rounds or not changes:
                break
            damages = self.rescored(changes, damages)
        _, plan, planned_ms, target_met, changes, optimized, repair_steps = best
        return self.verify(target, method, measure, started, candidates, changes, optimized, planned_ms,
                           target_met, repair_steps, history)

    def verify(self, target, method, measure, started, candidates, changes, optimized, planned_ms, target_met,
               repair_steps, history) -> tuple[onnx.ModelProto, dict]:
        """Distil if asked, check the model, measure fidelity on the evaluation data and speed: the report."""
        reference = run_outputs(self.model, self.eval_feeds)
        fidelity_unrepaired = None
        if repair_steps:
            fidelity_unrepaired = compare(reference, run_outputs(
                apply_candidates(self.model, self.analysis, changes, {c.key: self.operator_for(c) for c in changes}),
                self.eval_feeds), kind=self.kind)
        distilled = None
        if self.distill_minutes and changes:
            from .distill import distill

            fidelity_undistilled = compare(reference, run_outputs(optimized, self.eval_feeds), kind=self.kind)
            features = [self.analysis.chains[c.chain].positions[c.end] for c in changes]
            optimized, distilled = distill(self.model, optimized, features, self.fit_feeds, self.score_feeds,
                                           self.distill_minutes, progress=self.progress)
        onnx.checker.check_model(optimized)
        fidelity = compare(reference, run_outputs(optimized, self.eval_feeds), kind=self.kind)
        per_output = compare_outputs(self.model, optimized, self.eval_feeds)
        per_output = {name: per_output[name] for name in self.prepared.output_order if name in per_output}
        predicted = self.estimate_ms / (self.fixed_ms + planned_ms)
        measured_ms = measured = None
        if self.runner is not None and measure:
            measured_ms = self.runner.measure_interleaved([self.model, optimized])
            measured = measured_ms[0] / measured_ms[1]
        report = {
            "target": target,
            "method": method,
            "backend": self.backend_key,
            "latency_source": self.latency_source,
            "latency_scale": self.latency_scale,
            "target_met": target_met,
            "original_ms": self.whole_ms,
            "predicted_ms": self.whole_ms / predicted,
            "predicted_speedup": predicted,
            "measured_ms": measured_ms,
            "measured_speedup": measured,
            "prediction_error": None if measured is None else (predicted - measured) / measured,
            "fidelity": fidelity,
            "output": self.model.graph.output[0].name,
            "outputs": per_output,
            "fidelity_unrepaired": fidelity_unrepaired,
            "repair": [step.to_json() for step in repair_steps] if repair_steps else None,
            "distill": None if distilled is None else {**distilled.to_json(), "fidelity_before": fidelity_undistilled},
            "rounds": history,
            "importance_data": self.data_note,
            "refit": self.refit,
            "candidates": len(candidates),
            "changes": [_describe(self.analysis, c, self.latency, self.damage) for c in changes],
            "before": op_table(self.model),
            "after": op_table(optimized),
            "canonicalisation": self.prepared.steps,
            "seconds": round(self.seconds + time.perf_counter() - started, 1),
        }
        operators = {c.key: self.operator_for(c) for c in changes}
        written, report["symbolic_dims"] = keep_symbolic(self.source, optimized, self.analysis, changes, operators,
                                                         self.eval_feeds)
        return restore_order(written or optimized, self.prepared.output_order), report


def tie_broken(candidates: list[Candidate], latency: dict, damage: dict) -> dict:
    """Damages with a tiny charge for each millisecond a candidate saves, so that among plans of equal
    damage (free candidates, or a model whose outputs hardly move) the DP picks the one closest to
    the target rather than an arbitrary faster one. The charge is far below any real difference."""
    original = {(c.chain, c.start): latency[c.key] for c in candidates if c.is_original}
    total_ms = sum(original.values()) or 1.0
    charge = 1e-9 * (1.0 + max(damage.values(), default=0.0)) / total_ms
    ranking = {}
    for cand in candidates:
        span_ms = sum(original.get((cand.chain, k), 0.0) for k in range(cand.start, cand.end))
        ranking[cand.key] = damage[cand.key] + charge * max(0.0, span_ms - latency[cand.key])
    return ranking


def optimize(source, target: float = 2.0, *, method: str = "layermerge", measure: bool = True, rounds: int = 2,
             log=print, **options) -> tuple[onnx.ModelProto, dict]:
    """Compress `source` (path or ModelProto) to run about `target` times faster: (model, report).

    Options: backend, calib, preprocess, calib_count, eval_data, eval_count, repair, distill_minutes,
    input_shapes, latency_table, max_kernel, cache_path (False: no cache), progress, backend_options
    (see Study); `rounds` of in-context re-scoring (see Study.plan)."""
    if not target or target < 1.0:
        raise LmoptError(f"--target must be at least 1 (a speed-up factor such as 1.5 or 2x), got {target}")
    study = Study(source, method=method, log=log, **options)
    return study.plan(target, method, measure=measure, rounds=rounds, log=log)


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


def format_report(report: dict) -> str:
    from .verify import format_op_table

    lines = [f"target {report['target']:g}x with {report['method']} on {report['backend'].get('backend')} "
             f"({report['backend'].get('device', '?')})"]
    if not report["target_met"]:
        lines.append("  target out of reach: this is the fastest plan found")
    lines.append(f"  original {report['original_ms']:.3f} ms, predicted {report['predicted_ms']:.3f} ms "
                 f"-> predicted speed-up {report['predicted_speedup']:.2f}x")
    if report.get("latency_scale", 1.0) != 1.0:
        lines.append(f"  block latencies x{report['latency_scale']:.2f}: dense layers cost more inside the network "
                     "than timed alone (fit to the original and the fastest plan, measured whole)")
    if report["measured_speedup"] is not None:
        before, after = report["measured_ms"]
        lines.append(f"  measured (interleaved, one process): {before:.3f} ms -> {after:.3f} ms "
                     f"= {report['measured_speedup']:.2f}x (prediction off by {100 * report['prediction_error']:+.1f}%)")
    else:
        lines.append("  measured speed-up: not measured here (latencies come from another device: measure there)")
    for label, fid in (("before repair", report.get("fidelity_unrepaired")), ("", report["fidelity"])):
        if fid is not None:
            lines.append(f"  fidelity on evaluation inputs{' ' + label if label else ''}: {fidelity_text(fid)}")
    if len(report.get("outputs") or {}) > 1:
        for name, fid in report["outputs"].items():
            lines.append(f"    output {name}: {fidelity_text(fid)}")
    if report.get("symbolic_dims"):
        lines.append(f"  written model: {report['symbolic_dims']}")
    lines.append(f"  importance from {report['importance_data']}"
                 + ("; merged layers refit by least squares on it" if report.get("refit") else ""))
    if report.get("distill"):
        info = report["distill"]
        lines.append(f"  distilled {info['minutes']:.1f} min ({info['epochs']} epochs): "
                     f"before, {fidelity_text(info['fidelity_before'])}")
    if report.get("repair"):
        kept = [step for step in report["repair"] if step["kept"] != "none"]
        lines.append(f"  repair in context: {len(kept)} of {len(report['repair'])} layers refit "
                     f"({', '.join(sorted(set(step['kept'] for step in kept))) or 'none kept'})")
    lines.append(f"  {len(report['changes'])} changes:")
    for change in report["changes"]:
        acts = f", activations removed: {', '.join(change['activations_removed'])}" if change["activations_removed"] else ""
        pruned = f", pruned: {', '.join(change['pruned'])}" if change["pruned"] and change["action"] != "prune" else ""
        lines.append(f"    {change['action']:<22} {' + '.join(change['layers'])}{pruned}{acts}")
    lines.append(format_op_table(report["before"], report["after"]))
    lines.append(f"  ({report['candidates']} candidates, {report['seconds']} s)")
    return "\n".join(lines)
