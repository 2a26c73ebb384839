"""Running sums: batches add up to the full product, held back or not, in reused buffers."""
import numpy as np
import pytest

from onnxobq.hessian import HessianSum, Products, gather_columns, layer_columns
from onnxobq.hessian.sums import add_shifted

import builders
from brute import Counting, brute_force_conv_hessian, conv_layer


def test_hessian_sum_over_batches_equals_the_full_product():
    """Batches summed in place give 2 X X^T / N of all of them, symmetric."""
    r = np.random.default_rng(8)
    X = r.standard_normal((2, 301, 50)).astype(np.float32)          # (G, C, M)
    acc, product = HessianSum(), Products(np)
    for part in np.split(X, [20, 35], axis=2):
        acc.add(np.ascontiguousarray(part), np, product)
    H = acc.hessian(np)
    X64 = X.astype(np.float64)
    np.testing.assert_allclose(H, 2 * X64 @ X64.transpose(0, 2, 1) / 50, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(H, H.transpose(0, 2, 1))


def test_held_back_samples_are_multiplied_in_gathers_and_all_counted():
    """With ``gather``, batches with fewer columns wait and are multiplied together; batches with
    more go straight in; hessian() multiplies what is still held. The result is the full product."""
    r = np.random.default_rng(10)
    X = r.standard_normal((2, 40, 200)).astype(np.float32)          # (G, C, M)
    acc, product = HessianSum(gather=64), Counting(np)
    calls = product.calls
    for part in np.split(X, [20, 50, 60, 150, 170], axis=2):        # 20, 30, 10, 90, 20, 30 columns
        acc.add(np.ascontiguousarray(part), np, product)
    assert calls == [90, 60] and acc.count == 200     # 90 straight in; 20+30+10 held until 20 more came
    H = acc.hessian(np, product)
    assert calls == [90, 60, 50]                       # the last 20 + 30, held until the end
    X64 = X.astype(np.float64)
    np.testing.assert_allclose(H, 2 * X64 @ X64.transpose(0, 2, 1) / 200, rtol=1e-5, atol=1e-4)


def test_a_batch_that_cannot_share_a_gather_is_multiplied_at_once_not_copied():
    r = np.random.default_rng(11)
    P = r.standard_normal((1, 8, 40)).astype(np.float32)
    acc = HessianSum(gather=64)                                    # two batches of 40 never fit
    acc.add(P, np, Products(np))
    assert acc._waiting is None and acc.count == 40
    np.testing.assert_allclose(acc.sum[0], P[0].astype(np.float64) @ P[0].T.astype(np.float64), rtol=1e-5)


def test_gather_columns_is_twice_the_features_within_the_held_memory_cap():
    layer = conv_layer(wshape=(8, 16, 3, 3))                          # C = 144
    assert gather_columns(layer, builders.cpu()) == 288
    assert gather_columns(layer, builders.cpu(gather_elements=144 * 100)) == 100


def test_products_reuse_one_buffer_across_shapes():
    """Each product equals P P^T whatever came before it (a smaller, then a larger, shape),
    and a product of the same size or smaller lands in the same buffer."""
    r = np.random.default_rng(9)
    product = Products(np)
    first = None
    for shape in ((1, 5, 7), (3, 10, 4), (1, 2, 9), (2, 30, 11)):
        P = r.standard_normal(shape).astype(np.float32)
        got = product(P)
        np.testing.assert_allclose(got, P @ P.transpose(0, 2, 1), rtol=1e-5, atol=1e-5)
        if shape == (1, 2, 9):
            assert np.shares_memory(got, first)
        first = got


@pytest.mark.parametrize("shifted_first", [True, False])
def test_shifted_and_unfolded_batches_add_into_one_sum(shifted_first):
    """A layer whose batches go some through shifted products (the sum kernel-major) and some
    through im2col, held back in a gather or not, still gets the brute-force Hessian."""
    r = np.random.default_rng(13)
    layer = conv_layer(wshape=(4, 3, 3, 3), pads=[1, 1, 1, 1])
    batches = [r.standard_normal((n, 3, 6, 5)).astype(np.float32) for n in (2, 1, 3)]
    acc, product = HessianSum(gather=60), Products(np)                 # 30 columns a sample: held
    for i, x in enumerate(batches):
        if (i % 2 == 0) == shifted_first:
            add_shifted(layer, x, acc, product)
        else:
            acc.add(layer_columns(layer, x, np), np, product)
    H = acc.hessian(np, product)
    x = np.concatenate(batches)
    assert acc.count == 6 * 30
    np.testing.assert_allclose(H, 2 * brute_force_conv_hessian(x, layer) / 180, rtol=1e-4, atol=1e-5)
