"""Verification: the optimized model checked, its outputs compared with the original's on the
evaluation data (never the data it was fitted or scored on), its speed measured; the Report."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import onnx

from .errors import LmoptError
from .latency.base import LatencyBackend
from .metrics import compare, damage
from .outputs import output_fidelity
from .prepare import Prepared
from .profile import LatencyTable
from .report import describe_change, op_table, weight_bytes
from .runtime import run_outputs
from .select import Plan, method_filter


@dataclass
class Report:
    """What `optimize` did and the evidence: predicted and measured speed, and how far outputs moved."""
    target: float
    method: str
    backend: dict
    latency_source: str
    latency_scale: float
    target_met: bool
    original_ms: float
    predicted_ms: float
    predicted_speedup: float
    fidelity: dict  # the primary output on the evaluation data (see metrics.compare)
    primary_output: str
    outputs: dict[str, dict]  # every float output, by name
    importance_data: str
    refit: bool
    candidates: int
    changes: list[dict]
    before: dict
    after: dict
    canonicalisation: dict
    measured_ms: list[float] | None = None  # [original, optimized], interleaved in one process
    measured_speedup: float | None = None
    precision: str = "fp32"
    speedup_parts: dict[str, float] = field(default_factory=dict)  # measured alongside: "depth", "precision"
    baselines: dict[str, dict] = field(default_factory=dict)  # fidelity of alternatives ("int8 alone")
    baseline_speedups: dict[str, float] = field(default_factory=dict)  # theirs, measured alongside
    quantization: str = ""  # how INT8 models (the written one or a baseline) were quantized (quantize.describe)
    # Weight bytes at their own precision (Deep Compression's size): the original, the model before
    # each later step ("before quantization": pruned and merged, fp32), and the written model.
    sizes: dict[str, int] = field(default_factory=dict)
    fidelity_before: dict[str, dict] = field(default_factory=dict)  # step ("repair", "distillation") -> fidelity
    rounds: list[dict] = field(default_factory=list)
    # Plans measured while choosing (Study.choose_measured): changes, predicted and measured speed-up,
    # damage on the held-out calibration data, and which was kept.
    speed_checks: list[dict] = field(default_factory=list)
    latency_fit: str = ""  # what the block latencies were fit to (see profile.LatencyTable.fit)
    repair: list[dict] | None = None
    distill: dict | None = None
    symbolic_dims: str = ""
    measured_models: str = "fixed-shape models"  # what the measured speed-up timed (see Study.plan)
    measured_runs: int = 1  # interleaved measurements taken; measured_* are those of the median one
    seconds: float = 0.0
    batch: str | None = None  # what the CLI did with the batch dim (see lmopt.dynamic)
    written_to: str | None = None

    @property
    def prediction_error(self) -> float | None:
        if self.measured_speedup is None:
            return None
        return (self.predicted_speedup - self.measured_speedup) / self.measured_speedup

    @property
    def better_baselines(self) -> list[str]:
        """The alternatives measured alongside (e.g. "int8 alone") that reach the target and move the
        outputs less than the plan: a user is better served by them, and the report says so."""
        if not self.target_met:
            return []
        plan_damage = _damage_or_inf(self.fidelity)
        return [name for name, fid in self.baselines.items()
                if self.baseline_speedups.get(name, 0.0) >= self.target and _damage_or_inf(fid) < plan_damage]

    def to_json(self) -> dict:
        return {**asdict(self), "prediction_error": self.prediction_error, "better_baselines": self.better_baselines}


def _damage_or_inf(fidelity: dict) -> float:
    try:
        return damage(fidelity)
    except LmoptError:  # non-finite outputs: as far from the original as can be
        return float("inf")


def measure(runner: LatencyBackend | None, original: onnx.ModelProto, optimized: onnx.ModelProto,
            parts: dict[str, onnx.ModelProto], runs: int = 1, edges: tuple[float, ...] = (),
            most_runs: int = 0) -> tuple[list[float] | None, float | None, dict[str, float], int]:
    """([original ms, optimized ms], speed-up, speed-up of each of `parts`, measurements of `optimized`
    taken), nothing without a runner. Each model is measured as a pair with the original, interleaved
    in one process, as plans are measured while they are chosen: timed among four models, a quantized
    plan measured about 1.5% slower against the original than in its pair (bench/RESULTS.md). Each
    figure is the pair measurement of median speed-up among `runs` (one varies by a few percent). A
    part that is `optimized`, or the same model as another part, is measured once.

    `edges`: speed-ups that decide something (the target): while one of them lies between the two
    speed-ups of `optimized` either side of the median one, which side of it the plan is on is not
    clear, and two more measurements are taken, up to `most_runs` in all (an odd count keeps the
    median one measurement; the outer ones, the noisiest, stop counting as more come)."""
    if runner is None:
        return None, None, {}, 0

    def speedup(ms: list[float]) -> float:
        return ms[0] / ms[1]

    def undecided(measurements: list[list[float]], edges: tuple[float, ...]) -> bool:
        ranked, middle = sorted(map(speedup, measurements)), len(measurements) // 2
        below, above = ranked[max(middle - 1, 0)], ranked[min(middle + 1, len(ranked) - 1)]
        return any(below < edge < above for edge in edges)

    def median_pair(model: onnx.ModelProto, edges: tuple[float, ...] = ()) -> tuple[list[float], int]:
        """(the pair measurement of median speed-up, measurements taken)"""
        measurements = [runner.measure_interleaved([original, model]) for _ in range(runs)]
        while len(measurements) + 2 <= most_runs and undecided(measurements, edges):
            measurements += [runner.measure_interleaved([original, model]) for _ in range(2)]
        return sorted(measurements, key=speedup)[len(measurements) // 2], len(measurements)

    measured_ms, taken = median_pair(optimized, edges)
    ms_of = {id(optimized): measured_ms}
    for model in parts.values():
        if id(model) not in ms_of:
            ms_of[id(model)] = median_pair(model)[0]
    speedups = {name: speedup(ms_of[id(model)]) for name, model in parts.items()}
    return measured_ms, speedup(measured_ms), speedups, taken


def verify(prepared: Prepared, table: LatencyTable, plan: Plan, optimized: onnx.ModelProto, eval_feeds: list[dict],
           scores: dict[str, float], *, runner: LatencyBackend | None, earlier: dict[str, onnx.ModelProto],
           parts: dict[str, onnx.ModelProto] | None = None, baselines: dict[str, onnx.ModelProto] | None = None,
           timed: tuple[onnx.ModelProto, onnx.ModelProto] | None = None, runs: int = 1, most_runs: int = 0,
           **details) -> Report:
    """The Report of `optimized`, made from `plan`: fidelity on `eval_feeds`, also of the `earlier`
    models (by the step that followed them) and of `baselines`, and speed measured on `runner` where
    given, with each of `parts` (e.g. depth alone, precision alone) and of `baselines` measured
    alongside; `timed`: the (original, optimized) pair to time instead of the fixed-shape ones (same
    plan; baselines are then not timed); `runs`, `most_runs`: measurements of it taken, and taken at
    most while the target lies among them (see measure). `details`
    fill the Report's remaining fields (rounds, repair, distill, importance_data, refit, target)."""
    onnx.checker.check_model(optimized)
    reference = run_outputs(prepared.model, eval_feeds)

    def fidelity(model: onnx.ModelProto) -> dict:
        return compare(reference, run_outputs(model, eval_feeds), kind=prepared.kind)

    per_output = output_fidelity(prepared.model, optimized, eval_feeds)
    parts, baselines = parts or {}, baselines or {}
    # A baseline is a model at the planning shapes: timed only where the plan is timed at them.
    timed_baselines = baselines if timed is None else {}
    measured_ms, measured, speedups, measured_runs = measure(
        runner, *(timed or (prepared.model, optimized)), {**parts, **timed_baselines}, runs,
        (details["target"],) if details.get("target") else (), most_runs)
    return Report(
        method=plan.method, backend=table.backend, latency_source=table.source, latency_scale=table.scale,
        latency_fit=table.fit,
        target_met=plan.target_met, original_ms=table.fp32_ms, predicted_ms=table.fp32_ms / plan.predicted_speedup,
        predicted_speedup=plan.predicted_speedup, measured_ms=measured_ms, measured_speedup=measured,
        measured_runs=measured_runs,
        fidelity=fidelity(optimized), precision=table.precision,
        speedup_parts={name: speedups[name] for name in parts if name in speedups},
        baselines={name: fidelity(model) for name, model in baselines.items()},
        baseline_speedups={name: speedups[name] for name in timed_baselines if name in speedups},
        primary_output=prepared.model.graph.output[0].name,
        outputs={name: per_output[name] for name in prepared.output_order if name in per_output},
        fidelity_before={step: fidelity(model) for step, model in earlier.items()},
        sizes={"original": sum(weight_bytes(prepared.model).values()),
               **{f"before {step}": sum(weight_bytes(model).values()) for step, model in earlier.items()},
               "written": sum(weight_bytes(optimized).values())},
        candidates=sum(1 for c in prepared.candidates if method_filter(plan.method, c)),
        changes=[describe_change(prepared.analysis, c, table.block_ms, scores) for c in plan.changes],
        before=op_table(prepared.model), after=op_table(optimized), canonicalisation=prepared.steps, **details)
