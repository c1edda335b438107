"""Pure linear algebra for merging linear layers (LayerMerge / LayerCollapse); numpy only.

Everything here works on plain specs (weights as float64 arrays plus attributes) and knows
nothing about graphs; the graph passes translate ONNX nodes to specs and back, casting the
float64 results to the model's dtype.

Conventions (ONNX Conv, cross-correlation): for one spatial dim,

    y[o, i] = b[o] + sum_{c, u} W[o, c, u] * x[c, s*i + d*u - p_begin]     (x = 0 outside [0, N))

Composition.  second(first(x)) with no padding in `second` reads x at
``s1*s2*i + (s1*d2*v + d1*u) - p1b``: one conv with stride s1*s2, tap offsets
``w = s1*d2*v + d1*u`` and weights ``W[o, c, w] = sum W2[o, m, v] W1[m, c, u]``.  Padding in a
later conv breaks exactness: the chain zero-pads the *intermediate* map, while the merged conv
computes the intermediate map over the zero-padded input (bias and partial sums leak into what
the chain saw as zeros).  The merged conv then equals the chain whose padding was all moved to
the first conv (``pads_begin = p1b + s1*p2b``) and differs from the original chain only in a
border band of the output (see :func:`border_band`).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import reduce
from itertools import product

import numpy as np

__all__ = [
    "ConvSpec",
    "DenseSpec",
    "add_convs",
    "add_dense",
    "border_band",
    "chain_is_exact",
    "collapse_pays",
    "compose_chain",
    "compose_convs",
    "compose_dense",
    "dense_from_gemm",
    "identity_conv",
    "identity_dense",
]


# --------------------------------------------------------------------------- convolutions


def _int_tuple(values, n: int, name: str) -> tuple[int, ...]:
    out = tuple(int(v) for v in values)
    if len(out) != n:
        raise ValueError(f"{name} has {len(out)} entries, expected {n} (one per spatial dim)")
    return out


@dataclass
class ConvSpec:
    """One N-d convolution (N = 1, 2 or 3 spatial dims) with ONNX Conv semantics."""

    weight: np.ndarray  # (Cout, Cin // group, *kernel)
    bias: np.ndarray  # (Cout,); zeros when the Conv has no bias
    strides: tuple[int, ...]
    pads_begin: tuple[int, ...]
    pads_end: tuple[int, ...]
    dilations: tuple[int, ...]
    group: int = 1

    def __post_init__(self) -> None:
        self.weight = np.asarray(self.weight, dtype=np.float64)
        if self.weight.ndim < 3:
            raise ValueError(f"conv weight must be (Cout, Cin/group, *kernel), got shape {self.weight.shape}")
        n = self.weight.ndim - 2
        cout = self.weight.shape[0]
        self.bias = (np.zeros(cout) if self.bias is None
                     else np.asarray(self.bias, dtype=np.float64).reshape(-1))
        if self.bias.shape != (cout,):
            raise ValueError(f"conv bias has shape {self.bias.shape}, expected ({cout},)")
        self.strides = _int_tuple(self.strides, n, "strides")
        self.pads_begin = _int_tuple(self.pads_begin, n, "pads_begin")
        self.pads_end = _int_tuple(self.pads_end, n, "pads_end")
        self.dilations = _int_tuple(self.dilations, n, "dilations")
        self.group = int(self.group)
        if self.group < 1 or cout % self.group:
            raise ValueError(f"group {self.group} does not divide Cout={cout}")
        if min(self.strides) < 1 or min(self.dilations) < 1:
            raise ValueError("strides and dilations must be >= 1")
        if min(self.pads_begin + self.pads_end, default=0) < 0:
            raise ValueError("pads must be >= 0")

    # -- shape facts
    @property
    def ndim(self) -> int:
        return self.weight.ndim - 2

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]

    @property
    def in_channels(self) -> int:
        return self.weight.shape[1] * self.group

    @property
    def kernel_shape(self) -> tuple[int, ...]:
        return tuple(self.weight.shape[2:])

    @property
    def extent(self) -> tuple[int, ...]:
        """Receptive extent of one output per dim: d*(k-1) + 1."""
        return tuple(d * (k - 1) + 1 for d, k in zip(self.dilations, self.kernel_shape))

    def output_spatial(self, in_spatial: Sequence[int]) -> tuple[int, ...]:
        """ONNX Conv output size; ValueError when some dim would be empty."""
        in_spatial = _int_tuple(in_spatial, self.ndim, "in_spatial")
        out = tuple(
            (n + pb + pe - e) // s + 1
            for n, pb, pe, e, s in zip(in_spatial, self.pads_begin, self.pads_end, self.extent, self.strides)
        )
        if min(out) < 1:
            raise ValueError(f"conv with kernel {self.kernel_shape} gives an empty output on input {in_spatial}")
        return out

    def onnx_attrs(self) -> dict:
        return {
            "kernel_shape": list(self.kernel_shape),
            "strides": list(self.strides),
            "pads": list(self.pads_begin) + list(self.pads_end),
            "dilations": list(self.dilations),
            "group": self.group,
        }


def identity_conv(channels: int, ndim: int) -> ConvSpec:
    """1x1 conv whose weight is the identity matrix (group 1, stride 1, no padding, no bias)."""
    weight = np.eye(channels).reshape((channels, channels) + (1,) * ndim)
    one = (1,) * ndim
    zero = (0,) * ndim
    return ConvSpec(weight, np.zeros(channels), one, zero, zero, one, 1)


# -- groups -------------------------------------------------------------------------------


def _regroup(weight: np.ndarray, g_from: int, g_to: int, cin: int) -> np.ndarray:
    """Re-express a g_from-grouped weight as g_to-grouped (g_to divides g_from): zero-fill."""
    if g_from == g_to:
        return weight
    if g_from % g_to:
        raise ValueError(f"cannot regroup {g_from} groups as {g_to}")
    cout = weight.shape[0]
    out = np.zeros((cout, cin // g_to) + weight.shape[2:])
    co_f, ci_f = cout // g_from, cin // g_from
    ci_t, co_t = cin // g_to, cout // g_to
    for j in range(g_from):
        big = (j * co_f) // co_t  # the coarse group this fine group sits in
        start = j * ci_f - big * ci_t
        out[j * co_f:(j + 1) * co_f, start:start + ci_f] = weight[j * co_f:(j + 1) * co_f]
    return out


def _compact_groups(weight: np.ndarray, group: int, cin: int) -> tuple[np.ndarray, int]:
    """Largest group count whose off-block entries are exactly zero; returns (weight, group)."""
    cout = weight.shape[0]
    # Cout x Cin connectivity (nonzero anywhere over the taps), from the grouped layout.
    conn_g = np.abs(weight).reshape(cout, weight.shape[1], -1).sum(axis=2) != 0
    rows = np.arange(cout)[:, None]
    cols = (rows // (cout // group)) * (cin // group) + np.arange(weight.shape[1])[None, :]
    conn = np.zeros((cout, cin), dtype=bool)
    conn[np.broadcast_to(rows, cols.shape), cols] = conn_g
    common = math.gcd(cin, cout)
    for g in sorted((g for g in range(1, common + 1) if common % g == 0), reverse=True):
        if g <= group:
            break
        if g % group:
            continue  # the result is already `group`-blocked; a valid finer blocking is a multiple
        co, ci = cout // g, cin // g
        blk_r = np.arange(cout) // co
        blk_c = np.arange(cin) // ci
        if conn[blk_r[:, None] != blk_c[None, :]].any():
            continue
        # gather the (Cout, Cin/g) blocks out of the (Cout, Cin/group) layout
        rel = (np.arange(cout) // co)[:, None] * ci + np.arange(ci)[None, :] \
            - (np.arange(cout) // (cout // group))[:, None] * (cin // group)
        idx = rel.reshape(rel.shape + (1,) * (weight.ndim - 2))
        return np.take_along_axis(weight, np.broadcast_to(idx, (cout, ci) + weight.shape[2:]), axis=1), g
    return weight, group


# -- pads_end fitting ---------------------------------------------------------------------


def _fit_pads_end(in_size: int, pad_begin: int, extent: int, stride: int, target: int, start: int) -> int:
    """A non-negative pads_end giving `target` outputs, as close to `start` as possible."""
    # target - 1 == (in + pb + pe - extent) // stride  <=>  lo <= pe <= hi
    lo = stride * (target - 1) - in_size - pad_begin + extent
    hi = lo + stride - 1
    if hi < 0:
        raise ValueError(
            f"no non-negative pads_end gives {target} outputs (input {in_size}, pad_begin {pad_begin}, "
            f"extent {extent}, stride {stride})")
    return min(max(start, lo, 0), hi)


# -- composition --------------------------------------------------------------------------


def _gcd_steps(*steps: int) -> int:
    g = reduce(math.gcd, steps, 0)
    return g if g > 0 else 1


def compose_convs(first: ConvSpec, second: ConvSpec, in_spatial: Sequence[int]) -> ConvSpec:
    """second(first(x)) as one conv on x (input spatial size `in_spatial`).

    Exact when `second` has no padding; otherwise equal to the chain with all padding moved to
    the first conv, which differs from the original chain only in :func:`border_band`.
    """
    if first.ndim != second.ndim:
        raise ValueError(f"cannot compose a {first.ndim}-d conv with a {second.ndim}-d conv")
    if first.out_channels != second.in_channels:
        raise ValueError(f"channel mismatch: first gives {first.out_channels}, second takes {second.in_channels}")
    n = first.ndim
    in_spatial = _int_tuple(in_spatial, n, "in_spatial")
    mid = first.output_spatial(in_spatial)
    out = second.output_spatial(mid)

    cin, cmid, cout = first.in_channels, first.out_channels, second.out_channels
    k1, k2 = first.kernel_shape, second.kernel_shape
    s1, s2 = first.strides, second.strides
    d1, d2 = first.dilations, second.dilations

    # taps: w = s1*d2*v + d1*u; keep the kernel compact with the gcd of the steps that occur
    dil = tuple(_gcd_steps(d1[i] if k1[i] > 1 else 0, s1[i] * d2[i] if k2[i] > 1 else 0) for i in range(n))
    span = tuple(d1[i] * (k1[i] - 1) + s1[i] * d2[i] * (k2[i] - 1) for i in range(n))
    ksize = tuple(span[i] // dil[i] + 1 for i in range(n))
    # tap steps inside the merged kernel (a size-1 kernel has no step; dil need not divide it)
    step_u = tuple(d1[i] // dil[i] if k1[i] > 1 else 1 for i in range(n))
    step_v = tuple(s1[i] * d2[i] // dil[i] if k2[i] > 1 else 1 for i in range(n))

    # both convs are g-grouped for g = gcd(g1, g2): compose block by block
    g = math.gcd(first.group, second.group)
    w1 = _regroup(first.weight, first.group, g, cin)  # (cmid, cin/g, *k1)
    w2 = _regroup(second.weight, second.group, g, cmid)  # (cout, cmid/g, *k2)
    w1 = w1.reshape((g, cmid // g, cin // g) + k1)
    w2 = w2.reshape((g, cout // g, cmid // g) + k2)
    merged = np.zeros((g, cout // g, cin // g) + ksize)
    w1_flat = w1.reshape(g, cmid // g, -1)  # (g, m, c * taps1) for a batched BLAS matmul per tap v
    # One contiguous (g, o, m) matrix per tap of w2: numpy < 2.3 falls back from BLAS to a slow
    # loop for strided matmul operands (10x slower composing ResNet's 512-channel convs).
    w2_taps = np.ascontiguousarray(np.moveaxis(w2.reshape(g, cout // g, cmid // g, -1), 3, 0))
    for index, v in enumerate(product(*(range(k) for k in k2))):
        tap = np.matmul(w2_taps[index], w1_flat).reshape((g, cout // g, cin // g) + k1)
        dst = tuple(slice(v[i] * step_v[i], v[i] * step_v[i] + step_u[i] * (k1[i] - 1) + 1, step_u[i])
                    for i in range(n))
        merged[(slice(None), slice(None), slice(None)) + dst] += tap
    merged = merged.reshape((cout, cin // g) + ksize)

    # bias: sum_{m, v} W2[o, m, v] b1[m] + b2
    b1 = first.bias.reshape(g, cmid // g)
    w2_sum = w2.reshape(g, cout // g, cmid // g, -1).sum(axis=3)
    bias = np.einsum("gom,gm->go", w2_sum, b1).reshape(cout) + second.bias

    weight, group = _compact_groups(merged, g, cin)
    strides = tuple(s1[i] * s2[i] for i in range(n))
    pads_begin = tuple(first.pads_begin[i] + s1[i] * second.pads_begin[i] for i in range(n))
    extent = tuple(span[i] + 1 for i in range(n))
    pads_end = tuple(
        _fit_pads_end(in_spatial[i], pads_begin[i], extent[i], strides[i], out[i],
                      first.pads_end[i] + s1[i] * second.pads_end[i])
        for i in range(n)
    )
    return ConvSpec(weight, bias, strides, pads_begin, pads_end, dil, group)


def compose_chain(specs: list[ConvSpec], in_spatial: Sequence[int]) -> ConvSpec:
    """Fold a whole chain left to right with :func:`compose_convs`."""
    if not specs:
        raise ValueError("empty chain")
    merged, size = specs[0], tuple(in_spatial)
    size_after = specs[0].output_spatial(size)
    for spec in specs[1:]:
        merged = compose_convs(merged, spec, size)
        size_after = spec.output_spatial(size_after)
    if merged.output_spatial(size) != size_after:  # cannot happen; guards the algebra
        raise AssertionError("merged conv output size differs from the chain's")
    return merged


def add_convs(a: ConvSpec, b: ConvSpec, in_spatial: Sequence[int]) -> ConvSpec:
    """a(x) + b(x) as one conv (same input, strides and output size); always exact."""
    if a.ndim != b.ndim:
        raise ValueError(f"cannot add a {a.ndim}-d conv and a {b.ndim}-d conv")
    if a.in_channels != b.in_channels or a.out_channels != b.out_channels:
        raise ValueError(f"channel mismatch: {a.in_channels}->{a.out_channels} vs {b.in_channels}->{b.out_channels}")
    if a.strides != b.strides:
        raise ValueError(f"cannot add convs with strides {a.strides} and {b.strides}")
    n = a.ndim
    in_spatial = _int_tuple(in_spatial, n, "in_spatial")
    out = a.output_spatial(in_spatial)
    if b.output_spatial(in_spatial) != out:
        raise ValueError(f"output sizes differ: {out} vs {b.output_spatial(in_spatial)}")

    ka, kb = a.kernel_shape, b.kernel_shape
    pb = tuple(max(a.pads_begin[i], b.pads_begin[i]) for i in range(n))
    off_a = tuple(pb[i] - a.pads_begin[i] for i in range(n))  # first tap of a, in input pixels
    off_b = tuple(pb[i] - b.pads_begin[i] for i in range(n))
    dil = tuple(_gcd_steps(a.dilations[i] if ka[i] > 1 else 0, b.dilations[i] if kb[i] > 1 else 0,
                           off_a[i], off_b[i]) for i in range(n))
    span = tuple(max(off_a[i] + a.dilations[i] * (ka[i] - 1), off_b[i] + b.dilations[i] * (kb[i] - 1))
                 for i in range(n))
    ksize = tuple(span[i] // dil[i] + 1 for i in range(n))

    g = math.gcd(a.group, b.group)
    cin, cout = a.in_channels, a.out_channels
    weight = np.zeros((cout, cin // g) + ksize)
    for spec, off in ((a, off_a), (b, off_b)):
        w = _regroup(spec.weight, spec.group, g, cin)
        step = tuple(spec.dilations[i] // dil[i] if k > 1 else 1 for i, k in enumerate(spec.kernel_shape))
        dst = tuple(slice(off[i] // dil[i], off[i] // dil[i] + step[i] * (k - 1) + 1, step[i])
                    for i, k in enumerate(spec.kernel_shape))
        weight[(slice(None), slice(None)) + dst] += w
    weight, group = _compact_groups(weight, g, cin)
    pads_end = tuple(
        _fit_pads_end(in_spatial[i], pb[i], span[i] + 1, a.strides[i], out[i], max(a.pads_end[i], b.pads_end[i]))
        for i in range(n)
    )
    return ConvSpec(weight, a.bias + b.bias, a.strides, pb, pads_end, dil, group)


# -- exactness ----------------------------------------------------------------------------


def chain_is_exact(specs: list[ConvSpec]) -> bool:
    """True when every conv after the first has all-zero pads (the merge is then exact)."""
    return all(not any(s.pads_begin) and not any(s.pads_end) for s in specs[1:])


def border_band(specs: list[ConvSpec]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Per spatial dim, how many output positions at the begin / end may differ between the
    chain and its merged conv (0 where the chain is exact).

    An output of conv k is wrong when it reads a padded or already-wrong position of its input.
    With B wrong positions at the begin of its input, output i is wrong iff s*i - p_b < B, so
    ceil((B + p_b) / s) outputs are; the end obeys the same bound, ceil((E + p_e) / s), whatever
    the floor in the output size does (tight when the last window ends exactly on the input's
    end).  The first conv's own padding is exact (B = E = 0 after it).  Independent of the input
    size; a band as large as the output means nothing is exact in that dim.
    """
    if not specs:
        return (), ()
    n = specs[0].ndim
    begin, end = [0] * n, [0] * n
    for spec in specs[1:]:
        for i in range(n):
            s = spec.strides[i]
            begin[i] = -(-(begin[i] + spec.pads_begin[i]) // s)
            end[i] = -(-(end[i] + spec.pads_end[i]) // s)
    return tuple(begin), tuple(end)


# --------------------------------------------------------------------------- dense layers


@dataclass
class DenseSpec:
    """y = x @ weight + bias on the last axis (Gemm / MatMul with a constant weight)."""

    weight: np.ndarray  # (in, out)
    bias: np.ndarray  # (out,)

    def __post_init__(self) -> None:
        self.weight = np.asarray(self.weight, dtype=np.float64)
        if self.weight.ndim != 2:
            raise ValueError(f"dense weight must be 2-D (in, out), got shape {self.weight.shape}")
        out = self.weight.shape[1]
        self.bias = (np.zeros(out) if self.bias is None
                     else np.broadcast_to(np.asarray(self.bias, dtype=np.float64).reshape(-1), (out,)).copy())

    @property
    def in_features(self) -> int:
        return self.weight.shape[0]

    @property
    def out_features(self) -> int:
        return self.weight.shape[1]


def identity_dense(n: int) -> DenseSpec:
    return DenseSpec(np.eye(n), np.zeros(n))


def compose_dense(first: DenseSpec, second: DenseSpec) -> DenseSpec:
    """second(first(x)) = x W1 W2 + (b1 W2 + b2)."""
    if first.out_features != second.in_features:
        raise ValueError(f"feature mismatch: first gives {first.out_features}, second takes {second.in_features}")
    return DenseSpec(first.weight @ second.weight, first.bias @ second.weight + second.bias)


def add_dense(a: DenseSpec, b: DenseSpec) -> DenseSpec:
    if a.weight.shape != b.weight.shape:
        raise ValueError(f"cannot add dense layers of shapes {a.weight.shape} and {b.weight.shape}")
    return DenseSpec(a.weight + b.weight, a.bias + b.bias)


def dense_from_gemm(weight_B: np.ndarray, bias_C: np.ndarray | None, trans_b: bool,
                    alpha: float = 1.0, beta: float = 1.0) -> DenseSpec:
    """Gemm(A, B, C) with transA = 0: y = alpha * A @ op(B) + beta * C.

    C may be absent (None), a scalar, (out,) or (1, out); a C with one row per batch row
    depends on the batch and is no per-feature bias, so it is rejected.
    """
    w = np.asarray(weight_B, dtype=np.float64)
    if w.ndim != 2:
        raise ValueError(f"Gemm B must be 2-D, got shape {w.shape}")
    if trans_b:
        w = w.T
    out = w.shape[1]
    if bias_C is None:
        bias = np.zeros(out)
    else:
        c = np.asarray(bias_C, dtype=np.float64)
        if c.ndim > 2 or (c.ndim == 2 and c.shape[0] != 1) or (c.size not in (1, out)):
            raise ValueError(f"Gemm C of shape {c.shape} is not a per-feature bias for {out} outputs")
        bias = np.broadcast_to(c.reshape(-1), (out,)) * float(beta)
    return DenseSpec(w * float(alpha), bias)


def collapse_pays(in_features: int, hidden: int, out_features: int) -> bool:
    """Collapsing in->hidden->out into in->out saves parameters and FLOPs iff in*out < in*h + h*out."""
    return in_features * out_features < in_features * hidden + hidden * out_features
