"""The DP selector against brute force on small synthetic chains with hand-made tables."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from lmopt.candidates import Candidate
from lmopt.select import METHODS, fastest, method_filter, select

# --------------------------------------------------------------------------- brute force


def covers(chain: int, length: int, cands: list[Candidate]):
    """Every way to cover positions 0..length of one chain with consecutive candidates."""
    by_start: dict[int, list[Candidate]] = {}
    for c in cands:
        if c.chain == chain:
            by_start.setdefault(c.start, []).append(c)

    def walk(pos):
        if pos == length:
            yield []
            return
        for c in by_start.get(pos, []):
            for rest in walk(c.end):
                yield [c] + rest

    return list(walk(0))


def all_plans(chain_lengths, cands):
    per_chain = [covers(chain, length, cands) for chain, length in sorted(chain_lengths.items())]
    for combo in itertools.product(*per_chain):
        yield [c for part in combo for c in part]


def brute_force(chain_lengths, cands, latency, damage, budget):
    """(least damage, its plans) among plans whose summed latency fits; (inf, []) when none fits."""
    best, plans = math.inf, []
    for plan in all_plans(chain_lengths, cands):
        if sum(latency[c.key] for c in plan) <= budget + 1e-9:
            d = sum(damage[c.key] for c in plan)
            if d < best - 1e-12:
                best, plans = d, [plan]
            elif abs(d - best) <= 1e-12:
                plans.append(plan)
    return best, plans


def assert_is_plan(plan, chain_lengths):
    """Each chain covered by consecutive blocks from 0 to its length, nothing else."""
    for chain, length in chain_lengths.items():
        mine = [c for c in plan if c.chain == chain]
        assert mine, f"chain {chain} not covered"
        assert mine[0].start == 0 and mine[-1].end == length
        assert all(a.end == b.start for a, b in zip(mine, mine[1:]))
    assert {c.chain for c in plan} == set(chain_lengths)


# --------------------------------------------------------------------------- synthetic tables


def synthetic(rng, chain_lengths, max_len=3, grid=True):
    """Candidates like enumerate_candidates makes (blocks up to max_len, some pruned variants) with
    latencies that a longer block lowers and damages that removing things raises."""
    cands = []
    for chain, length in chain_lengths.items():
        for start in range(length):
            for end in range(start + 1, min(length, start + max_len) + 1):
                cands.append(Candidate(chain, start, end))
                for k in range(start + 1, end + 1):
                    if rng.random() < 0.5:
                        cands.append(Candidate(chain, start, end, (k,)))
    latency, damage = {}, {}
    for c in cands:
        base = c.length * rng.integers(2, 6) - (c.length - 1) * rng.integers(0, 3) - 2 * len(c.pruned)
        lat = float(max(1, base))
        latency[c.key] = lat if grid else lat + float(rng.uniform(-0.45, 0.45))
        damage[c.key] = 0.0 if c.is_original else float(rng.uniform(0.0, 1.0) * (c.length + len(c.pruned)))
    return cands, latency, damage


CASES = [({0: 3}, 1), ({0: 4}, 2), ({0: 3, 1: 2}, 3), ({0: 4, 1: 3}, 4), ({0: 2, 1: 2, 2: 3}, 5)]


@pytest.mark.parametrize("chain_lengths,seed", CASES)
def test_dp_matches_brute_force_on_grid_latencies(chain_lengths, seed):
    """Integer latencies and a budget grid of 1/10 ms: rounding is exact, so the DP must find the
    brute-force optimum at every budget between infeasible and unconstrained."""
    rng = np.random.default_rng(seed)
    cands, latency, damage = synthetic(rng, chain_lengths)
    floor = fastest(chain_lengths, cands, latency)
    top = max(sum(latency[c.key] for c in p) for p in all_plans(chain_lengths, cands))
    checked = 0
    for budget in np.arange(1.0, top + 2.0, 1.0):
        steps = int(round(budget * 10))
        result = select(chain_lengths, cands, latency, damage, float(budget), steps=steps)
        best, plans = brute_force(chain_lengths, cands, latency, damage, budget)
        if budget < floor:
            assert result is None and best == math.inf
            continue
        assert result is not None, f"budget {budget}: a plan fits but select found none"
        plan, planned = result
        assert_is_plan(plan, chain_lengths)
        assert planned == pytest.approx(sum(latency[c.key] for c in plan))
        assert planned <= budget + 1e-9
        assert sum(damage[c.key] for c in plan) == pytest.approx(best, abs=1e-12)
        checked += 1
    assert checked >= 3


@pytest.mark.parametrize("steps", [2000, 50])
@pytest.mark.parametrize("seed", range(6))
def test_budget_respected_with_off_grid_latencies(seed, steps):
    """Latencies off the DP grid: whatever select returns fits the budget, None only when no plan
    fits, and with the default grid (2000 steps) the plan is the brute-force optimum."""
    rng = np.random.default_rng(100 + seed)
    chain_lengths = {0: 4, 1: 3}
    cands, latency, damage = synthetic(rng, chain_lengths, grid=False)
    floor = fastest(chain_lengths, cands, latency)
    for budget in np.linspace(floor * 0.9, floor * 2.5, 23):
        result = select(chain_lengths, cands, latency, damage, float(budget), steps=steps)
        best, _ = brute_force(chain_lengths, cands, latency, damage, budget)
        if best == math.inf:
            assert result is None
            continue
        assert result is not None, f"budget {budget:.4f} >= fastest {floor:.4f} but select found nothing"
        plan, planned = result
        assert_is_plan(plan, chain_lengths)
        assert planned <= budget * (1 + 1e-9)
        got = sum(damage[c.key] for c in plan)
        assert got >= best - 1e-12  # never better than the optimum: the plan is real
        if steps == 2000:
            assert got == pytest.approx(best, abs=1e-12)


def test_rounding_cannot_push_a_plan_over_the_budget():
    """Ten blocks of 1.0024 ms each round to 1/10 of a 10 ms budget: the plan is 10.024 ms."""
    cands = [Candidate(0, k, k + 1) for k in range(10)]
    latency = {c.key: 1.0024 for c in cands}
    damage = {c.key: 0.0 for c in cands}
    assert select({0: 10}, cands, latency, damage, 10.0) is None
    plan, planned = select({0: 10}, cands, latency, damage, 10.024 + 1e-9)
    assert planned == pytest.approx(10.024)


def test_budget_just_above_fastest_finds_the_fastest_plan():
    """Thirteen 1 ms blocks and a budget 0.2% above them (what the optimizer asks when the target is
    out of reach): each rounds up on the grid, yet the plan fits."""
    cands = [Candidate(0, k, k + 1) for k in range(13)]
    latency = {c.key: 1.0 for c in cands}
    damage = {c.key: 0.0 for c in cands}
    best = fastest({0: 13}, cands, latency)
    assert best == 13.0
    result = select({0: 13}, cands, latency, damage, best * 1.002)
    assert result is not None and result[1] == pytest.approx(13.0)


def test_shared_budget_goes_where_it_saves_most_damage():
    """Two chains; one merge each would save 2 ms. The budget allows one: the DP takes the cheaper
    damage (chain 1), not the first chain it meets."""
    a0, a1 = Candidate(0, 0, 1), Candidate(0, 1, 2)
    b0, b1 = Candidate(1, 0, 1), Candidate(1, 1, 2)
    ma, mb = Candidate(0, 0, 2), Candidate(1, 0, 2)
    cands = [a0, a1, b0, b1, ma, mb]
    latency = {a0.key: 2.0, a1.key: 2.0, b0.key: 2.0, b1.key: 2.0, ma.key: 2.0, mb.key: 2.0}
    damage = {a0.key: 0, a1.key: 0, b0.key: 0, b1.key: 0, ma.key: 0.5, mb.key: 0.1}
    plan, planned = select({0: 2, 1: 2}, cands, latency, damage, 6.0)
    assert set(plan) == {a0, a1, mb} and planned == 6.0
    plan, planned = select({0: 2, 1: 2}, cands, latency, damage, 8.0)
    assert set(plan) == {a0, a1, b0, b1}  # everything original fits: no damage
    plan, planned = select({0: 2, 1: 2}, cands, latency, damage, 4.0)
    assert set(plan) == {ma, mb}
    assert select({0: 2, 1: 2}, cands, latency, damage, 3.9) is None
    assert select({0: 2, 1: 2}, cands, latency, damage, 0.0) is None


@pytest.mark.parametrize("chain_lengths,seed", CASES)
def test_fastest_is_the_brute_force_minimum(chain_lengths, seed):
    rng = np.random.default_rng(seed + 50)
    cands, latency, _ = synthetic(rng, chain_lengths, grid=False)
    brute = min(sum(latency[c.key] for c in p) for p in all_plans(chain_lengths, cands))
    assert fastest(chain_lengths, cands, latency) == pytest.approx(brute, rel=1e-12)


def test_fastest_without_a_cover_is_infinite():
    cands = [Candidate(0, 0, 1)]  # position 1 -> 2 has no block
    assert fastest({0: 2}, cands, {cands[0].key: 1.0}) == math.inf
    assert select({0: 2}, cands, {cands[0].key: 1.0}, {cands[0].key: 0.0}, 100.0) is None


# --------------------------------------------------------------------------- methods


def test_method_filter_semantics():
    original = Candidate(0, 2, 3)
    merge = Candidate(0, 1, 3)
    prune_one = Candidate(0, 2, 3, (3,))
    prune_two = Candidate(0, 1, 3, (2, 3))     # both layers (e.g. a residual branch) removed
    merge_and_prune = Candidate(0, 1, 3, (2,))
    assert METHODS == ("layermerge", "kim2023", "prune")
    table = {
        "layermerge": [original, merge, prune_one, prune_two, merge_and_prune],
        "kim2023": [original, merge],
        "prune": [original, prune_one, prune_two],
    }
    for method, allowed in table.items():
        for cand in [original, merge, prune_one, prune_two, merge_and_prune]:
            assert method_filter(method, cand) == (cand in allowed), (method, cand.key)
    with pytest.raises(ValueError):
        method_filter("nonsense", merge)


@pytest.mark.parametrize("method", METHODS)
def test_select_with_a_method_uses_only_its_candidates(method):
    rng = np.random.default_rng(9)
    chain_lengths = {0: 4, 1: 3}
    cands, latency, damage = synthetic(rng, chain_lengths)
    mine = [c for c in cands if method_filter(method, c)]
    floor = fastest(chain_lengths, mine, latency)
    assert floor >= fastest(chain_lengths, cands, latency)  # fewer choices can only be slower
    budget = floor + 1.0
    plan, planned = select(chain_lengths, mine, latency, damage, budget, steps=int(budget * 10))
    assert all(method_filter(method, c) for c in plan)
    best, _ = brute_force(chain_lengths, mine, latency, damage, budget)
    assert sum(damage[c.key] for c in plan) == pytest.approx(best, abs=1e-12)
