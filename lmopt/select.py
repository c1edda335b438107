"""The DP selector (LayerMerge, single stage) and its baselines.

Per chain, positions 0..L: M[j][t] = least summed damage of the first j layers within latency
t, M[j][t] = min over candidates (i, j] of M[i][t - T(i,j)] + D(i,j). Latency is discretised;
back-pointers rebuild the plan. Chains share one budget through a min-plus combination.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .candidates import Candidate
from .errors import LmoptError
from .segments import Segment

if TYPE_CHECKING:  # profile imports this module
    from .profile import LatencyTable

logger = logging.getLogger(__name__)

METHODS = ("layermerge", "kim2023", "prune")


def method_filter(method: str, cand: Candidate | Segment) -> bool:
    """Which candidates a method may use. kim2023: activation removal and merging (no pruning, no low rank,
    no whole-layer segments); prune: only whole layers, residual branches or segments removed (a
    knapsack over layers), never a fitted map."""
    if method == "layermerge" or cand.is_original:
        return True
    if isinstance(cand, Segment):
        return method == "prune" and cand.mode == "identity"
    if method == "kim2023":
        return not cand.pruned and not cand.rank
    if method == "prune":
        return len(cand.pruned) == cand.length
    raise ValueError(method)


def _chain_table(chain_len: int, cands: list[Candidate], cost: dict, damage: dict, steps: int):
    best = np.full((chain_len + 1, steps + 1), np.inf)
    best[0, :] = 0.0
    choice = np.full((chain_len + 1, steps + 1), -1, dtype=np.int64)
    by_end: dict[int, list[int]] = {}
    for index, cand in enumerate(cands):
        by_end.setdefault(cand.end, []).append(index)
    for j in range(1, chain_len + 1):
        for index in by_end.get(j, []):
            cand = cands[index]
            c = cost[cand.key]
            if c > steps:
                continue
            value = np.full(steps + 1, np.inf)
            value[c:] = best[cand.start, : steps + 1 - c] + damage[cand.key]
            better = value < best[j]
            best[j][better] = value[better]
            choice[j][better] = index
    return best[chain_len], choice


def _backtrack(chain_len: int, cands: list[Candidate], choice, cost: dict, t: int) -> list[Candidate]:
    plan, j = [], chain_len
    while j > 0:
        cand = cands[choice[j, t]]
        plan.append(cand)
        t -= cost[cand.key]
        j = cand.start
    return plan[::-1]


def _min_plus(before: np.ndarray, final: np.ndarray, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """(merged, split): merged[t] = min over t_chain of before[t - t_chain] + final[t_chain], and the
    t_chain that gives it. `final` never increases with t, so only the t where it drops can be best."""
    merged = np.full(steps + 1, np.inf)
    split = np.zeros(steps + 1, dtype=np.int64)
    finite = np.isfinite(final)
    drops = np.nonzero(finite & ~np.concatenate(([False], final[1:] >= final[:-1])))[0]
    for t_chain in drops:
        value = np.full(steps + 1, np.inf)
        value[t_chain:] = before[: steps + 1 - t_chain] + final[t_chain]
        better = value < merged
        merged[better] = value[better]
        split[better] = t_chain
    return merged, split


def _ending(chain_lengths: dict[int, int], segments: Sequence[Segment]) -> tuple[list[int], dict[int, list[int]]]:
    """(chains in DP order, segments by the DP step that ends them): a segment covers a run of
    consecutive chains, so it replaces DP steps first..last at once."""
    order = sorted(chain_lengths)
    step = {chain: i for i, chain in enumerate(order)}
    ending: dict[int, list[int]] = {}
    for index, seg in enumerate(segments):
        if all(c in step for c in seg.chains) and step[seg.chains[-1]] - step[seg.chains[0]] == len(seg.chains) - 1:
            ending.setdefault(step[seg.chains[-1]] + 1, []).append(index)
    return order, ending


def _grid_tables(chain_lengths: dict[int, int], candidates: list[Candidate], latency: dict[str, float],
                 damage: dict[str, float], budget_ms: float, steps: int, segments: Sequence[Segment] = ()):
    """The per-chain DP tables and their min-plus combination on a grid of budget/steps. Chains are
    combined in index order; best[i] is the least damage of the first i chains by latency, and a
    segment ending at chain i competes there with what chains first..i give."""
    quantum = budget_ms / steps
    # Rounded down (+1e-6: 3.0 / 0.1 is 29.999999999999996, which is 30 steps): every plan that
    # really fits the budget also fits on the grid.
    cost = {c.key: max(0, int(math.floor(latency[c.key] / quantum + 1e-6))) for c in [*candidates, *segments]}
    order, ending = _ending(chain_lengths, segments)
    best = [np.zeros(steps + 1)]
    tables = []
    for i, chain in enumerate(order, start=1):
        cands = [c for c in candidates if c.chain == chain]
        final, choice = _chain_table(chain_lengths[chain], cands, cost, damage, steps)
        merged, split = _min_plus(best[-1], final, steps)
        via = np.full(steps + 1, -1, dtype=np.int64)  # the segment that gives merged[t], -1 for none
        for index in ending.get(i, []):
            seg = segments[index]
            c = cost[seg.key]
            if c > steps:
                continue
            value = np.full(steps + 1, np.inf)
            value[c:] = best[i - len(seg.chains)][: steps + 1 - c] + damage[seg.key]
            better = value < merged
            merged[better] = value[better]
            via[better] = index
        tables.append((chain, chain_lengths[chain], cands, choice, split, via))
        best.append(merged)
    return tables, best[-1], cost, quantum


def _rebuild(tables: list, segments: Sequence[Segment], cost: dict, capacity: int) -> list:
    plan, t, i = [], capacity, len(tables)
    while i > 0:
        chain, length, cands, choice, split, via = tables[i - 1]
        if via[t] >= 0:
            seg = segments[via[t]]
            plan.insert(0, seg)
            t -= cost[seg.key]
            i -= len(seg.chains)
        else:
            t_chain = int(split[t])
            plan = _backtrack(length, cands, choice, cost, t_chain) + plan
            t -= t_chain
            i -= 1
    return plan


def select(chain_lengths: dict[int, int], candidates: list[Candidate], latency: dict[str, float],
           damage: dict[str, float], budget_ms: float, steps: int = 2000,
           segments: Sequence[Segment] = ()) -> tuple[list, float] | None:
    """Least-damage plan whose summed block latency fits `budget_ms`; None when nothing fits.
    `segments` (whole-layer candidates) each replace the blocks of a run of chains.

    Latencies are rounded down to the grid (budget/steps), so the grid holds every plan that
    really fits: when the grid's best plan really fits, it is the optimum (rounding to nearest
    would let plans over the budget through, and miss plans that fit exactly). When rounding hid
    its excess, a 16x finer grid is tried; then the capacity shrinks by the excess; at last the
    least-latency plan is taken. The returned plan always fits, and None means that no plan fits
    (budget below `fastest`)."""
    if budget_ms <= 0:
        return None
    limit = budget_ms * (1 + 1e-9)  # float sums of the same latencies may differ in the last bits
    for grid in (steps, steps * 16):
        tables, combined, cost, quantum = _grid_tables(chain_lengths, candidates, latency, damage, budget_ms, grid,
                                                       segments)
        capacity = grid
        for _ in range(1 if grid == steps else 32):
            if capacity < 0 or not np.isfinite(combined[capacity]):
                break
            plan = _rebuild(tables, segments, cost, capacity)
            total = sum(latency[c.key] for c in plan)
            if total <= limit:
                return plan, total
            capacity -= max(1, math.ceil((total - budget_ms) / quantum))  # rounding hid this excess
    # Nothing on the grids really fits: the least-latency plan does, if anything does.
    plan = fastest_plan(chain_lengths, candidates, latency, segments)
    total = sum(latency[c.key] for c in plan) if plan is not None else math.inf
    return (plan, total) if total <= limit else None


def _chain_shortest(length: int, cands: list[Candidate], latency: dict[str, float]) -> list[Candidate] | None:
    best: list[float] = [0.0] + [math.inf] * length
    back: list[Candidate | None] = [None] * (length + 1)
    for j in range(1, length + 1):
        for cand in cands:
            if cand.end == j and best[cand.start] + latency[cand.key] < best[j]:
                best[j], back[j] = best[cand.start] + latency[cand.key], cand
    if not math.isfinite(best[length]):
        return None
    path, j = [], length
    while j > 0:
        path.append(back[j])
        j = back[j].start
    return path[::-1]


def fastest_plan(chain_lengths: dict[int, int], candidates: list[Candidate], latency: dict[str, float],
                 segments: Sequence[Segment] = ()) -> list | None:
    """A plan of least summed block latency (a shortest path per chain, or a segment over a run of
    chains where that is faster); None if a chain has no cover."""
    order, ending = _ending(chain_lengths, segments)
    best: list[float] = [0.0]
    back: list[list] = [[]]
    for i, chain in enumerate(order, start=1):
        path = _chain_shortest(chain_lengths[chain], [c for c in candidates if c.chain == chain], latency)
        value = best[-1] + sum(latency[c.key] for c in path) if path is not None else math.inf
        step = (1, path)
        for index in ending.get(i, []):
            seg = segments[index]
            if best[i - len(seg.chains)] + latency[seg.key] < value:
                value, step = best[i - len(seg.chains)] + latency[seg.key], (len(seg.chains), [seg])
        best.append(value)
        back.append(step)
    if not math.isfinite(best[-1]):
        return None
    plan, i = [], len(order)
    while i > 0:
        count, blocks = back[i]
        plan = blocks + plan
        i -= count
    return plan


def fastest(chain_lengths: dict[int, int], candidates: list[Candidate], latency: dict[str, float],
            segments: Sequence[Segment] = ()) -> float:
    """Least summed block latency any plan reaches."""
    plan = fastest_plan(chain_lengths, candidates, latency, segments)
    return math.inf if plan is None else sum(latency[c.key] for c in plan)


@dataclass
class Plan:
    """The chosen blocks (every chain covered; `changes` are the ones that rewrite something)."""
    blocks: list[Candidate | Segment]
    planned_ms: float  # summed block latency
    predicted_speedup: float
    target_met: bool
    method: str

    @property
    def changes(self) -> list[Candidate | Segment]:
        return [c for c in self.blocks if not c.is_original]


def tie_broken(candidates: list[Candidate], latency: dict, damage: dict, segments: Sequence[Segment] = ()) -> dict:
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
    chain_ms: dict[int, float] = {}
    for (chain, _), ms in original.items():
        chain_ms[chain] = chain_ms.get(chain, 0.0) + ms
    for seg in segments:
        span_ms = sum(chain_ms.get(chain, 0.0) for chain in seg.chains)
        ranking[seg.key] = damage[seg.key] + charge * max(0.0, span_ms - latency[seg.key])
    return ranking


def check_target(target: float) -> float:
    if not target or target < 1.0:
        raise LmoptError(f"--target must be at least 1 (a speed-up factor such as 1.5 or 2x), got {target}")
    return target


def choose(table: LatencyTable, chain_lengths: dict[int, int], candidates: list[Candidate], damage: dict[str, float],
           target: float, method: str, segments: Sequence[Segment] = ()) -> Plan:
    """The plan of least summed `damage` within `target`'s budget on `table` (a profile.LatencyTable),
    using the `method`'s candidates, and the segments that were timed and scored; the fastest plan
    when the target is out of reach."""
    check_target(target)
    candidates = [c for c in candidates if method_filter(method, c)]
    segments = [s for s in segments if method_filter(method, s) and s.key in table.block_ms and s.key in damage]
    ranking = tie_broken(candidates, table.block_ms, damage, segments)
    chosen = select(chain_lengths, candidates, table.block_ms, ranking, table.budget(target), segments=segments)
    target_met = chosen is not None
    if not target_met:
        best_blocks = fastest(chain_lengths, candidates, table.block_ms, segments)
        logger.info("lmopt: target %gx is out of reach: the best achievable is about %.2fx; using that",
                    target, table.predicted_speedup(best_blocks))
        chosen = select(chain_lengths, candidates, table.block_ms, ranking, best_blocks * 1.002, segments=segments)
        if chosen is None:  # cannot happen: the fastest plan fits its own latency
            raise LmoptError("internal error: the planner found no plan at the fastest latency")
    blocks, planned_ms = chosen
    return Plan(blocks, planned_ms, table.predicted_speedup(planned_ms), target_met, method)
