"""Least-squares refit: exact where the block is linear, and never worse than the composed
weights on the data it was fitted on."""
import numpy as np
from chains import run, single_conv_model
from hypothesis import given, settings
from hypothesis import strategies as st

from lmopt.algebra.linear import ConvSpec, DenseSpec, compose_convs
from lmopt.algebra.refit import refit_conv, refit_dense


def conv_outputs(spec, x):
    model = single_conv_model(spec, (1,) + x.shape[1:])
    return np.concatenate([run(model, x[i:i + 1]) for i in range(len(x))])


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), stride=st.sampled_from([1, 2]), pad=st.integers(0, 1),
       depthwise=st.booleans(), size=st.integers(12, 16))
def test_refit_recovers_a_linear_block(seed, stride, pad, depthwise, size):
    rng = np.random.default_rng(seed)
    channels = 4
    group = channels if depthwise else 1
    first = ConvSpec(rng.standard_normal((channels, channels // group, 3, 3)), rng.standard_normal(channels),
                     (stride, stride), (pad, pad), (pad, pad), (1, 1), group)
    second = ConvSpec(rng.standard_normal((3, channels, 1, 1)), rng.standard_normal(3), (1, 1), (0, 0), (0, 0),
                      (1, 1), 1)
    merged = compose_convs(first, second, (size, size))
    x = rng.standard_normal((16, channels, size, size)).astype(np.float32)
    y = conv_outputs(merged, x)
    fitted = refit_conv(merged, x, y)
    assert fitted.weight.shape == merged.weight.shape and fitted.group == merged.group
    np.testing.assert_allclose(fitted.weight, merged.weight, atol=1e-3)
    np.testing.assert_allclose(fitted.bias, merged.bias, atol=1e-3)


def test_refit_beats_composition_when_an_activation_was_removed():
    rng = np.random.default_rng(0)
    first = ConvSpec(rng.standard_normal((6, 4, 3, 3)), rng.standard_normal(6), (1, 1), (1, 1), (1, 1), (1, 1), 1)
    second = ConvSpec(rng.standard_normal((5, 6, 1, 1)), rng.standard_normal(5), (1, 1), (0, 0), (0, 0), (1, 1), 1)
    x = rng.standard_normal((4, 4, 12, 12)).astype(np.float32)
    y = conv_outputs(second, np.maximum(conv_outputs(first, x), 0))   # the real block, with its ReLU
    merged = compose_convs(first, second, (12, 12))                    # the block with the ReLU removed
    fitted = refit_conv(merged, x, y)
    plain_error = np.mean((conv_outputs(merged, x) - y) ** 2)
    fitted_error = np.mean((conv_outputs(fitted, x) - y) ** 2)
    assert fitted_error < 0.7 * plain_error


def test_refit_dense_is_exact_on_linear_data_and_handles_tokens():
    rng = np.random.default_rng(1)
    spec = DenseSpec(rng.standard_normal((8, 5)), rng.standard_normal(5))
    x = rng.standard_normal((2, 40, 8))
    fitted = refit_dense(spec, x, x @ spec.weight + spec.bias)
    # the ridge term (1e-6 of the mean Gram diagonal) keeps it from being bit-exact
    np.testing.assert_allclose(fitted.weight, spec.weight, atol=1e-4)
    np.testing.assert_allclose(fitted.bias, spec.bias, atol=1e-4)


def test_refit_declines_problems_too_large_to_solve():
    spec = ConvSpec(np.zeros((2, 512, 5, 5)), None, (1, 1), (2, 2), (2, 2), (1, 1), 1)
    assert refit_conv(spec, np.zeros((1, 512, 8, 8)), np.zeros((1, 2, 8, 8))) is None
    wide = DenseSpec(np.zeros((3000, 2)), np.zeros(2))
    assert refit_dense(wide, np.zeros((4, 3000)), np.zeros((4, 2))) is None


def test_refit_declines_when_it_would_memorise_the_data():
    spec = ConvSpec(np.zeros((4, 8, 3, 3)), None, (1, 1), (1, 1), (1, 1), (1, 1), 1)
    few = np.zeros((1, 8, 5, 5))        # 25 rows for 73 unknowns per output
    assert refit_conv(spec, few, np.zeros((1, 4, 5, 5))) is None
    assert refit_dense(DenseSpec(np.zeros((8, 2)), np.zeros(2)), np.zeros((20, 8)), np.zeros((20, 2))) is None
