"""The DP selector (LayerMerge, single stage) and its baselines.

Per chain, positions 0..L: M[j][t] = least summed damage of the first j layers within latency
t, M[j][t] = min over candidates (i, j] of M[i][t - T(i,j)] + D(i,j). Latency is discretised;
back-pointers rebuild the plan. Chains share one budget through a min-plus combination.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .candidates import Candidate
from .errors import LmoptError

if TYPE_CHECKING:  # profile imports this module
    from .profile import LatencyTable

logger = logging.getLogger(__name__)

METHODS = ("layermerge", "kim2023", "prune")


def method_filter(method: str, cand: Candidate) -> bool:
    """Which candidates a method may use. kim2023: activation removal and merging (no pruning, no low rank);
    prune: only whole layers or residual branches removed (a knapsack over layers)."""
    if method == "layermerge" or cand.is_original:
        return True
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


def _grid_tables(chain_lengths: dict[int, int], candidates: list[Candidate], latency: dict[str, float],
                 damage: dict[str, float], budget_ms: float, steps: int):
    """The per-chain DP tables and their min-plus combination on a grid of budget/steps."""
    quantum = budget_ms / steps
    # Rounded down (+1e-6: 3.0 / 0.1 is 29.999999999999996, which is 30 steps): every plan that
    # really fits the budget also fits on the grid.
    cost = {c.key: max(0, int(math.floor(latency[c.key] / quantum + 1e-6))) for c in candidates}
    combined = np.zeros(steps + 1)
    tables = []
    for chain, length in sorted(chain_lengths.items()):
        cands = [c for c in candidates if c.chain == chain]
        final, choice = _chain_table(length, cands, cost, damage, steps)
        # min-plus combination with the chains before: split[t] = latency given to this chain.
        # `final` never increases with t, so only the t where it drops can be best.
        merged = np.full(steps + 1, np.inf)
        split = np.zeros(steps + 1, dtype=np.int64)
        finite = np.isfinite(final)
        drops = np.nonzero(finite & ~np.concatenate(([False], final[1:] >= final[:-1])))[0]
        for t_chain in drops:
            value = np.full(steps + 1, np.inf)
            value[t_chain:] = combined[: steps + 1 - t_chain] + final[t_chain]
            better = value < merged
            merged[better] = value[better]
            split[better] = t_chain
        tables.append((chain, length, cands, final, choice, split))
        combined = merged
    return tables, combined, cost, quantum


def select(chain_lengths: dict[int, int], candidates: list[Candidate], latency: dict[str, float],
           damage: dict[str, float], budget_ms: float, steps: int = 2000) -> tuple[list[Candidate], float] | None:
    """Least-damage plan whose summed block latency fits `budget_ms`; None when nothing fits.

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
        tables, combined, cost, quantum = _grid_tables(chain_lengths, candidates, latency, damage, budget_ms, grid)
        capacity = grid
        for _ in range(1 if grid == steps else 32):
            if capacity < 0 or not np.isfinite(combined[capacity]):
                break
            plan, t = [], capacity
            for chain, length, cands, final, choice, split in reversed(tables):
                t_chain = int(split[t])
                plan = _backtrack(length, cands, choice, cost, t_chain) + plan
                t -= t_chain
            total = sum(latency[c.key] for c in plan)
            if total <= limit:
                return plan, total
            capacity -= max(1, math.ceil((total - budget_ms) / quantum))  # rounding hid this excess
    # Nothing on the grids really fits: the least-latency plan does, if anything does.
    plan = fastest_plan(chain_lengths, candidates, latency)
    total = sum(latency[c.key] for c in plan) if plan is not None else math.inf
    return (plan, total) if total <= limit else None


def fastest_plan(chain_lengths: dict[int, int], candidates: list[Candidate],
                 latency: dict[str, float]) -> list[Candidate] | None:
    """A plan of least summed block latency (a shortest path per chain); None if a chain has no cover."""
    plan: list[Candidate] = []
    for chain, length in sorted(chain_lengths.items()):
        best: list[float] = [0.0] + [math.inf] * length
        back: list[Candidate | None] = [None] * (length + 1)
        for j in range(1, length + 1):
            for cand in candidates:
                if cand.chain == chain and cand.end == j and best[cand.start] + latency[cand.key] < best[j]:
                    best[j], back[j] = best[cand.start] + latency[cand.key], cand
        if not math.isfinite(best[length]):
            return None
        path, j = [], length
        while j > 0:
            path.append(back[j])
            j = back[j].start
        plan += path[::-1]
    return plan


def fastest(chain_lengths: dict[int, int], candidates: list[Candidate], latency: dict[str, float]) -> float:
    """Least summed block latency any plan reaches (a shortest path per chain)."""
    plan = fastest_plan(chain_lengths, candidates, latency)
    return math.inf if plan is None else sum(latency[c.key] for c in plan)


@dataclass
class Plan:
    """The chosen blocks (every chain covered; `changes` are the ones that rewrite something)."""
    blocks: list[Candidate]
    planned_ms: float  # summed block latency
    predicted_speedup: float
    target_met: bool
    method: str

    @property
    def changes(self) -> list[Candidate]:
        return [c for c in self.blocks if not c.is_original]


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


def check_target(target: float) -> float:
    if not target or target < 1.0:
        raise LmoptError(f"--target must be at least 1 (a speed-up factor such as 1.5 or 2x), got {target}")
    return target


def choose(table: LatencyTable, chain_lengths: dict[int, int], candidates: list[Candidate], damage: dict[str, float],
           target: float, method: str) -> Plan:
    """The plan of least summed `damage` within `target`'s budget on `table` (a profile.LatencyTable),
    using the `method`'s candidates; the fastest plan when the target is out of reach."""
    check_target(target)
    candidates = [c for c in candidates if method_filter(method, c)]
    ranking = tie_broken(candidates, table.block_ms, damage)
    chosen = select(chain_lengths, candidates, table.block_ms, ranking, table.budget(target))
    target_met = chosen is not None
    if not target_met:
        best_blocks = fastest(chain_lengths, candidates, table.block_ms)
        logger.info("lmopt: target %gx is out of reach: the best achievable is about %.2fx; using that",
                    target, table.predicted_speedup(best_blocks))
        chosen = select(chain_lengths, candidates, table.block_ms, ranking, best_blocks * 1.002)
        if chosen is None:  # cannot happen: the fastest plan fits its own latency
            raise LmoptError("internal error: the planner found no plan at the fastest latency")
    blocks, planned_ms = chosen
    return Plan(blocks, planned_ms, table.predicted_speedup(planned_ms), target_met, method)
