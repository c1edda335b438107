"""Profiling: the latency of every candidate block, and of the whole model, on one runtime.

Blocks are timed alone (each distinct structure once, cached by structural signature; see
lmopt.latency), then corrected for what a block pays at its standalone boundaries, and for dense
models scaled to what they cost inside the network. A `LatencyTable` holds the result, from a live
run or from a table file written by `lmopt profile` on the target device.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .analysis import Analysis
from .candidates import Candidate
from .errors import LmoptError
from .latency.base import LatencyBackend, get_backend
from .latency.cache import LatencyCache
from .latency.profiler import make_table, profile_blocks, profile_relative, read_table
from .latency.signature import model_fingerprint, structural_signature
from .prepare import Prepared, block_of, candidate_graph, chain_models, segment_models, timing_base, whole_with
from .progress import stage
from .select import fastest_plan

WHOLE_MODEL = "model"
MEASURED_HERE = "measured in this run"


@dataclass
class LatencyTable:
    """Latencies (ms) a plan is chosen with, at one precision. A plan's predicted time is fixed_ms +
    the sum of its blocks' block_ms; the original plan's is estimate_ms. Speed-ups are against the
    fp32 original: at another precision, `precision_gain` (fp32 whole model / whole model at that
    precision, both measured) carries the precision's part."""
    backend: dict  # the backend's cache key: name, device, precision, versions
    source: str  # MEASURED_HERE or the table file's path
    timed_ms: dict[str, float]  # candidate key -> as timed alone
    block_ms: dict[str, float]  # candidate key -> boundaries taken out, scaled to context
    chain_ms: dict[int, float]  # each whole chain timed alone
    whole_ms: float  # the whole model
    fixed_ms: float  # what no candidate changes (pooling, reshapes, the head's glue)
    estimate_ms: float
    scale: float = 1.0  # cost in context / cost alone (see fit_in_context, fit_to_measured)
    precision: str = "fp32"
    precision_gain: float = 1.0
    fit: str = ""  # what `scale` and `fixed_ms` were fit to, if they were

    @property
    def fp32_ms(self) -> float:
        """The fp32 original, measured whole."""
        return self.whole_ms * self.precision_gain

    def predicted_speedup(self, planned_ms: float) -> float:
        """Against the fp32 original."""
        return self.precision_gain * self.estimate_ms / (self.fixed_ms + planned_ms)

    def budget(self, target: float) -> float:
        """The summed block latency a plan may have to reach `target` (against the fp32 original)."""
        return self.precision_gain * self.estimate_ms / target - self.fixed_ms


def tensor_size(shape: Sequence | None) -> int:
    """Elements of a tensor; a symbolic or unknown dim counts as 1 (0 when the shape is unknown)."""
    if not shape:
        return 0
    return int(np.prod([d if isinstance(d, (int, np.integer)) and d > 0 else 1 for d in shape]))


def boundary_corrected(model: onnx.ModelProto, analysis: Analysis, candidates: list[Candidate],
                       latency: dict[str, float], chain_ms: dict[int, float],
                       by_size: bool = True) -> dict[str, float]:
    """Block latencies with the cost of their standalone boundaries taken out.

    A block timed alone pays at its input and output what it does not pay inside the network
    (per-run overhead, layout reorders such as ONNX Runtime's NCHWc, TensorRT's reformats). The
    chain timed as one model shows how much: sum(original blocks) - chain. That excess is shared
    among the chain's inner positions in proportion to their tensor sizes (`by_size=False`: equally),
    and each block gives back half a share at each inner end, so any plan sums to (timed blocks - the
    boundaries it removes) and the original plan sums to the chain's own time.

    Neither form predicts every CNN best on ONNX Runtime CPU: six plans of EfficientNet-Lite0 measured
    whole were predicted with rms error 10.9% by size and 3.1% with equal shares, six of Lite1 4.3%
    by size and 8.8% equal (bench/bench_prediction.py, bench/RESULTS.md); by size is kept, and plans
    are measured and chosen again where they miss (Study.choose_measured)."""
    sizes = {t.name: tensor_size(t.shape) for t in gs.import_onnx(model).tensors().values()}

    def weight(name: str) -> float:
        size = sizes.get(name, 0)
        return float(size) if by_size else float(size > 0)

    corrected = {}
    for chain in analysis.chains:
        mine = [c for c in candidates if c.chain == chain.index]
        inner = sum(weight(name) for name in chain.positions[1:-1])
        original = sum(latency[c.key] for c in mine if c.is_original)
        share = max(0.0, (original - chain_ms[chain.index]) / inner) if inner else 0.0
        for cand in mine:
            ends = [p for p in (cand.start, cand.end) if 0 < p < len(chain)]
            give_back = share / 2 * sum(weight(chain.positions[p]) for p in ends)
            corrected[cand.key] = max(0.0, latency[cand.key] - give_back)
    return corrected


def assemble(prepared: Prepared, backend: dict, source: str, timed: dict[str, float],
             chain_ms: dict[int, float], whole_ms: float) -> LatencyTable:
    """A LatencyTable from raw timings: boundaries corrected, fixed time derived."""
    block_ms = boundary_corrected(prepared.model, prepared.analysis, prepared.candidates, timed, chain_ms)
    # Clamped at zero: chains timed alone can add up to a little more than the whole model.
    fixed = max(0.0, whole_ms - sum(chain_ms.values()))
    estimate = fixed + sum(block_ms[c.key] for c in prepared.candidates if c.is_original)
    return LatencyTable(backend, source, timed, block_ms, chain_ms, whole_ms, fixed, estimate)


def time_blocks(runner: LatencyBackend, model: onnx.ModelProto, blocks: dict, cache: LatencyCache | None,
                progress: bool) -> tuple[dict, dict, float]:
    """(block latency ms, block signatures, whole-model ms) on `runner`. The whole model is timed and
    cached like a block: a warm run then compares cached blocks with a whole-model time taken in the
    same conditions, not with one taken under whatever load the machine has now."""
    signatures: dict[str, str] = {}
    latency = profile_blocks({**blocks, WHOLE_MODEL: model}, runner, cache, progress=progress, signatures=signatures)
    signatures.pop(WHOLE_MODEL)
    return latency, signatures, latency.pop(WHOLE_MODEL)


def time_candidates(prepared: Prepared, runner: LatencyBackend, cache: LatencyCache | None,
                    progress: bool) -> tuple[dict[str, float], dict[str, str], float]:
    """(ms, structural signature) of every candidate block, every chain (`chain:N`) and the whole model
    with each segment replaced (by segment key: timed interleaved with the whole model, see
    profile_relative), and the whole model's ms, on `runner`. A block's signature is cached by model
    and candidate, so a warm run builds no block model at all."""
    model_key, backend = model_fingerprint(prepared.model), runner.cache_key()
    timed, signatures, pending, representatives = {}, {}, {}, {}
    for cand in stage(prepared.candidates, desc="building blocks", unit="cand", enabled=progress):
        signature = cache.get_signature(f"{model_key}:{cand.key}") if cache is not None else None
        ms = cache.get(signature, backend) if signature else None
        if ms is not None:
            timed[cand.key], signatures[cand.key] = ms, signature
            continue
        block = block_of(prepared, cand, candidate_graph(prepared, cand))
        pending[cand.key] = structural_signature(block)
        # One model per structure: the same block recurs across a network, and holding hundreds of
        # block models with their weights costs gigabytes.
        representatives.setdefault(pending[cand.key], block)
    base = timing_base(prepared, runner)
    whole = whole_with(base, prepared.analysis, [])
    chains = chain_models(prepared)
    measured, chain_signatures, whole_ms = time_blocks(runner, whole, {**representatives, **chains}, cache, progress)
    for key, signature in pending.items():
        timed[key], signatures[key] = measured[signature], signature
        if cache is not None:
            cache.put_signature(f"{model_key}:{key}", signature)
    for key in chains:
        timed[key], signatures[key] = measured[key], chain_signatures[key]
    ratios, segment_signatures = profile_relative(whole, segment_models(prepared, base), runner, cache, progress)
    for key, ratio in ratios.items():
        timed[key], signatures[key] = whole_ms * ratio, segment_signatures[key]
    return timed, signatures, whole_ms


def profile(prepared: Prepared, runner: LatencyBackend, cache: LatencyCache | None = None,
            progress: bool = True, fp32_runner: LatencyBackend | None = None) -> LatencyTable:
    """Time every candidate block, each chain and the whole model on `runner` (see time_candidates);
    when `runner` times another precision, the whole fp32 model too, on `fp32_runner`."""
    timed, _, whole_ms = time_candidates(prepared, runner, cache, progress)
    chain_ms = {c.index: timed.pop(f"chain:{c.index}") for c in prepared.analysis.chains}
    replaced_ms = {s.key: timed.pop(s.key) for s in prepared.segments}
    table = assemble(prepared, runner.cache_key(), MEASURED_HERE, timed, chain_ms, whole_ms)
    if runner.precision != "fp32":
        table = replace(table, precision=runner.precision,
                        precision_gain=precision_gain(prepared.model, runner, fp32_runner, whole_ms, cache))
    if runner.precision == "int8" or all(c.kind == "dense" for c in prepared.analysis.chains):
        table = fit_in_context(table, prepared, runner)
    return with_segments(table, prepared, replaced_ms, whole_ms)


def with_segments(table: LatencyTable, prepared: Prepared, replaced_ms: dict[str, float],
                  whole_ms: float) -> LatencyTable:
    """`table` with a block latency for each segment timed (`replaced_ms`: the whole model with it
    replaced, timed beside the whole model's `whole_ms`), so that a plan's predicted time drops by
    what replacing it saves (in the table's units: its estimate of the original over `whole_ms`).

    A region also holds work outside any block (attention's MatMuls and softmax, LayerNorms), counted
    in the fixed time. That share, what removing the region saves beyond its blocks, moves from the
    fixed time onto the region's first chain (every plan that keeps the region pays it there), and a
    segment's latency is then its blocks and that share less the saving."""
    if not replaced_ms or whole_ms <= 0:
        return table
    units = table.estimate_ms / whole_ms
    saving = {s.key: (whole_ms - replaced_ms[s.key]) * units for s in prepared.segments if s.key in replaced_ms}
    originals: dict[int, float] = {}
    for cand in prepared.candidates:
        if cand.is_original:
            originals[cand.chain] = originals.get(cand.chain, 0.0) + table.block_ms[cand.key]
    glue = {s.chains[0]: max(0.0, saving[s.key] - sum(originals[c] for c in s.chains))
            for s in prepared.segments if s.key in saving and s.regions == 1 and s.mode == "identity"}
    if sum(glue.values()) > table.fixed_ms:  # the share cannot exceed the fixed time it comes from
        glue = {c: g * table.fixed_ms / sum(glue.values()) for c, g in glue.items()}
    block_ms = dict(table.block_ms)
    for cand in prepared.candidates:
        if cand.start == 0 and cand.chain in glue:
            block_ms[cand.key] += glue[cand.chain]
    for seg in prepared.segments:
        if seg.key in saving:
            kept = sum(originals[c] + glue.get(c, 0.0) for c in seg.chains)
            block_ms[seg.key] = max(0.0, kept - saving[seg.key])
    return replace(table, block_ms=block_ms, fixed_ms=table.fixed_ms - sum(glue.values()))


def precision_gain(model: onnx.ModelProto, runner: LatencyBackend, fp32_runner: LatencyBackend, whole_ms: float,
                   cache: LatencyCache | None) -> float:
    """How much faster the whole model runs at `runner`'s precision than at fp32. At int8 it is
    measured fresh, interleaved in one process with the model quantized as lmopt writes it (whole-model
    times cached under other load would make the ratio drift); otherwise from the fp32 whole model's
    time."""
    if runner.precision == "int8":
        from .inputs import random_feeds
        from .quantize import quantize_int8

        fp32_ms, int8_ms = fp32_runner.measure_interleaved([model, quantize_int8(model, random_feeds(model, 4))])
        return fp32_ms / int8_ms
    return profile_blocks({WHOLE_MODEL: model}, fp32_runner, cache, progress=False)[WHOLE_MODEL] / whole_ms


def from_file(prepared: Prepared, path: str, backend: str | None = None) -> LatencyTable:
    """The LatencyTable of a file written by `lmopt profile`, checked against this model."""
    table = read_table(path)
    if table["model_fingerprint"] != model_fingerprint(prepared.model):
        raise LmoptError(f"{path} was profiled on another model (or other input shapes): re-run lmopt profile")
    needed = [c.key for c in prepared.candidates] + [f"chain:{c.index}" for c in prepared.analysis.chains]
    missing = [key for key in needed if key not in table["blocks"]]
    if missing or "model_ms" not in table:
        raise LmoptError(f"{path} lacks {len(missing)} of this run's blocks (profiled with other options?): "
                         "re-run lmopt profile")
    if backend is not None and backend != table["backend"]["backend"]:
        raise LmoptError(f"{path} holds {table['backend']['backend']} latencies, not {backend}")
    timed = {c.key: table["blocks"][c.key]["ms"] for c in prepared.candidates}
    chain_ms = {c.index: table["blocks"][f"chain:{c.index}"]["ms"] for c in prepared.analysis.chains}
    result = assemble(prepared, table["backend"], str(path), timed, chain_ms, float(table["model_ms"]))
    # Segments timed into the file are offered; a file from before segments existed offers none.
    replaced_ms = {s.key: table["blocks"][s.key]["ms"] for s in prepared.segments if s.key in table["blocks"]}
    result = with_segments(result, prepared, replaced_ms, float(table["model_ms"]))
    precision = table["backend"].get("precision", "fp32")
    if precision != "fp32":
        if "model_fp32_ms" not in table:
            raise LmoptError(f"{path} holds {precision} latencies without the fp32 model's: re-run lmopt profile")
        result = replace(result, precision=precision, precision_gain=table["model_fp32_ms"] / result.whole_ms)
    return result


def two_point_fit(whole_ms: float, original_blocks_ms: float, fast_ms: float,
                  fast_blocks_ms: float, allow_negative_fixed: bool = False) -> tuple[float, float] | None:
    """(scale, fixed ms) with whole = fixed + scale * original blocks and fast = fixed + scale * fast
    blocks; None when the measurements do not give a positive scale and (unless allowed otherwise)
    a non-negative fixed time."""
    span = original_blocks_ms - fast_blocks_ms
    if span <= 0:
        return None
    scale = (whole_ms - fast_ms) / span
    fixed = whole_ms - scale * original_blocks_ms
    if scale <= 0 or (fixed < 0 and not allow_negative_fixed):
        return None
    return scale, fixed


def fit_in_context(table: LatencyTable, prepared: Prepared, runner: LatencyBackend) -> LatencyTable:
    """Blocks scaled to what they cost inside the network, for dense models and at int8.

    A dense block timed alone keeps its weights in the CPU's caches from run to run; inside the
    network every layer's weights stream from memory again, and on an encoder the blocks cost far
    more in context than alone (all-MiniLM-L6-v2 at sequence length 32: its linear layers sum to
    3.7 ms alone while removing nearly all of them saves about 6 ms of the 7.1 ms model). An int8
    block timed alone pays for quantizing its input and dequantizing its output, which inside the
    network happens once. Taking the unexplained time as fixed makes plans mispredicted. Two
    whole-model measurements, the original and the fastest plan, interleaved in one process, fix
    the two unknowns of `measured = fixed + scale * sum(blocks)`."""
    plan = fastest_plan(prepared.chain_lengths, prepared.candidates, table.block_ms)
    changes = [c for c in plan or [] if not c.is_original]
    if not changes:
        return table
    base = timing_base(prepared, runner)
    whole_ms, fast_ms = runner.measure_interleaved([whole_with(base, prepared.analysis, []),
                                                    whole_with(base, prepared.analysis, changes)])
    original = sum(table.block_ms[c.key] for c in prepared.candidates if c.is_original)
    fit = two_point_fit(whole_ms, original, fast_ms, sum(table.block_ms[c.key] for c in plan))
    if fit is None:
        return table
    scale, fixed = fit
    return replace(table, block_ms={key: ms * scale for key, ms in table.block_ms.items()}, whole_ms=whole_ms,
                   fixed_ms=fixed, estimate_ms=fixed + scale * original, scale=scale,
                   fit="the original and the fastest plan, measured whole (dense and int8 blocks cost otherwise "
                       "inside the network than timed alone)")


def fit_to_measured(table: LatencyTable, planned_ms: float, measured_speedup: float,
                    predicted_speedup: float) -> LatencyTable | None:
    """`table` fit through a measured plan: the plan whose blocks sum to `planned_ms` (predicted at
    `predicted_speedup`) then predicts its `measured_speedup`, and the original keeps its estimate.

    As fit_in_context, with the plan itself as the second point. On CNNs at fp32 the blocks' sum
    overstates what removing them saves (EfficientNet-Lite1 on ONNX Runtime CPU: plans predicted at
    1.26x, 1.52x and 2.01x measured 1.19x, 1.39x and 1.75x, each saving about 80% of what the table
    said); a fit through a plan near the target predicts its neighbours within a few percent. Only
    the speed-up is used, a ratio measured interleaved, so the fit holds at any precision (at int8
    the plan is measured quantized against the fp32 original). None when the measurement gives no
    fit (no saving to scale, or the plan measured slower than the original at the table's
    precision)."""
    original = table.estimate_ms - table.fixed_ms
    fit = two_point_fit(table.estimate_ms, original, table.precision_gain * table.estimate_ms / measured_speedup,
                        planned_ms)
    if fit is None:
        return None
    scale, fixed = fit
    return replace(table, block_ms={key: ms * scale for key, ms in table.block_ms.items()}, fixed_ms=fixed,
                   scale=table.scale * scale,
                   fit=f"a plan measured whole ({measured_speedup:.2f}x measured, {predicted_speedup:.2f}x predicted)")


def fit_between(table: LatencyTable, slow: tuple[float, float], fast: tuple[float, float]) -> LatencyTable | None:
    """`table` fit through two measured plans that bracket a target, each given as (its blocks'
    summed ms on `table`, its measured speed-up): both then predict what they measured, and a plan
    between them is predicted on the line through them (a secant step).

    A fit through one plan and the original (fit_to_measured) assumes the saving per table
    millisecond is the same for shallow and deep plans. It is not: on one CPU EfficientNet-Lite1's
    deeper plans saved more than the table said and its shallower ones less, so the fit through a
    plan that fell short chose one that overshot a 1.25x target to 1.46x, and the fit through that
    one fell short again (bench/RESULTS.md). The line through the two nearest plans on either side
    of the target holds between them. None unless the faster-measured plan has fewer planned ms
    (a positive scale); the fixed time may come out negative, as a local line may."""
    (slow_ms, slow_speedup), (fast_ms, fast_speedup) = slow, fast
    fp32_ms = table.precision_gain * table.estimate_ms
    fit = two_point_fit(fp32_ms / slow_speedup, slow_ms, fp32_ms / fast_speedup, fast_ms, allow_negative_fixed=True)
    if fit is None:
        return None
    scale, fixed = fit
    return replace(table, block_ms={key: ms * scale for key, ms in table.block_ms.items()},
                   fixed_ms=fixed,
                   scale=table.scale * scale,
                   fit=f"two plans measured whole on either side of the target ({slow_speedup:.2f}x and "
                       f"{fast_speedup:.2f}x measured)")


def profile_table(prepared: Prepared, backend_name: str | None = None, cache_path: str | bool | None = None,
                  progress: bool = True,
                  **backend_options) -> dict:
    """A latency-table file's content for every candidate block, for `lmopt profile`."""
    backend = get_backend(backend_name, **backend_options)
    cache = LatencyCache(cache_path) if cache_path is not False else None
    timed, signatures, whole_ms = time_candidates(prepared, backend, cache, progress)
    table = {**make_table(prepared.model, backend.cache_key(), timed, signatures), "model_ms": whole_ms}
    if backend.precision != "fp32":  # speed-up targets are against the fp32 original
        fp32 = get_backend(backend_name, **{**backend_options, "precision": "fp32"})
        table["model_fp32_ms"] = whole_ms * precision_gain(prepared.model, backend, fp32, whole_ms, cache)
    return table
