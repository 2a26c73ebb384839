"""Shifted products against brute force, and the rule that chooses them."""
import numpy as np
import pytest

from onnxobq.hessian import HessianSum, Products, conv_outputs, shifts_pay
from onnxobq.hessian.shifted import ring_bounds
from onnxobq.hessian.sums import add_shifted

import builders
from brute import Counting, brute_force_conv_hessian, conv_layer


SHIFTED = [
    dict(xshape=(2, 3, 9, 10), wshape=(4, 3, 3, 3), pads=[1, 1, 1, 1]),
    dict(xshape=(1, 2, 11, 9), wshape=(4, 2, 5, 3), pads=[2, 0, 1, 3], dilations=[2, 1]),
    dict(xshape=(2, 2, 7, 8), wshape=(3, 2, 1, 3), auto_pad="SAME_LOWER"),
    dict(xshape=(1, 3, 8, 8), wshape=(3, 3, 3, 3), auto_pad="VALID"),
    dict(xshape=(1, 2, 6, 7), wshape=(2, 2, 3, 2), pads=[4, 3, 0, 5]),     # pads wider than the kernel
    dict(xshape=(3, 2, 5, 6), wshape=(2, 2, 2, 2), auto_pad="SAME_UPPER"),
    dict(xshape=(1, 2, 4, 5), wshape=(2, 2, 3, 3), pads=[4, 5, 4, 5], dilations=[4, 3]),  # shifts past the input
]


@pytest.mark.parametrize("left", [True, False], ids=["stack-left", "stack-right"])
@pytest.mark.parametrize("case", SHIFTED, ids=lambda c: "x".join(map(str, c["wshape"])) + "-" + str(c.get("auto_pad", c.get("pads"))))
def test_shifted_products_give_the_brute_force_hessian(case, left):
    """A stride-1 conv's sum built from shifted products equals the sum over every patch, and
    counts every output position, with the stack of shifted copies multiplied on either side."""
    case = dict(case)
    x = np.random.default_rng(12).standard_normal(case.pop("xshape")).astype(np.float32)
    layer = conv_layer(**case)
    acc, product = HessianSum(), Products(np)
    add_shifted(layer, x, acc, product, 1 << 30 if left else 0)
    assert acc.count == x.shape[0] * np.prod(conv_outputs(layer.conv, x.shape[2:]))
    H = acc.hessian(np, product)
    np.testing.assert_allclose(H, 2 * brute_force_conv_hessian(x, layer) / acc.count, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("ring_elements", [60, 400, 1 << 20])
def test_ring_patches_held_back_or_not_give_the_brute_force_hessian(ring_elements):
    """Batches of a stride-1 conv whose ring patches (four strips of 15 patch rows, with 7, 7,
    6 and 6 patches an image) are subtracted at once (the strips hold 4 columns), held in 26
    columns or held in 30 all give the brute-force Hessian, in the known products."""
    r = np.random.default_rng(15)
    layer = conv_layer(wshape=(4, 5, 3, 3), pads=[1, 1, 1, 1])
    batches = [r.standard_normal((1, 5, 6, 5)).astype(np.float32) for _ in range(7)]
    acc, product = HessianSum(ring_elements=ring_elements), Counting(np)
    for x in batches:
        add_shifted(layer, x, acc, product)
    H = acc.hessian(np, product)
    assert sorted(product.calls) == sorted({60: [7] * 14 + [6] * 14,
                                            400: [21, 21, 7] * 2 + [24, 18] * 2,
                                            1 << 20: [28, 21] * 2 + [30, 12] * 2}[ring_elements])
    np.testing.assert_allclose(H, 2 * brute_force_conv_hessian(np.concatenate(batches), layer) / (7 * 30),
                               rtol=1e-4, atol=1e-5)


def test_shifts_pay_only_for_wide_stride_1_2d_convs_with_one_group():
    """The rule's known answers for a 3 x 3 conv of 96 channels, one image a batch, im2col's
    columns held in gathers of 1,728: at 52 x 52 yes (cost ratio 0.33), at 13 x 13 yes (0.57),
    at 10 x 10 no (0.74); at 7 x 7 no (1.16), but yes where im2col's 49 columns would be
    multiplied alone (0.36); strided, grouped, pointwise or 1-D never."""
    wide, cpu = np.zeros((1, 96, 52, 52), np.float32), builders.cpu()
    conv = conv_layer((96, 96, 3, 3), pads=[1, 1, 1, 1])
    assert shifts_pay(conv, wide, cpu, gather=1728)
    assert shifts_pay(conv, wide[:, :, :13, :13], cpu, gather=1728)
    assert not shifts_pay(conv, wide[:, :, :10, :10], cpu, gather=1728)
    assert not shifts_pay(conv, wide[:, :, :7, :7], cpu, gather=1728)
    assert shifts_pay(conv, wide[:, :, :7, :7], builders.cpu())
    assert not shifts_pay(conv_layer((96, 96, 3, 3), strides=[2, 2], pads=[1, 1, 1, 1]), wide, builders.cpu())
    assert not shifts_pay(conv_layer((96, 48, 3, 3), groups=2, pads=[1, 1, 1, 1]), wide, builders.cpu())
    assert not shifts_pay(conv_layer((96, 96, 1, 1)), wide, builders.cpu())
    assert not shifts_pay(conv_layer((96, 96, 3), pads=[1, 1]), wide[:, :, 0], builders.cpu())
    assert ring_bounds(conv.conv, (52, 52)) == [(0, 1, 53, 54)] * 2
