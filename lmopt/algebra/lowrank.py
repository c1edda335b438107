"""Low-rank variants of a collapsed dense block: d_in -> r -> d_out instead of one d_in x d_out layer.

A collapsed MLP is one d x d layer; with r < d/2 the factored pair does fewer multiply-adds, and the
planner takes it where the pair is measured faster and the outputs move little. With calibration
data the factors are the reduced-rank regression of the block's target (the least-squares map
projected on the top r directions of its fitted outputs); without, the truncated SVD of the weight.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .linear import DenseSpec


@dataclass
class LowRankSpec:
    """y = (x @ first) @ second + bias; first: (in, r), second: (r, out)."""
    first: np.ndarray
    second: np.ndarray
    bias: np.ndarray

    @property
    def rank(self) -> int:
        return self.first.shape[1]

    def dense(self) -> DenseSpec:
        return DenseSpec(self.first @ self.second, self.bias)


def ranks_for(in_features: int, out_features: int) -> list[int]:
    """Ranks worth a candidate: a quarter and an eighth of the smaller side (below half, at least 8)."""
    smaller = min(in_features, out_features)
    return [r for r in (smaller // 4, smaller // 8) if r >= 8]


def truncated(spec: DenseSpec, rank: int) -> LowRankSpec:
    """The best rank-`rank` approximation of the weight (Eckart-Young), bias kept."""
    u, s, vt = np.linalg.svd(np.asarray(spec.weight, np.float64), full_matrices=False)
    return LowRankSpec(u[:, :rank] * s[:rank], vt[:rank], np.asarray(spec.bias, np.float64))


def reduced_rank(spec: DenseSpec, rank: int, x: np.ndarray) -> LowRankSpec:
    """Reduced-rank regression from a fitted `spec` (y ~ x W + b): W V_r V_r^T, with V_r the top right
    singular vectors of the centred fitted outputs x W, so that the rank-r map loses the least of
    what the full map predicts on `x`."""
    x = x.reshape(-1, x.shape[-1]).astype(np.float64)
    weight = np.asarray(spec.weight, np.float64)
    fitted = x @ weight
    _, _, vt = np.linalg.svd(fitted - fitted.mean(0), full_matrices=False)
    basis = vt[:rank].T                                   # (out, r)
    bias = np.asarray(spec.bias, np.float64)
    # the mean of the outputs is carried by the bias, so the rank is spent on the variation
    shift = (x.mean(0) @ weight) @ (np.eye(len(basis)) - basis @ basis.T)
    return LowRankSpec(weight @ basis, basis.T, bias + shift)
