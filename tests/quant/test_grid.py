import numpy as np
import pytest

from onnxobq.quant import GridSpec, fit_grid, int_range, snap
from onnxobq.quant.grid import MSE_NORM, MSE_SHRINKS


def test_int_ranges():
    assert int_range(4) == (-8, 7)
    assert int_range(4, narrow=True) == (-7, 7)
    assert int_range(8) == (-128, 127)
    assert int_range(6, symmetric=False) == (0, 63)


def test_symmetric_minmax_scale_and_zero():
    W = np.array([[[-1.0, 0.5, 0.25]], [[0.2, 0.4, -0.1]]])     # (G=2, R=1, C=3)
    grid = fit_grid(W, GridSpec(bits=4))
    np.testing.assert_allclose(grid.scale[:, 0], [2 * 1.0 / 15, 2 * 0.4 / 15])
    assert np.all(grid.zero == 0)
    narrow = fit_grid(W, GridSpec(bits=4, narrow=True))
    np.testing.assert_allclose(narrow.scale[:, 0], [1.0 / 7, 0.4 / 7])
    # with the narrow range, +-absmax are exactly grid points
    q = snap(W, narrow.scale[..., None], narrow.zero[..., None], narrow.qmin, narrow.qmax)
    assert q[0, 0, 0] == pytest.approx(-1.0) and q[1, 0, 1] == pytest.approx(0.4)


def test_asymmetric_range_contains_zero():
    W = np.array([[[0.5, 1.5, 1.0]]])                          # all positive: the range is [0, 1.5]
    grid = fit_grid(W, GridSpec(bits=2, symmetric=False))
    assert grid.scale[0, 0] == pytest.approx(0.5)
    assert grid.zero[0, 0] == 0
    q = snap(W, grid.scale[..., None], grid.zero[..., None], grid.qmin, grid.qmax)
    np.testing.assert_allclose(q, [[[0.5, 1.5, 1.0]]])


def test_all_zero_row_gets_a_valid_scale():
    grid = fit_grid(np.zeros((1, 2, 4)), GridSpec(bits=4))
    assert np.all(grid.scale == 1.0)


def test_mse_search_finds_the_brute_force_optimum():
    r = np.random.default_rng(0)
    W = r.standard_normal((1, 6, 50)) * np.array([1, 2, 3, 4, 5, 6])[None, :, None]
    W[0, :, 0] = 15.0                                           # an outlier makes shrinking worthwhile
    spec = GridSpec(bits=3, search="mse")
    grid = fit_grid(W, spec)
    qmin, qmax = int_range(3)
    for row in range(6):
        w = W[0, row]
        best = min(MSE_SHRINKS, key=lambda p: (np.abs(
            snap(w, 2 * np.abs(w).max() * p / (qmax - qmin), 0, qmin, qmax) - w) ** MSE_NORM).sum())
        assert grid.scale[0, row] == pytest.approx(2 * np.abs(w).max() * best / (qmax - qmin))
    mm = fit_grid(W, GridSpec(bits=3))
    def err(g):
        return (np.abs(snap(W, g.scale[..., None], g.zero[..., None], qmin, qmax) - W) ** MSE_NORM).sum()
    assert err(grid) < err(mm)


@pytest.mark.parametrize("search", ["minmax", "mse"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_groups_are_fitted_as_rows_of_their_own(search, symmetric):
    # 23 columns in groups of 8: 8, 8 and a last group of 7, each fitted as if it were a row
    W = np.random.default_rng(5).standard_normal((2, 3, 23))
    W[1, 2, 16:] = np.abs(W[1, 2, 16:])                     # a last group that holds no negative weight
    spec = GridSpec(bits=3, symmetric=symmetric, search=search)
    grid = fit_grid(W, GridSpec(bits=3, symmetric=symmetric, search=search, group_size=8))
    assert grid.scale.shape == grid.zero.shape == (2, 3, 23) and grid.group_size == 8
    for lo in (0, 8, 16):
        alone = fit_grid(W[..., lo:lo + 8], spec)
        np.testing.assert_array_equal(grid.scale[..., lo:lo + 8], np.repeat(alone.scale[..., None], len(range(lo, min(lo + 8, 23))), -1))
        np.testing.assert_array_equal(grid.zero[..., lo:lo + 8], np.repeat(alone.zero[..., None], len(range(lo, min(lo + 8, 23))), -1))
