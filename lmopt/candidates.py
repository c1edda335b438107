"""Candidate blocks, as LayerMerge enumerates them, from the analysis alone.

A candidate is a block (start, end] of a chain with the set of its layers that are pruned:
the activations of units start+1 .. end-1 are removed, pruned layers become identities (or,
when every layer of a residual branch is pruned, the branch is removed), and what is left
merges into one layer followed by the activation of unit `end`.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

import numpy as np
import onnx_graphsurgeon as gs

from .algebra.lowrank import ranks_for
from .analysis import Analysis, Chain


@dataclass(frozen=True)
class Candidate:
    chain: int
    start: int
    end: int
    pruned: tuple[int, ...] = ()   # unit numbers k, start < k <= end
    rank: int = 0                  # > 0: the merged dense layer factored as in -> rank -> out

    @property
    def key(self) -> str:
        text = f"c{self.chain}:{self.start}-{self.end}"
        text += f"/p{'.'.join(map(str, self.pruned))}" if self.pruned else ""
        return text + (f"/r{self.rank}" if self.rank else "")

    @property
    def is_original(self) -> bool:
        return self.end == self.start + 1 and not self.pruned and not self.rank

    @property
    def length(self) -> int:
        return self.end - self.start


def removed_activations(chain: Chain, cand: Candidate) -> list[int]:
    """Units whose activation the candidate removes."""
    return [k for k in range(cand.start + 1, cand.end) if chain.units[k - 1].act is not None]


def branch_start(chain: Chain, k: int) -> int | None:
    """The position a residual branch ending at unit k starts from (None: no branch to remove).
    An external shortcut (from before the chain) counts as a branch from position 0 when the
    chain start feeds only this branch."""
    skip = chain.units[k - 1].skip
    if skip is None:
        return None
    if skip.position is not None:
        return skip.position
    return 0 if skip.external_branch_removable else None


def removed_branches(chain: Chain, cand: Candidate) -> list[int]:
    """Units k whose whole residual branch the candidate prunes (the branch then contributes 0)."""
    pruned = set(cand.pruned)
    result = []
    for k in range(cand.start + 1, cand.end + 1):
        p = branch_start(chain, k)
        if p is not None and p >= cand.start and all(m in pruned for m in range(p + 1, k + 1)):
            result.append(k)
    return result


def position_reach(chain: Chain, graph_outputs: set[str], consumers: dict[str, int]) -> list[float]:
    """For each position k, the last unit that reads x_k (inf when something off the chain does)."""
    reach = [float(k + 1) for k in range(len(chain) + 1)]
    readers = {k: 1 for k in range(len(chain) + 1)}  # the next layer
    for m, unit in enumerate(chain.units, start=1):
        if unit.skip is not None and unit.skip.position is not None:
            p = unit.skip.position
            reach[p] = max(reach[p], m)
            readers[p] += 1
    for k, name in enumerate(chain.positions):
        if k == len(chain) or name in graph_outputs or consumers.get(name, 0) > readers[k]:
            reach[k] = float("inf")
    return reach


def _conv_extent(graph_nodes: dict, chain: Chain, cand: Candidate) -> int:
    """Largest receptive extent of the merged kernel over spatial dims (1 when dense)."""
    if chain.kind != "conv":
        return 1
    extent, stride = None, None
    for k in range(cand.start + 1, cand.end + 1):
        if k in cand.pruned:
            continue
        node = graph_nodes[chain.units[k - 1].layer]
        kernel = np.array(node.inputs[1].shape[2:])
        dil = np.array(node.attrs.get("dilations", [1] * len(kernel)))
        s = np.array(node.attrs.get("strides", [1] * len(kernel)))
        span = dil * (kernel - 1)
        if extent is None:
            extent, stride = span + 1, s
        else:
            extent, stride = extent + stride * span, stride * s
    return 1 if extent is None else int(extent.max())


def block_is_valid(chain: Chain, start: int, end: int, reach: list[float]) -> bool:
    for k in range(start + 1, end):
        if reach[k] > end:
            return False  # an inner tensor is needed after the block
        skip = chain.units[k - 1].skip
        if skip is not None and (skip.position is None or skip.position < start):
            return False  # a shortcut from before the block joins inside it
    return True


def pruning_is_valid(chain: Chain, cand: Candidate) -> bool:
    in_branch = set()
    for k in removed_branches(chain, cand):
        in_branch.update(range(branch_start(chain, k) + 1, k + 1))
    for k in cand.pruned:
        if k not in in_branch and not chain.units[k - 1].prunable:
            return False
    return True


def enumerate_candidates(analysis: Analysis, graph: gs.Graph, *, max_kernel: int = 7,
                         max_length: int = 6, max_pruned: int = 2, allow_prune: bool = True,
                         low_rank: bool = False) -> list[Candidate]:
    """Every valid candidate of every chain; original one-layer blocks always included. With
    `low_rank`, each merged block of a dense chain also comes factored (see algebra.lowrank)."""
    nodes = {n.name: n for n in graph.nodes}
    outputs = {t.name for t in graph.outputs}
    consumers = {name: len(t.outputs) for name, t in graph.tensors().items()}
    result: list[Candidate] = []
    for chain in analysis.chains:
        reach = position_reach(chain, outputs, consumers)
        for start in range(len(chain)):
            for end in range(start + 1, min(len(chain), start + max_length) + 1):
                if not block_is_valid(chain, start, end, reach):
                    continue
                units = range(start + 1, end + 1)
                choices = [()]
                if allow_prune:
                    choices += [c for r in range(1, min(max_pruned, len(units)) + 1) for c in combinations(units, r)]
                    # removing a whole residual branch may need more than max_pruned layers
                    for k in units:
                        p = branch_start(chain, k)
                        if p is not None and p >= start and k - p > max_pruned:
                            choices.append(tuple(range(p + 1, k + 1)))
                for pruned in dict.fromkeys(choices):
                    cand = Candidate(chain.index, start, end, tuple(pruned))
                    if pruned and not pruning_is_valid(chain, cand):
                        continue
                    if cand.length > 1 or pruned:
                        if _conv_extent(nodes, chain, cand) > max_kernel:
                            continue
                    result.append(cand)
                    widths = chain.units[start].in_shape[-1:] + chain.units[end - 1].out_shape[-1:]
                    if (low_rank and chain.kind == "dense" and cand.length > 1 and not pruned and len(widths) == 2
                            and all(isinstance(w, int) for w in widths)):
                        result += [Candidate(chain.index, start, end, (), r) for r in ranks_for(*widths)]
    return result


def merge_runs(analysis: Analysis, graph: gs.Graph, exact_only: bool = False) -> list[Candidate]:
    """Maximal blocks with no activation inside: what `lmopt merge` folds (no pruning). With
    `exact_only`, each run is cut before every padded conv after its first layer, so that what
    remains merges exactly (a padded later conv is what makes a merge differ at the borders)."""
    nodes = {n.name: n for n in graph.nodes}
    outputs = {t.name for t in graph.outputs}
    consumers = {name: len(t.outputs) for name, t in graph.tensors().items()}
    runs = []
    for chain in analysis.chains:
        reach = position_reach(chain, outputs, consumers)

        def padded(k: int) -> bool:
            node = nodes[chain.units[k - 1].layer]
            return node.op == "Conv" and any(node.attrs.get("pads", [0]))

        start = 0
        while start < len(chain):
            end = start + 1
            while (end < len(chain) and chain.units[end - 1].act is None
                   and not (exact_only and padded(end + 1))
                   and block_is_valid(chain, start, end + 1, reach)):
                end += 1
            if end - start > 1:
                runs.append(Candidate(chain.index, start, end))
            start = end
    return runs

