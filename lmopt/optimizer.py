"""The main job, composed of its stages:

    prepare (lmopt.prepare) -> profile (lmopt.profile) -> score (lmopt.score, with refits)
    -> select (lmopt.select) -> apply (lmopt.apply) -> repair (lmopt.repair, lmopt.distill)
    -> quantize (lmopt.quantize, at --precision int8) -> verify (lmopt.verify)

A Study runs the stages up to scoring once; it then plans for any target, and for any method its
candidates allow (the bench makes one study and plans every method from it).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import math
import time

import onnx

from .apply import apply_candidates
from .calib import Preprocess, study_data
from .errors import LmoptError
from .graph import copy_model
from .inputs import timing_shapes, with_timing_shapes
from .latency.base import LatencyBackend, get_backend
from .latency.cache import LatencyCache
from .outputs import restore_order
from .prepare import prepare, timing_base, whole_with
from .profile import LatencyTable, fit_between, fit_to_measured, from_file, profile
from .quantize import describe as describe_quantization
from .quantize import quantize_int8
from .repair import repair as repair_in_context
from .score import PlanChecker, Refits, score
from .segments import Segment
from .select import Plan, check_target, choose
from .symbolic import keep_symbolic
from .verify import Report, verify
from .verify import measure as measure_whole  # plan()'s `measure` is a flag

logger = logging.getLogger(__name__)

# A plan measured within [target, target * (1 + SPEED_SLACK)] is kept as it is; outside, the latency
# table is fit through its measurement and the plan chosen again (see Study.choose_measured), for
# target * (1 + SPEED_MARGIN): one whole-model measurement of a 7 ms CNN on 2 cores varies by about
# +-1.5% (bench/RESULTS.md), so a plan chosen to the exact target measured below it half the time.
SPEED_SLACK = 0.04
SPEED_MARGIN = 0.01
SPEED_REPEATS = 3  # measurements per plan (while choosing and in the report), of which the median counts
# ... and up to this many while the target (or, while choosing, the band's top) lies among them: a
# plan within noise of the target was kept or dropped on one draw, so that lmopt's choice and its
# reported speed-up moved from run to run (bench/RESULTS.md, "Measured until clear").
SPEED_REPEATS_MOST = 7
# At int8 a plan is quantized for its check, for its measurement and for the written model (each
# quantization runs calibration and takes seconds on a real CNN); the last few quantized models are
# kept by content so that each model is quantized once.
QUANTIZED_KEPT = 8


class Study:
    """Everything a plan is chosen from: candidates, their latency and their damage."""

    def __init__(self, source, *, method: str = "layermerge", backend: str | None = None,
                 calib: str | None = None, preprocess: Preprocess | None = None, calib_count: int | None = None,
                 eval_count: int | None = None, eval_data: str | None = None, repair: bool = False,
                 distill_minutes: float = 0.0, input_shapes: dict | None = None, latency_table: str | None = None,
                 max_kernel: int = 7, cache_path=None, progress: bool = True, refit: bool = True,
                 backend_options: dict | None = None):
        started = time.perf_counter()
        self.source, self.method, self.progress = source, method, progress
        self.repair, self.distill_minutes = repair, distill_minutes
        self.precision = (backend_options or {}).get("precision", "fp32")
        self.prepared = prepare(source, input_shapes, max_kernel, method)
        self.data = study_data(self.prepared.model, calib, calib_count, eval_count, preprocess, eval_data,
                               fitting=refit or repair or bool(distill_minutes))
        logger.info("lmopt: %d chains, %d candidates (%s); importance from %s", len(self.prepared.analysis.chains),
                    len(self.prepared.candidates), method, self.data.note)
        cache = LatencyCache(cache_path) if cache_path is not False else None
        self.runner, self.latency = self._latency(latency_table, backend, backend_options or {}, cache)
        self.refits = Refits(self.prepared, self.data.fit, enabled=refit)
        self.scores = score(self.prepared, self.data, self.refits, cache, progress)
        self.checker = PlanChecker(self.prepared, self.data, self.refits)
        self._quantized: dict[str, onnx.ModelProto] = {}  # at_precision's, by content
        self.seconds = time.perf_counter() - started

    def _latency(self, path: str | None, backend: str | None, options: dict,
                 cache: LatencyCache | None) -> tuple[LatencyBackend | None, LatencyTable]:
        """(the runner that measures results here, or None; the latency table). At int8, results are
        quantized before they are measured, so they are measured by the backend's fp32 twin."""
        if path is None:
            runner = get_backend(backend, **options)
            fp32 = runner if self.precision == "fp32" else get_backend(backend, **{**options, "precision": "fp32"})
            measurer = fp32 if self.precision == "int8" else runner
            return measurer, profile(self.prepared, runner, cache, self.progress, fp32_runner=fp32)
        table = from_file(self.prepared, path, backend)
        self.precision = table.precision  # the table's latencies decide what the plan is written at
        options = {**options, "precision": "fp32" if table.precision == "int8" else table.precision}
        # Results are measured here only when the table was made on this machine.
        return (get_backend(table.backend["backend"], **options) if _same_machine(table.backend) else None), table

    @functools.cached_property
    def int8_original(self) -> onnx.ModelProto:
        """INT8 alone: the original quantized as plans are, once (at int8 through at_precision's memo,
        so a plan that changes nothing is not quantized again)."""
        if self.precision == "int8":
            return self.at_precision(self.prepared.model)
        return quantize_int8(self.prepared.model, self.quantization_feeds)

    @property
    def quantization_feeds(self) -> list[dict]:
        """The calibration samples INT8 quantization takes: the fitting half (never the half that
        checks plans)."""
        return self.data.fit or self.data.calibration

    @functools.cached_property
    def int8_baseline(self) -> dict[str, onnx.ModelProto]:
        """{"int8 alone": int8_original}, the bar a user compares a plan with, reported beside it. At
        fp32 only on ONNX Runtime CPU (other backends' INT8 is not ONNX Runtime's QDQ) and where the
        model can be quantized."""
        if self.precision == "int8":
            return {"int8 alone": self.int8_original}
        if self.precision != "fp32" or self.runner is None or self.runner.name != "ort-cpu":
            return {}
        try:
            return {"int8 alone": self.int8_original}
        except LmoptError as exc:
            logger.info("lmopt: no INT8 baseline: %s", exc)
            return {}

    def at_precision(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """`model` as it will run: at int8, quantized with quantization_feeds. The model returned may
        be shared: copy it to change it."""
        if self.precision != "int8":
            return model
        key = hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest()
        if key not in self._quantized:
            while len(self._quantized) >= QUANTIZED_KEPT:
                self._quantized.pop(next(iter(self._quantized)))  # the oldest
            self._quantized[key] = quantize_int8(model, self.quantization_feeds)
        return self._quantized[key]

    def build(self, changes: list) -> tuple[onnx.ModelProto, list]:
        """The canonical model with `changes` applied (with their refits), then repaired in context if asked."""
        optimized = apply_candidates(self.prepared.model, self.prepared.analysis, changes, self.refits.of(changes))
        if not (self.repair and changes):
            return optimized, []
        return repair_in_context(self.prepared.model, optimized, self.prepared.analysis, changes, self.data.fit,
                                 self.data.score, output_kind=self.prepared.kind)

    def choose(self, target: float, method: str | None = None, rounds: int = 2,
               table: LatencyTable | None = None) -> tuple[Plan, onnx.ModelProto, list, list[dict]]:
        """(plan, built model, repair steps, history) of least damage on the held-out calibration data,
        within `target` on `table` (default: the study's latency table).

        With `rounds` > 0, the chosen changes are re-scored in the context of the plan and the plan
        chosen again, while that damage keeps falling. For LayerMerge a second plan is chosen the same
        way from the candidates that only remove (whole layers, residual branches: `prune`'s), and the
        plan less damaging on the held-out data is kept: the DP adds up damages measured one block at a
        time, and merged blocks that look cheap alone can cost far more together (bench/RESULTS.md,
        "Removal-only plans")."""
        found, history = self._choose_families(target, method, rounds, table)
        return (*found[0][1:], history)

    def _choose_families(self, target: float, method: str | None, rounds: int,
                         table: LatencyTable | None) -> tuple[list[tuple], list[dict]]:
        """As `choose`: ([(check damage, plan, built model, repair steps)], history), the plan kept
        first, then the other DP's plan where it differs."""
        method, table = method or self.method, table or self.latency
        if method != self.method and self.method != "layermerge":
            raise LmoptError(f"this study holds {self.method} candidates only; make one with method={method!r}")
        families = ("layermerge", "prune") if method == "layermerge" else (method,)
        found, history, checked = [], [], {}
        for family in families:
            best, rounds_tried = self._choose_rounds(target, method, family, rounds, table, checked)
            history += rounds_tried
            if all(_keys(best[1]) != _keys(other[1]) for other in found):
                found.insert(0 if not found or _less_damaging(best, found[0]) else len(found), best)
        return found, history

    def _choose_rounds(self, target: float, method: str, family: str, rounds: int, table: LatencyTable,
                       checked: dict) -> tuple[tuple, list[dict]]:
        """((check damage, plan, built model, repair steps), history) of the least damaging of the
        rounds of the DP over `family`'s candidates (see choose); the plan is `method`'s, whose
        candidates include the family's. `checked`: (check damage, built model, repair steps) by the
        plan's changes, shared by the DPs of one choose, so that a plan both reach is built (and
        repaired, quantized) and checked once."""
        damages, history, best = dict(self.scores.damage), [], None
        for round_index in range(rounds + 1):
            plan = dataclasses.replace(choose(table, self.prepared.chain_lengths, self.prepared.candidates, damages,
                                              target, family, self.prepared.segments), method=method)
            keys = tuple(c.key for c in plan.changes)
            if best is not None and keys == tuple(c.key for c in best[1].changes):
                break  # the same plan again: its check would be the same
            if keys not in checked:
                optimized, repair_steps = self.build(plan.changes)
                check = self.checker.damage(self.at_precision(optimized))  # quantization in the loop
                checked[keys] = (check, optimized, repair_steps)
            check, optimized, repair_steps = checked[keys]
            history.append({"round": round_index, "candidates": family, "changes": list(keys),
                            "check_damage": check, "predicted_speedup": plan.predicted_speedup})
            logger.info("lmopt: %s round %d: %d changes, damage on held-out calibration data %.4f", family,
                        round_index, len(plan.changes), check)
            if best is not None and check >= best[0]:
                break
            best = (check, plan, optimized, repair_steps)
            if round_index == rounds or not plan.changes:
                break
            damages = self.checker.rescored(plan.changes, damages)
        return best, history

    def measured_speedup(self, plan: Plan, optimized: onnx.ModelProto,
                         edges: tuple[float, ...] = ()) -> tuple[float, int]:
        """(`plan`'s speed-up against the fp32 original, measurements taken): measured whole and
        interleaved on the runner, as the report will measure it (at fp32 on the timing base, the timing
        twin where there is one; at int8 `optimized` quantized), the median of SPEED_REPEATS
        measurements, or of more, up to SPEED_REPEATS_MOST, while one of `edges` lies among them
        (verify.measure)."""
        if self.precision == "int8":
            pair = [self.prepared.model, self.at_precision(optimized)]
        else:
            base = timing_base(self.prepared, self.runner)
            pair = [whole_with(base, self.prepared.analysis, []), whole_with(base, self.prepared.analysis,
                                                                             plan.changes)]
        _, speedup, _, runs = measure_whole(self.runner, *pair, {}, SPEED_REPEATS, edges, SPEED_REPEATS_MOST)
        return speedup, runs

    def choose_measured(self, target: float, method: str | None = None, rounds: int = 2,
                        corrections: int = 2) -> tuple[Plan, onnx.ModelProto, list, list[dict], LatencyTable,
                                                       list[dict]]:
        """As `choose`, then measured: (plan, built model, repair steps, history, the table it was chosen
        on, speed checks).

        Block latencies timed alone predict CNN plans a few percent optimistically, more the more a
        plan removes, so a plan predicted to meet the target can measure below it. While the measured
        speed-up of the plan `choose` kept falls outside [target, target * (1 + SPEED_SLACK)], up to
        `corrections` times, the study's table is fit to the kept plans measured so far (see
        _fit_to_tried) and the plan chosen again on it, with SPEED_MARGIN to spare. Where LayerMerge's
        two DPs reach different plans, the one not kept is measured too (seconds): it may meet the
        target where the kept one falls just short. Each plan is measured again, up to
        SPEED_REPEATS_MOST times in all, while an end of the band lies among its measurements. Of all
        the plans measured, the least damaging one (on the held-out calibration data) that measured at
        least the target is kept, else the fastest measured."""
        table, tried = self.latency, {}  # by the plan's changes: one entry per plan measured, in the order measured
        band = (target, target * (1 + SPEED_SLACK))
        found, history = self._choose_families(target, method, rounds, table)
        while True:
            plan = found[0][1]
            repeated = tried.get(_keys(plan), {}).get("chosen", False)  # a plan chosen before comes back
            if not repeated:
                for check, other, optimized, repair_steps in found:
                    if _keys(other) not in tried:
                        speedup, runs = self.measured_speedup(other, optimized, band)
                        tried[_keys(other)] = {"result": (other, optimized, repair_steps, history), "table": table,
                                               "measured": speedup, "runs": runs, "chosen": False,
                                               "predicted": other.predicted_speedup, "check_damage": check}
            entry = tried[_keys(plan)]  # the kept plan's measurement, now predicted by this table
            entry.update(result=(*found[0][1:], history), table=table, chosen=True)
            chosen = [t for t in tried.values() if t["chosen"]]
            in_band = band[0] <= entry["measured"] <= band[1]
            if repeated or in_band or len(chosen) > corrections or not plan.changes:
                break
            fitted = self._fit_to_tried(chosen, target)
            if fitted is None:
                break
            logger.info("lmopt: the plan measured %.2fx (predicted %.2fx): latencies fit to %s, choosing again",
                        entry["measured"], plan.predicted_speedup, fitted.fit)
            table = fitted
            found, history = self._choose_families(target * (1 + SPEED_MARGIN), method, rounds, table)
        measured = list(tried.values())
        met = [t for t in measured if t["measured"] >= target]
        kept = min(met, key=lambda t: t["check_damage"]) if met else max(measured, key=lambda t: t["measured"])
        checks = [{"changes": [c.key for c in t["result"][0].changes], "predicted_speedup": t["predicted"],
                   "measured_speedup": t["measured"], "runs": t["runs"], "check_damage": t["check_damage"],
                   "chosen": t["chosen"], "kept": t is kept} for t in measured]
        return (*kept["result"], kept["table"], checks)

    def _fit_to_tried(self, tried: list[dict], target: float) -> LatencyTable | None:
        """The study's table fit to the plans in `tried` (those `choose` kept, measured so far): through
        the nearest one on either side of the target once there are both (profile.fit_between), else
        through one of them and the original (profile.fit_to_measured): where all fell short, the one
        whose fit is the most pessimistic (least saved per table millisecond), where all overshot the
        most optimistic. A fit through the one nearest the target could bring back a table already
        chosen on: after a plan that fell shorter than the one the table was fit through, the same plan
        came again and the search stopped short of the target."""
        slow = [t for t in tried if t["measured"] < target]
        fast = [t for t in tried if t["measured"] > target * (1 + SPEED_SLACK)]
        if slow and fast:
            fitted = fit_between(self.latency, self._point(max(slow, key=lambda t: t["measured"])),
                                 self._point(min(fast, key=lambda t: t["measured"])))
            if fitted is not None:
                return fitted
            nearest = min(tried, key=lambda t: abs(math.log(t["measured"] / target)))
            return self._fit_through(nearest)
        fits = [fitted for fitted in map(self._fit_through, slow or fast) if fitted is not None]
        if not fits:
            return None
        return (min if slow else max)(fits, key=lambda fitted: fitted.scale)

    def _point(self, tried: dict) -> tuple[float, float]:
        """A measured plan's (summed block ms on the study's own table, measured speed-up)."""
        return sum(self.latency.block_ms[c.key] for c in tried["result"][0].blocks), tried["measured"]

    def _fit_through(self, tried: dict) -> LatencyTable | None:
        """The study's table fit through one measured plan and the original (profile.fit_to_measured)."""
        planned_ms, measured = self._point(tried)
        return fit_to_measured(self.latency, planned_ms, measured, self.latency.predicted_speedup(planned_ms))

    def plan(self, target: float, method: str | None = None, measure: bool = True,
             rounds: int = 2, corrections: int = 2) -> tuple[onnx.ModelProto, Report]:
        """The least-damage plan for `target`, applied, repaired, distilled if asked, verified and measured.
        Measured, the plan is chosen again on latencies fit to it while it measures below the target
        or more than SPEED_SLACK above it, up to `corrections` times (see choose_measured)."""
        started = time.perf_counter()
        if measure and self.runner is not None and corrections > 0:
            plan, optimized, repair_steps, history, table, speed_checks = self.choose_measured(
                target, method, rounds, corrections)
        else:
            plan, optimized, repair_steps, history = self.choose(target, method, rounds)
            table, speed_checks = self.latency, []
        earlier = {"repair": self.checker.applied(plan.changes)} if repair_steps else {}
        distilled = None
        if self.distill_minutes and plan.changes:
            from .distill import distill

            earlier["distillation"] = optimized
            chains = self.prepared.analysis.chains
            features = [c.end if isinstance(c, Segment) else chains[c.chain].positions[c.end] for c in plan.changes]
            optimized, distilled = distill(self.prepared.model, optimized, features, self.data.train, self.data.score,
                                           self.distill_minutes, output_kind=self.prepared.kind, progress=self.progress)
        parts, baselines = {}, self.int8_baseline
        if self.precision == "int8":
            parts = {"depth": optimized, "precision": self.int8_original}
            earlier["quantization"], optimized = optimized, copy_model(self.at_precision(optimized))
        written, symbolic_note = None, ""  # an int8 model is written at the planning shape
        if self.precision != "int8":
            written, symbolic_note = keep_symbolic(self.source, optimized, self.prepared.analysis, plan.changes,
                                                   self.refits.of(plan.changes), self.data.eval)
        # Where the plan was timed on the timing twin, the written model is measured against it: the
        # speed-up a user of the written model gets.
        timed, timed_note = None, "fixed-shape models"
        base = timing_base(self.prepared, self.runner) if self.runner is not None else self.prepared.model
        if written is not None and base is not self.prepared.model:
            timed = (whole_with(base, self.prepared.analysis, []), with_timing_shapes(written, timing_shapes(base)))
            timed_note = "the written model (symbolic dims) against the source, at the planning shapes"
        report = verify(self.prepared, table, plan, optimized, self.data.eval, self.scores.damage,
                        runner=self.runner if measure else None, earlier=earlier, parts=parts, baselines=baselines,
                        timed=timed, target=target, rounds=history, speed_checks=speed_checks,
                        repair=[step.to_json() for step in repair_steps] if repair_steps else None,
                        distill=None if distilled is None else distilled.to_json(),
                        importance_data=self.data.note, refit=self.refits.enabled, symbolic_dims=symbolic_note,
                        measured_models=timed_note, runs=SPEED_REPEATS, most_runs=SPEED_REPEATS_MOST,
                        quantization=describe_quantization() if self.precision == "int8" or baselines else "",
                        seconds=round(self.seconds + time.perf_counter() - started, 1))
        return restore_order(written or optimized, self.prepared.output_order), report


def _keys(plan: Plan) -> tuple:
    """A plan's identity: its changes."""
    return tuple(c.key for c in plan.changes)


def _less_damaging(found: tuple, best: tuple) -> bool:
    """Whether `found` (check damage, plan, ...) is to be kept over `best`: a plan that meets the target
    over one that cannot (that one is only its family's fastest plan), then the less damaging one on
    the held-out data by more than run-to-run float noise (ONNX Runtime's threaded sums), so that equal
    plans keep the first."""
    if found[1].target_met != best[1].target_met:
        return found[1].target_met
    return found[0] < best[0] - 1e-9 * max(abs(best[0]), 1.0)


def optimize(source: str | onnx.ModelProto, target: float = 2.0, *, method: str = "layermerge", measure: bool = True,
             rounds: int = 2, corrections: int = 2, **options) -> tuple[onnx.ModelProto, Report]:
    """Compress `source` (path or ModelProto) to run about `target` times faster: (model, report).

    Options: backend, calib, preprocess, calib_count, eval_data, eval_count, repair, distill_minutes,
    input_shapes, latency_table, max_kernel, cache_path (False: no cache), progress, refit,
    backend_options (see Study); `rounds` of in-context re-scoring (see Study.choose); measured, up to
    `corrections` times a plan that misses the target is chosen again on latencies fit to its
    measurement (see Study.choose_measured)."""
    check_target(target)
    return Study(source, method=method, **options).plan(target, measure=measure, rounds=rounds,
                                                        corrections=corrections)


def _same_machine(key: dict) -> bool:
    try:
        return get_backend(key["backend"]).cache_key().get("device") == key.get("device")
    except LmoptError:
        return False
