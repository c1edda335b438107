"""Least-squares refit of a merged layer on calibration activations.

Removing activations makes a block nonlinear-free, and the merged layer is then only the exact
composition of the remaining linear layers. Refitting its weights (same shape: kernel, stride,
padding, groups) so that it best reproduces the original block's output on calibration data
recovers much of what the removed nonlinearities cost, with no training loop.
"""
from __future__ import annotations

import numpy as np

from .linear import ConvSpec, DenseSpec

MAX_COLUMNS = 2400    # unknowns per output (a Gram matrix of MAX_COLUMNS^2 doubles, ~46 MB)
MAX_ROWS = 20000      # sampled output positions
# Fewer rows than this many per unknown and the fit would memorise the calibration data (and
# the importance, measured on that data, would look perfect): no refit then.
MIN_ROWS_PER_UNKNOWN = 8


def _solve(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Ridge least squares with a bias column: returns (cols + 1, outputs)."""
    x = np.concatenate([x, np.ones((x.shape[0], 1))], axis=1)
    gram = x.T @ x
    ridge = 1e-6 * np.trace(gram) / gram.shape[0] + 1e-12
    return np.linalg.solve(gram + ridge * np.eye(gram.shape[0]), x.T @ y)


def _rows(count: int, rng: np.random.Generator) -> np.ndarray:
    return np.sort(rng.choice(count, MAX_ROWS, replace=False)) if count > MAX_ROWS else np.arange(count)


def _patches(x: np.ndarray, spec: ConvSpec, n: np.ndarray, h: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The input windows of output positions (n, h, w) as float64 (rows, C, kh, kw), zero where they
    reach into the padding; gathered directly, without a padded copy of the whole input."""
    (kh, kw), (sh, sw), (dh, dw) = spec.weight.shape[2:], spec.strides, spec.dilations
    ys = h[:, None] * sh - spec.pads_begin[0] + np.arange(kh) * dh   # rows, kh
    xs = w[:, None] * sw - spec.pads_begin[1] + np.arange(kw) * dw   # rows, kw
    inside = ((ys >= 0) & (ys < x.shape[2]))[:, :, None] & ((xs >= 0) & (xs < x.shape[3]))[:, None, :]
    ys, xs = np.clip(ys, 0, x.shape[2] - 1), np.clip(xs, 0, x.shape[3] - 1)
    gathered = x[n[:, None, None], :, ys[:, :, None], xs[:, None, :]]  # rows, kh, kw, C
    return (gathered * inside[..., None]).transpose(0, 3, 1, 2).astype(np.float64)


def refit_conv(spec: ConvSpec, x: np.ndarray, y: np.ndarray, seed: int = 0) -> ConvSpec | None:
    """Weights of `spec`'s shape minimising ||conv(x) - y||^2 (x: N,C,H,W; y: N,Cout,Ho,Wo).
    None when the problem is too large or not 2-D."""
    if spec.ndim != 2 or spec.weight[0].size > MAX_COLUMNS:
        return None
    out_h, out_w = y.shape[2:]
    if x.shape[0] * out_h * out_w < MIN_ROWS_PER_UNKNOWN * (spec.weight[0].size + 1):
        return None
    rows = _rows(x.shape[0] * out_h * out_w, np.random.default_rng(seed))
    n, h, w = np.unravel_index(rows, (x.shape[0], out_h, out_w))
    patches = _patches(x, spec, n, h, w)  # rows, C, kh, kw: only the sampled positions are gathered
    targets = y[n, :, h, w].astype(np.float64)  # rows, Cout
    cin_g, cout_g = spec.weight.shape[1], spec.out_channels // spec.group
    weight, bias = np.empty_like(spec.weight), np.empty_like(spec.bias)
    for g in range(spec.group):
        cols = patches[:, g * cin_g:(g + 1) * cin_g].reshape(len(rows), -1)
        solution = _solve(cols, targets[:, g * cout_g:(g + 1) * cout_g])
        weight[g * cout_g:(g + 1) * cout_g] = solution[:-1].T.reshape((cout_g,) + spec.weight.shape[1:])
        bias[g * cout_g:(g + 1) * cout_g] = solution[-1]
    return ConvSpec(weight, bias, spec.strides, spec.pads_begin, spec.pads_end, spec.dilations, spec.group)


def refit_dense(spec: DenseSpec, x: np.ndarray, y: np.ndarray, seed: int = 0) -> DenseSpec | None:
    """y ~ x W + b on the last axis (x: ..., in; y: ..., out)."""
    if spec.weight.shape[0] > MAX_COLUMNS:
        return None
    x = x.reshape(-1, x.shape[-1]).astype(np.float64)
    y = y.reshape(-1, y.shape[-1]).astype(np.float64)
    if x.shape[0] < MIN_ROWS_PER_UNKNOWN * (x.shape[1] + 1):
        return None
    rows = _rows(x.shape[0], np.random.default_rng(seed))
    solution = _solve(x[rows], y[rows])
    return DenseSpec(solution[:-1], solution[-1])


def affine_fit(current: np.ndarray, target: np.ndarray, channel_axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (scale, shift) minimising ||scale * current + shift - target||^2."""
    z = np.moveaxis(current, channel_axis, 0).reshape(current.shape[channel_axis], -1).astype(np.float64)
    y = np.moveaxis(target, channel_axis, 0).reshape(target.shape[channel_axis], -1).astype(np.float64)
    zc, yc = z - z.mean(1, keepdims=True), y - y.mean(1, keepdims=True)
    variance = (zc ** 2).mean(1)
    scale = np.where(variance > 1e-12, (zc * yc).mean(1) / np.maximum(variance, 1e-12), 1.0)
    return scale, y.mean(1) - scale * z.mean(1)
