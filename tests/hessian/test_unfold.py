"""im2col against brute force: every conv geometry, Gemm and MatMul."""
import numpy as np
import pytest

from onnxobq.hessian import HessianSum, Products, layer_columns
from onnxobq.types import Layer

from brute import brute_force_conv_hessian, conv_layer


CASES = [
    dict(xshape=(2, 4, 7, 8), wshape=(6, 4, 3, 3), strides=[2, 1], pads=[1, 0, 2, 1], dilations=[1, 2]),
    dict(xshape=(2, 6, 7, 6), wshape=(6, 2, 3, 2), groups=3, strides=[2, 2], pads=[1, 1, 1, 1]),
    dict(xshape=(2, 5, 6, 7), wshape=(5, 1, 3, 3), groups=5, auto_pad="SAME_UPPER", strides=[2, 2]),
    dict(xshape=(1, 4, 6, 7), wshape=(4, 1, 4, 3), groups=4, auto_pad="SAME_LOWER", strides=[3, 2]),
    dict(xshape=(2, 4, 6, 5), wshape=(3, 4, 3, 3), auto_pad="VALID", strides=[2, 2]),
    dict(xshape=(3, 3, 13), wshape=(5, 3, 4), strides=[3], pads=[2, 1], dilations=[2]),
    dict(xshape=(1, 2, 4, 5, 5), wshape=(4, 2, 2, 3, 2), strides=[1, 2, 1], pads=[0, 1, 1, 1, 0, 1]),
    dict(xshape=(3, 8, 4, 5), wshape=(6, 8, 1, 1)),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c["wshape"])))
def test_conv_hessian_equals_brute_force(case):
    case = dict(case)
    x = np.random.default_rng(0).standard_normal(case.pop("xshape")).astype(np.float32)
    layer = conv_layer(**case)
    acc = HessianSum()
    acc.add(layer_columns(layer, x, np), np, Products(np))
    np.testing.assert_allclose(acc.sum, brute_force_conv_hessian(x, layer), rtol=1e-4, atol=1e-3)


def test_gemm_and_matmul_hessians_equal_brute_force():
    r = np.random.default_rng(1)
    a = r.standard_normal((5, 7)).astype(np.float32)
    gemm = Layer("g", "Gemm", "w", "initializer", "a", "y", (7, 3), "float32", 1, 3, 7, transposed=True)
    gemm_t = Layer("g", "Gemm", "w", "initializer", "a", "y", (3, 5), "float32", 1, 3, 5, trans_a=True)
    mm = Layer("m", "MatMul", "w", "initializer", "a", "y", (7, 3), "float32", 1, 3, 7, transposed=True)
    a3 = r.standard_normal((2, 4, 7)).astype(np.float32)
    for layer, act, rows in ((gemm, a, a), (gemm_t, a, a.T), (mm, a3, a3.reshape(-1, 7))):
        acc = HessianSum()
        acc.add(layer_columns(layer, act, np), np, Products(np))
        brute = sum(np.outer(row, row) for row in rows.astype(np.float64))
        np.testing.assert_allclose(acc.sum[0], brute, rtol=1e-5, atol=1e-4)
        assert acc.count == len(rows)
