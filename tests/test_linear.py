"""Exactness of the linear-layer merge algebra (lmopt.algebra.linear), checked in onnxruntime.

Every merged conv is compared with the ONNX chain it replaces, run by onnxruntime in float32:
exact chains must match everywhere, padded chains must match the chain with its padding moved
to the first conv everywhere and the original chain inside border_band.
"""
from __future__ import annotations

import math
import os
import sys
import zlib
from functools import reduce

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import event as _event
from hypothesis import note as _note
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # for `chains` under any import mode

from chains import (  # noqa: E402
    assert_close,
    chain_output_sizes,
    conv_chain_model,
    dense_matmul_model,
    gemm_chain_model,
    moved_padding_chain,
    random_conv,
    rel_err,
    run,
    single_conv_model,
)

from lmopt.algebra.linear import (  # noqa: E402
    ConvSpec,
    DenseSpec,
    add_convs,
    add_dense,
    border_band,
    chain_is_exact,
    collapse_pays,
    compose_chain,
    compose_convs,
    compose_dense,
    dense_from_gemm,
    identity_conv,
    identity_dense,
)

TOL = 1e-4
FAST = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

# Border deviations seen on padded chains (reported at the end of the module, never asserted).
BORDER_DEVIATIONS: list[float] = []


@pytest.fixture(scope="module", autouse=True)
def _report_border_deviation(request):
    yield
    if not BORDER_DEVIATIONS:
        return
    dev = np.array(BORDER_DEVIATIONS)
    line = (f"[test_linear] border deviation of merged padded chains vs the original chain "
            f"(max |diff| / max |out|, {dev.size} chains): median {np.median(dev):.3g}, max {dev.max():.3g}")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None:
        print(line)
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line("")
        reporter.write_line(line)


# --------------------------------------------------------------------------- helpers


def note(text: str) -> None:
    if currently_in_test_context():
        _note(text)


def event(text: str) -> None:
    if currently_in_test_context():
        _event(text)


def crop(y: np.ndarray, begin, end) -> np.ndarray:
    idx = (slice(None), slice(None)) + tuple(slice(b, y.shape[2 + i] - e) for i, (b, e) in enumerate(zip(begin, end)))
    return y[idx]


def _out_1d(specs, i: int, n: int) -> int:
    """Chain output length along spatial dim i for input length n (<= 0 when empty)."""
    for spec in specs:
        if n < 1:
            return n
        n = (n + spec.pads_begin[i] + spec.pads_end[i] - spec.extent[i]) // spec.strides[i] + 1
    return n


def grow_input(specs, in_spatial, need_interior: bool, cap: int = 160):
    """Smallest input >= in_spatial (per dim) giving a valid chain, and a non-empty interior
    (output larger than the border band) when asked; None past `cap`."""
    begin, end = border_band(specs)
    size = list(in_spatial)
    for i in range(len(size)):
        need = 1 + (begin[i] + end[i] if need_interior else 0)
        while _out_1d(specs, i, size[i]) < need:
            size[i] += 1
            if size[i] > cap:
                return None
    assert chain_output_sizes(specs, size) is not None
    return tuple(size)


def check_chain(specs: list[ConvSpec], in_spatial, rng, batch: int = 2, record: bool = True):
    """The full exactness contract for one chain; returns the merged spec."""
    cin = specs[0].in_channels
    x = rng.standard_normal((batch, cin) + tuple(in_spatial)).astype(np.float32)
    input_shape = x.shape
    merged = compose_chain(specs, in_spatial)
    y_chain = run(conv_chain_model(specs, input_shape), x)
    y_merged = run(single_conv_model(merged, input_shape), x)
    assert y_merged.shape == y_chain.shape
    assert merged.output_spatial(in_spatial) == y_chain.shape[2:]
    if chain_is_exact(specs):
        assert border_band(specs) == ((0,) * len(in_spatial), (0,) * len(in_spatial))
        assert_close(y_merged, y_chain, TOL, "exact chain vs merged")
        event("exact chain")
        return merged
    event("padded chain")
    moved = moved_padding_chain(specs, merged)
    y_moved = run(conv_chain_model(moved, input_shape), x)
    assert_close(y_merged, y_moved, TOL, "merged vs chain with padding moved to the first conv")
    begin, end = border_band(specs)
    inner_m, inner_c = crop(y_merged, begin, end), crop(y_chain, begin, end)
    note(f"band begin={begin} end={end} output={y_chain.shape[2:]} interior={inner_c.shape[2:]}")
    assert_close(inner_m, inner_c, TOL, "interior of merged vs original chain")
    if inner_c.size < y_chain.size and record:
        dev = rel_err(y_merged, y_chain)
        BORDER_DEVIATIONS.append(dev)
        note(f"border deviation {dev:.3g}")
    return merged


# --------------------------------------------------------------------------- strategies

CHANNELS = [1, 2, 3, 4, 6, 8]


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def conv_chains(draw, min_len: int = 2, max_len: int = 4):
    """(specs, input spatial size, numpy seed) for a random chain of convs."""
    ndim = draw(st.integers(0, 5).map(lambda i: 1 if i == 5 else 2))
    length = draw(st.integers(min_len, max_len))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    cin = draw(st.sampled_from(CHANNELS))
    specs = []
    for _ in range(length):
        kind = draw(st.sampled_from(["dense", "grouped", "depthwise"]))
        if kind == "depthwise":
            cout = cin * draw(st.sampled_from([1, 1, 2])) if cin <= 4 else cin
            group = cin
        else:
            cout = draw(st.sampled_from(CHANNELS))
            groups = [g for g in _divisors(math.gcd(cin, cout)) if g > 1]
            group = draw(st.sampled_from(groups)) if kind == "grouped" and groups else 1
        square = ndim == 1 or draw(st.booleans())
        dims = 1 if square else ndim
        kernel = [draw(st.sampled_from([1, 3, 5, 7])) for _ in range(dims)]
        strides = [draw(st.sampled_from([1, 2])) for _ in range(dims)]
        dilations = [draw(st.sampled_from([1, 2])) for _ in range(dims)]
        if square:
            kernel, strides, dilations = kernel * ndim, strides * ndim, dilations * ndim
        padding = draw(st.sampled_from(["none", "same", "asymmetric"]))
        if padding == "none":
            pb = pe = [0] * ndim
        elif padding == "same":
            pb = pe = [k // 2 for k in kernel]
        else:
            pb = [draw(st.integers(0, k // 2)) for k in kernel]
            pe = [draw(st.integers(0, k // 2)) for k in kernel]
        specs.append(random_conv(rng, cin, cout, kernel, strides=strides, dilations=dilations,
                                 pads_begin=pb, pads_end=pe, group=group, bias=draw(st.booleans())))
        cin = cout
    in_spatial = tuple(draw(st.integers(9, 24)) for _ in range(ndim))
    return specs, in_spatial, seed


def describe(specs) -> str:
    return " -> ".join(
        f"[{s.in_channels}->{s.out_channels} g{s.group} k{s.kernel_shape} s{s.strides} d{s.dilations} "
        f"p{s.pads_begin}/{s.pads_end}{' b' if np.any(s.bias) else ''}]" for s in specs)


# --------------------------------------------------------------------------- conv chains


@settings(FAST, max_examples=100)
@given(conv_chains())
def test_random_chain_merge_is_exact_where_promised(case):
    specs, in_spatial, seed = case
    note(describe(specs))
    size = grow_input(specs, in_spatial, need_interior=not chain_is_exact(specs))
    assume(size is not None)
    note(f"input spatial {size}")
    merged = check_chain(specs, size, np.random.default_rng(seed + 1))
    # grouping survives composition: every conv is gcd(groups)-grouped, so the merge is too
    g = reduce(math.gcd, (s.group for s in specs))
    assert merged.group % g == 0
    assert merged.weight.shape == (merged.out_channels, merged.in_channels // merged.group) + merged.kernel_shape
    assert merged.strides == tuple(math.prod(s.strides[i] for s in specs) for i in range(len(size)))
    # pads: sum of p_k * (product of the strides before conv k); the natural pads_end always fits
    # the chain's output size (floor(floor(a/s1)/s2) == floor(a/(s1*s2))), so it is never adjusted
    for i in range(len(size)):
        pre = [math.prod(t.strides[i] for t in specs[:k]) for k in range(len(specs))]
        assert merged.pads_begin[i] == sum(p * t.pads_begin[i] for p, t in zip(pre, specs))
        assert merged.pads_end[i] == sum(p * t.pads_end[i] for p, t in zip(pre, specs))
    c = specs[0].in_channels
    if all(s.group == c and s.out_channels == c for s in specs):
        assert merged.group == c, "depthwise after depthwise must stay depthwise"


@settings(FAST, max_examples=25)
@given(conv_chains(min_len=2, max_len=2), st.integers(0, 2**32 - 1))
def test_two_conv_merge_matches_direct_formula_without_runtime(case, seed):
    """compose_convs against a direct float64 numpy evaluation (no ORT, no float32 slack)."""
    specs, in_spatial, _ = case
    size = grow_input(specs, in_spatial, need_interior=False)
    assume(size is not None)
    merged = compose_convs(specs[0], specs[1], size)
    moved = moved_padding_chain(specs, merged)
    x = np.random.default_rng(seed).standard_normal((1, specs[0].in_channels) + size)
    ref = np_conv(np_conv(x, moved[0]), moved[1])
    got = np_conv(x, merged)
    assert got.shape == ref.shape
    assert rel_err(got, ref) < 1e-10


def np_conv(x: np.ndarray, spec: ConvSpec) -> np.ndarray:
    """Reference N-d ONNX Conv in float64 (loops over taps)."""
    n = spec.ndim
    xp = np.pad(x, [(0, 0), (0, 0)] + list(zip(spec.pads_begin, spec.pads_end)))
    out_sp = spec.output_spatial(x.shape[2:])
    g, cog, cig = spec.group, spec.out_channels // spec.group, spec.weight.shape[1]
    y = np.zeros((x.shape[0], spec.out_channels) + out_sp)
    for tap in np.ndindex(*spec.kernel_shape):
        sl = tuple(slice(spec.dilations[i] * tap[i], spec.dilations[i] * tap[i] + spec.strides[i] * (out_sp[i] - 1) + 1,
                         spec.strides[i]) for i in range(n))
        patch = xp[(slice(None), slice(None)) + sl]  # (B, Cin, *out)
        for j in range(g):
            w = spec.weight[(slice(j * cog, (j + 1) * cog), slice(None)) + tap]  # (cog, cig)
            y[:, j * cog:(j + 1) * cog] += np.einsum("oc,bc...->bo...", w, patch[:, j * cig:(j + 1) * cig])
    return y + spec.bias.reshape((1, -1) + (1,) * n)


def test_known_border_band_values():
    rng = np.random.default_rng(0)
    c3 = lambda **kw: random_conv(rng, 2, 2, (3, 3), **kw)  # noqa: E731
    assert border_band([c3(pads_begin=(1, 1), pads_end=(1, 1)), c3()]) == ((0, 0), (0, 0))
    assert border_band([c3(), c3(pads_begin=(1, 1), pads_end=(1, 1))]) == ((1, 1), (1, 1))
    # strided second conv halves the band (rounded up); a third conv propagates it
    assert border_band([c3(), c3(strides=(2, 2), pads_begin=(1, 0), pads_end=(0, 1))]) == ((1, 0), (0, 1))
    assert border_band([c3(), c3(pads_begin=(1, 1), pads_end=(1, 1)), c3(pads_begin=(1, 1), pads_end=(1, 1))]) == (
        (2, 2), (2, 2))
    assert border_band([c3(), c3(pads_begin=(1, 1), pads_end=(1, 1)), c3(strides=(2, 2))]) == ((1, 1), (1, 1))


def test_padding_trap_is_real_and_bounded():
    """3x3 pad 1 -> 3x3 pad 1 with biases: the border really differs, the interior does not."""
    rng = np.random.default_rng(1)
    same = dict(pads_begin=(1, 1), pads_end=(1, 1))
    specs = [random_conv(rng, 3, 4, (3, 3), **same), random_conv(rng, 4, 3, (3, 3), **same)]
    x = rng.standard_normal((1, 3, 12, 12)).astype(np.float32)
    merged = compose_chain(specs, (12, 12))
    assert merged.kernel_shape == (5, 5) and merged.pads_begin == (2, 2) and merged.pads_end == (2, 2)
    y_chain = run(conv_chain_model(specs, x.shape), x)
    y_merged = run(single_conv_model(merged, x.shape), x)
    assert rel_err(y_merged, y_chain) > 1e-2  # the trap: not exact
    assert rel_err(y_merged[:, :, 1:-1, 1:-1], y_chain[:, :, 1:-1, 1:-1]) < TOL
    for band in (y_merged[:, :, 0] - y_chain[:, :, 0], y_merged[:, :, -1] - y_chain[:, :, -1],
                 y_merged[..., 0] - y_chain[..., 0], y_merged[..., -1] - y_chain[..., -1]):
        assert np.abs(band).max() > 1e-3  # the band is tight here: every border line differs


@pytest.mark.parametrize("name, layers, size", [
    # MobileNetV2 inverted residual body: 1x1 expand -> dw 3x3 (s1 / s2) -> 1x1 project
    ("mbv2_s1", [(4, 8, 1, 1, 1, 0), (8, 8, 3, 1, 8, 1), (8, 4, 1, 1, 1, 0)], (14, 14)),
    ("mbv2_s2", [(4, 8, 1, 1, 1, 0), (8, 8, 3, 2, 8, 1), (8, 6, 1, 1, 1, 0)], (15, 15)),
    # ResNet basic block body and a stride-2 conv followed by a 3x3 (the general rule)
    ("resnet_basic", [(4, 4, 3, 1, 1, 1), (4, 4, 3, 1, 1, 1)], (12, 12)),
    ("stride_then_3x3", [(3, 4, 3, 2, 1, 1), (4, 5, 3, 1, 1, 1)], (17, 16)),
    ("stride_then_3x3_unpadded", [(3, 4, 3, 2, 1, 1), (4, 5, 3, 1, 1, 0)], (16, 17)),
    ("dw_dw_dilated", [(6, 6, 3, 1, 6, 2), (6, 6, 3, 2, 6, 0)], (19, 20)),
    ("1d_conv_stack", [(2, 4, 5, 1, 1, 2), (4, 4, 3, 2, 2, 1), (4, 2, 7, 1, 1, 0)], (23,)),
])
def test_named_chains(name, layers, size):
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    n = len(size)
    specs = [random_conv(rng, ci, co, (k,) * n, strides=(s,) * n, group=g, pads_begin=(p,) * n, pads_end=(p,) * n)
             for ci, co, k, s, g, p in layers]
    merged = check_chain(specs, size, rng, record=False)
    if name.startswith("dw_dw"):
        assert merged.group == 6 and merged.weight.shape[1] == 1


def test_depthwise_stays_depthwise_dense_stays_dense():
    rng = np.random.default_rng(2)
    dw = lambda c, k=3: random_conv(rng, c, c, (k, k), group=c)  # noqa: E731
    m = compose_convs(dw(5), dw(5, 5), (16, 16))
    assert m.group == 5 and m.weight.shape == (5, 1, 7, 7)
    m = compose_convs(random_conv(rng, 4, 4, (1, 1)), dw(4), (16, 16))
    assert m.group == 1 and m.weight.shape == (4, 4, 3, 3)
    m = compose_convs(random_conv(rng, 4, 6, (3, 3), group=2), random_conv(rng, 6, 4, (1, 1), group=2), (16, 16))
    assert m.group == 2 and m.weight.shape == (4, 2, 3, 3)
    # groups 2 then 4 on 8 channels: only gcd-level (2) blocks survive
    m = compose_convs(random_conv(rng, 8, 8, (1, 1), group=2), random_conv(rng, 8, 8, (1, 1), group=4), (4, 4))
    assert m.group == 2


def test_end_padding_only_is_not_exact():
    """Padding only at the end of a later conv still breaks exactness (at the end border)."""
    rng = np.random.default_rng(13)
    specs = [random_conv(rng, 3, 4, (3, 3)), random_conv(rng, 4, 2, (3, 3), pads_end=(0, 2))]
    assert not chain_is_exact(specs)
    assert border_band(specs) == ((0, 0), (0, 2))
    x = rng.standard_normal((1, 3, 11, 12)).astype(np.float32)
    merged = check_chain(specs, (11, 12), rng, record=False)
    y_chain = run(conv_chain_model(specs, x.shape), x)
    y_merged = run(single_conv_model(merged, x.shape), x)
    assert rel_err(y_merged[..., -2:], y_chain[..., -2:]) > 1e-2
    assert rel_err(y_merged[..., :-2], y_chain[..., :-2]) < TOL


def test_compaction_finds_finer_groups_than_the_inputs_declare():
    """Depthwise convs written as group=2 (zero-filled blocks) compose to a depthwise conv."""
    rng = np.random.default_rng(14)
    c = 4

    def disguised_depthwise():
        dw = random_conv(rng, c, c, (3, 3), group=c, pads_begin=(1, 1), pads_end=(1, 1))
        w = np.zeros((c, c // 2, 3, 3))
        for o in range(c):
            w[o, o % (c // 2)] = dw.weight[o, 0]
        return ConvSpec(w, dw.bias, dw.strides, dw.pads_begin, dw.pads_end, dw.dilations, 2)

    specs = [disguised_depthwise(), random_conv(rng, c, c, (3, 3), group=c), disguised_depthwise()]
    merged = check_chain(specs, (13, 13), rng, record=False)
    assert merged.group == c and merged.weight.shape == (c, 1, 7, 7)
    specs = [disguised_depthwise(), disguised_depthwise()]
    merged = check_chain(specs, (13, 13), rng, record=False)
    assert merged.group == c


def test_strided_1x1_then_3x3_keeps_a_compact_dilated_kernel():
    rng = np.random.default_rng(3)
    first = random_conv(rng, 3, 4, (1, 1), strides=(2, 2))
    second = random_conv(rng, 4, 2, (3, 3))
    m = compose_convs(first, second, (13, 13))
    assert m.kernel_shape == (3, 3) and m.dilations == (2, 2) and m.strides == (2, 2)
    check_chain([first, second], (13, 13), rng)


def test_compose_rejects_bad_input():
    rng = np.random.default_rng(4)
    with pytest.raises(ValueError):
        compose_convs(random_conv(rng, 2, 3, (3, 3)), random_conv(rng, 4, 2, (3, 3)), (8, 8))
    with pytest.raises(ValueError):  # chain output would be empty
        compose_convs(random_conv(rng, 2, 2, (5, 5)), random_conv(rng, 2, 2, (5, 5)), (8, 8))
    with pytest.raises(ValueError):
        compose_convs(random_conv(rng, 2, 2, (3,)), random_conv(rng, 2, 2, (3, 3)), (8,))


def test_identity_is_neutral():
    rng = np.random.default_rng(5)
    conv = random_conv(rng, 3, 4, (3, 3), strides=(2, 1), pads_begin=(1, 0), pads_end=(0, 1), dilations=(1, 2))
    for m in (compose_convs(identity_conv(3, 2), conv, (11, 12)), compose_convs(conv, identity_conv(4, 2), (11, 12))):
        assert m.kernel_shape == conv.kernel_shape and m.strides == conv.strides
        assert m.pads_begin == conv.pads_begin and m.pads_end == conv.pads_end and m.dilations == conv.dilations
        np.testing.assert_allclose(m.weight, conv.weight, rtol=1e-12, atol=0)
        np.testing.assert_allclose(m.bias, conv.bias, rtol=1e-12, atol=0)


# --------------------------------------------------------------------------- residual folding


def check_residual(chain, skip, in_spatial, rng):
    """Fold skip ("identity" or a ConvSpec) into the merged chain and compare with chain(x)+skip(x)."""
    cin = chain[0].in_channels
    x = rng.standard_normal((2, cin) + tuple(in_spatial)).astype(np.float32)
    skip_spec = identity_conv(cin, len(in_spatial)) if skip == "identity" else skip
    merged = add_convs(compose_chain(chain, in_spatial), skip_spec, in_spatial)
    y_ref = run(conv_chain_model(chain, x.shape, skip=skip), x)
    y = run(single_conv_model(merged, x.shape), x)
    assert y.shape == y_ref.shape
    if chain_is_exact(chain):
        assert_close(y, y_ref, TOL, "residual fold of an exact chain")
    else:
        begin, end = border_band(chain)
        assert_close(crop(y, begin, end), crop(y_ref, begin, end), TOL, "residual fold interior")
        moved = moved_padding_chain(chain, compose_chain(chain, in_spatial))
        y_moved = run(conv_chain_model(moved, x.shape, skip=skip), x)
        assert_close(y, y_moved, TOL, "residual fold vs moved-padding chain + skip")
    return merged


def test_resnet_basic_block_with_identity_skip():
    rng = np.random.default_rng(6)
    same = dict(pads_begin=(1, 1), pads_end=(1, 1))
    chain = [random_conv(rng, 4, 4, (3, 3), **same), random_conv(rng, 4, 4, (3, 3), **same)]
    m = check_residual(chain, "identity", (10, 11), rng)
    assert m.kernel_shape == (5, 5) and m.pads_begin == (2, 2)


def test_exact_chain_with_identity_skip_is_exact_everywhere():
    rng = np.random.default_rng(7)
    chain = [random_conv(rng, 4, 8, (3, 3), pads_begin=(1, 1), pads_end=(1, 1)), random_conv(rng, 8, 4, (1, 1))]
    check_residual(chain, "identity", (9, 9), rng)
    # depthwise 3x3 + identity stays depthwise
    dw = random_conv(rng, 5, 5, (3, 3), group=5, pads_begin=(1, 1), pads_end=(1, 1))
    m = add_convs(dw, identity_conv(5, 2), (9, 9))
    assert m.group == 5
    check_residual([dw], "identity", (9, 9), rng)


@pytest.mark.parametrize("size", [(16, 16), (15, 15), (17, 14)])
def test_resnet_downsample_with_projection_skip(size):
    """3x3 s2 -> 3x3 s1 plus a 1x1 s2 projection, folded into one 7x7 s2 conv."""
    rng = np.random.default_rng(8)
    same = dict(pads_begin=(1, 1), pads_end=(1, 1))
    chain = [random_conv(rng, 3, 6, (3, 3), strides=(2, 2), **same), random_conv(rng, 6, 6, (3, 3), **same)]
    proj = random_conv(rng, 3, 6, (1, 1), strides=(2, 2))
    m = check_residual(chain, proj, size, rng)
    assert m.kernel_shape == (7, 7) and m.strides == (2, 2) and m.pads_begin == (3, 3) and m.pads_end == (3, 3)
    # exact variant: 3x3 s2 -> 1x1 plus the projection is exact everywhere
    exact = [chain[0], random_conv(rng, 6, 6, (1, 1))]
    check_residual(exact, proj, size, rng)


@settings(FAST, max_examples=25)
@given(st.integers(0, 2**32 - 1), st.integers(1, 3), st.sampled_from([1, 2]), st.booleans(), st.integers(9, 20))
def test_random_residual_folds(seed, length, total_stride, padded, size):
    """'same'-padded odd-kernel chains (stride only in the first conv) + identity or 1x1 projection."""
    rng = np.random.default_rng(seed)
    c = int(rng.integers(1, 7))
    chain, cin = [], c
    for i in range(length):
        k = int(rng.choice([1, 3, 5]))
        d = int(rng.choice([1, 2]))
        p = d * (k - 1) // 2 if (padded or i == 0) else 0
        cout = c if i == length - 1 else int(rng.integers(1, 7))
        group = cin if (cin == cout and rng.random() < 0.3) else 1
        s = total_stride if i == 0 else 1
        chain.append(random_conv(rng, cin, cout, (k, k), strides=(s, s), dilations=(d, d), pads_begin=(p, p),
                                 pads_end=(p, p), group=group, bias=bool(rng.random() < 0.7)))
        cin = cout
    in_spatial = (size, size + 1)
    sizes = chain_output_sizes(chain, in_spatial)
    assume(sizes is not None)
    skip = "identity" if total_stride == 1 else random_conv(rng, c, c, (1, 1), strides=(2, 2))
    skip_size = in_spatial if skip == "identity" else skip.output_spatial(in_spatial)
    assume(sizes[-1] == tuple(skip_size))
    begin, end = border_band(chain)
    assume(all(sizes[-1][i] > begin[i] + end[i] for i in range(2)))
    check_residual(chain, skip, in_spatial, rng)


def test_add_convs_aligns_offsets_and_dilations():
    rng = np.random.default_rng(9)
    a = random_conv(rng, 3, 3, (3, 3), dilations=(2, 2), pads_begin=(2, 2), pads_end=(2, 2))
    b = random_conv(rng, 3, 3, (3, 3), pads_begin=(1, 1), pads_end=(1, 1))  # dilation 1, same centre
    m = add_convs(a, b, (10, 10))
    assert m.kernel_shape == (5, 5) and m.dilations == (1, 1) and m.pads_begin == (2, 2)
    c = random_conv(rng, 3, 3, (1, 1))  # a 1x1 at a's centre tap: stays on the dilated grid
    m = add_convs(a, c, (10, 10))
    assert m.kernel_shape == (3, 3) and m.dilations == (2, 2)
    for other in (b, c):
        x = rng.standard_normal((1, 3, 10, 10)).astype(np.float32)
        merged = add_convs(a, other, (10, 10))
        ya, yo = run(single_conv_model(a, x.shape), x), run(single_conv_model(other, x.shape), x)
        assert_close(run(single_conv_model(merged, x.shape), x), ya + yo, TOL, "a + b")


def test_add_convs_rejects_unalignable():
    rng = np.random.default_rng(10)
    a = random_conv(rng, 2, 2, (3, 3), pads_begin=(1, 1), pads_end=(1, 1))
    with pytest.raises(ValueError):  # strides differ
        add_convs(a, random_conv(rng, 2, 2, (1, 1), strides=(2, 2)), (8, 8))
    with pytest.raises(ValueError):  # output sizes differ (no padding on the 3x3)
        add_convs(random_conv(rng, 2, 2, (3, 3)), identity_conv(2, 2), (8, 8))
    with pytest.raises(ValueError):  # channels differ
        add_convs(a, identity_conv(3, 2), (8, 8))


# --------------------------------------------------------------------------- dense layers


@settings(FAST, max_examples=30)
@given(st.integers(0, 2**32 - 1), st.integers(1, 8), st.integers(1, 8), st.integers(1, 8))
def test_compose_and_add_dense_match_numpy(seed, n_in, n_hidden, n_out):
    rng = np.random.default_rng(seed)
    f1 = DenseSpec(rng.standard_normal((n_in, n_hidden)), rng.standard_normal(n_hidden))
    f2 = DenseSpec(rng.standard_normal((n_hidden, n_out)), rng.standard_normal(n_out))
    x = rng.standard_normal((5, n_in))
    merged = compose_dense(f1, f2)
    np.testing.assert_allclose(x @ merged.weight + merged.bias, (x @ f1.weight + f1.bias) @ f2.weight + f2.bias,
                               rtol=1e-10, atol=1e-10)
    g = DenseSpec(rng.standard_normal((n_in, n_out)), None)
    s = add_dense(merged, g)
    np.testing.assert_allclose(x @ s.weight + s.bias, x @ merged.weight + merged.bias + x @ g.weight, rtol=1e-10,
                               atol=1e-10)
    ident = compose_dense(identity_dense(n_in), f1)
    np.testing.assert_array_equal(ident.weight, f1.weight)
    assert collapse_pays(n_in, n_hidden, n_out) == (n_in * n_out < n_in * n_hidden + n_hidden * n_out)


@pytest.mark.parametrize("c_shape", ["vector", "row", "scalar", "none"])
def test_gemm_chain_collapses_in_onnxruntime(c_shape):
    rng = np.random.default_rng(11)
    n_in, n_hidden, n_out = 6, 5, 4

    def bias(n):
        return {"vector": rng.standard_normal(n), "row": rng.standard_normal((1, n)),
                "scalar": np.array(rng.standard_normal()), "none": None}[c_shape]

    layers = [
        dict(B=rng.standard_normal((n_hidden, n_in)), C=bias(n_hidden), transB=1, alpha=0.7, beta=1.3),
        dict(B=rng.standard_normal((n_hidden, n_out)), C=bias(n_out), transB=0, alpha=1.0, beta=0.5),
    ]
    specs = [dense_from_gemm(layer["B"], layer["C"], bool(layer["transB"]), layer["alpha"], layer["beta"])
             for layer in layers]
    merged = compose_dense(*specs)
    x = rng.standard_normal((3, n_in)).astype(np.float32)
    y_ref = run(gemm_chain_model(layers, 3, n_in), x)
    y = run(gemm_chain_model([dict(B=merged.weight, C=merged.bias)], 3, n_in), x)
    assert_close(y, y_ref, TOL, "gemm chain")
    y_t = run(gemm_chain_model([dict(B=merged.weight.T, C=merged.bias, transB=1)], 3, n_in), x)
    assert_close(y_t, y_ref, TOL, "gemm chain, transB form")


def test_dense_from_gemm_rejects_per_row_bias():
    with pytest.raises(ValueError):
        dense_from_gemm(np.ones((3, 2)), np.ones((4, 2)), False)
    d = dense_from_gemm(np.ones((3, 2)), None, True, alpha=2.0)
    assert d.weight.shape == (2, 3) and np.all(d.weight == 2.0) and np.all(d.bias == 0)


@pytest.mark.parametrize("residual", [False, True])
def test_matmul_chain_on_tokens_collapses(residual):
    """MatMul+Add on (1, T, in) tokens, three layers (and a residual around them)."""
    rng = np.random.default_rng(12)
    dims = [6, 9, 3, 6]
    layers = [(rng.standard_normal((a, b)), rng.standard_normal(b) if i != 1 else None)
              for i, (a, b) in enumerate(zip(dims[:-1], dims[1:]))]
    merged = reduce(compose_dense, [DenseSpec(w, b) for w, b in layers])
    if residual:
        merged = add_dense(merged, identity_dense(dims[0]))
    x = rng.standard_normal((1, 7, dims[0])).astype(np.float32)
    y_ref = run(dense_matmul_model(layers, x.shape, residual=residual), x)
    y = run(dense_matmul_model([(merged.weight, merged.bias)], x.shape), x)
    assert_close(y, y_ref, TOL, "matmul chain on tokens")
    assert not collapse_pays(6, 3, 6) and collapse_pays(6, 9, 6)
