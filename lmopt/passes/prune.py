"""Pruning: one layer becomes an identity, or a whole residual branch is removed."""
from __future__ import annotations

import onnx_graphsurgeon as gs

from ..analysis import Chain
from ..candidates import Candidate, branch_start
from ..errors import LmoptError
from .merge import rewrite_block


def prune_layer(graph: gs.Graph, chain: Chain, k: int) -> None:
    """Replace the layer of unit k by an identity (needs the same shape in and out)."""
    if not chain.units[k - 1].prunable:
        raise LmoptError(f"layer {chain.units[k - 1].layer} changes the tensor shape: it cannot become an identity")
    rewrite_block(graph, chain, Candidate(chain.index, k - 1, k, (k,)))


def prune_branch(graph: gs.Graph, chain: Chain, k: int) -> None:
    """Remove the residual branch that ends at unit k: the unit's output becomes its shortcut."""
    start = branch_start(chain, k)
    if start is None:
        raise LmoptError(f"unit {k} of chain {chain.index} ends no removable residual branch")
    rewrite_block(graph, chain, Candidate(chain.index, start, k, tuple(range(start + 1, k + 1))))
