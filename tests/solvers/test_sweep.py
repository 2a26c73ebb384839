import numpy as np
import pytest

from onnxobq.quant import GridSpec, fit_grid
from onnxobq.solvers import METHODS, ORDERS, Damping, layer_error

from reference import direct_sweep


def problem(seed, G=1, R=12, C=30, N=300, correlated=True):
    r = np.random.default_rng(seed)
    X = r.standard_normal((G, C, N))
    if correlated:
        mix = np.eye(C) + 0.6 * r.standard_normal((C, C))
        X = np.einsum("ij,gjn->gin", mix, X)
    H = 2 * X @ X.transpose(0, 2, 1) / N
    W = r.standard_normal((G, R, C))
    return W, H


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("block", [1, 7, 128])
def test_blocked_sweep_equals_direct_loop(order, block):
    for seed in range(3):
        W, H = problem(seed, G=2)
        grid = fit_grid(W, GridSpec(bits=3))
        res = METHODS["fastobq"].solve(W, H, grid, order=order, block=block)
        for g in range(W.shape[0]):
            ref = direct_sweep(W[g], H[g], grid.scale[g], grid.zero[g], grid.qmin, grid.qmax, order)
            np.testing.assert_allclose(res.Q[g], ref, atol=1e-5)


def test_codes_lie_on_the_grid_and_dequantize_to_Q():
    W, H = problem(4)
    grid = fit_grid(W, GridSpec(bits=4, symmetric=False))
    res = METHODS["fastobq"].solve(W, H, grid)
    assert np.array_equal(res.codes, np.round(res.codes))
    assert res.codes.min() >= grid.qmin and res.codes.max() <= grid.qmax
    np.testing.assert_allclose(res.Q, (res.codes - grid.zero[..., None]) * grid.scale[..., None])


@pytest.mark.parametrize("method", ["fastobq", "gptq"])
def test_identity_hessian_gives_rtn(method):
    W, _ = problem(1, G=3)
    H = np.broadcast_to(np.eye(W.shape[2]), (3, W.shape[2], W.shape[2])).copy()
    grid = fit_grid(W, GridSpec(bits=3))
    res = METHODS[method].solve(W, H, grid, order="sensi_des" if method == "fastobq" else "none")
    rtn = METHODS["rtn"].solve(W, H, grid)
    np.testing.assert_array_equal(res.Q, rtn.Q)


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_fastobq_error_at_most_rtn_on_correlated_problems(bits):
    for seed in range(5):
        W, H = problem(seed, R=32, C=64, N=500)
        grid = fit_grid(W, GridSpec(bits=bits))
        fast = layer_error(W, METHODS["fastobq"].solve(W, H, grid).Q, H, np)
        rtn = layer_error(W, METHODS["rtn"].solve(W, H, grid).Q, H, np)
        assert fast <= rtn


def test_descending_sensitivity_beats_ascending_on_average():
    """The paper's Fig. 1: quantizing the most sensitive columns first leaves more room to compensate."""
    des = asc = 0.0
    for seed in range(8):
        W, H = problem(seed, R=32, C=64, N=500)
        grid = fit_grid(W, GridSpec(bits=3))
        des += layer_error(W, METHODS["fastobq"].solve(W, H, grid, order="sensi_des").Q, H, np)
        asc += layer_error(W, METHODS["fastobq"].solve(W, H, grid, order="sensi_asc").Q, H, np)
    assert des < asc


def test_dead_columns_are_rounded_to_nearest_and_left_out_of_the_compensation():
    """An input that is zero on the calibration data keeps its rounded weight (it may be live
    on other data), and the other columns solve the problem without it."""
    W, H = problem(2)
    H[:, 3, :] = 0
    H[:, :, 3] = 0
    grid = fit_grid(W, GridSpec(bits=4))
    res = METHODS["fastobq"].solve(W, H, grid)
    rtn = METHODS["rtn"].solve(W, H, grid)
    np.testing.assert_array_equal(res.Q[:, :, 3], rtn.Q[:, :, 3])
    keep = [j for j in range(W.shape[2]) if j != 3]
    sub = METHODS["fastobq"].solve(W[:, :, keep], H[:, keep][:, :, keep], fit_grid(W, GridSpec(bits=4)))
    np.testing.assert_allclose(res.Q[:, :, keep], sub.Q, atol=1e-12)


def test_cholesky_failure_falls_back_to_rtn_and_says_so():
    W, H = problem(3, G=2)
    H[1] = -np.eye(H.shape[1])            # negative definite: no damping of the default size rescues it
    grid = fit_grid(W, GridSpec(bits=4))
    res = METHODS["fastobq"].solve(W, H, grid, damp=Damping(0.01, relative=False, retries=1))
    assert list(res.fallback) == [False, True]
    rtn = METHODS["rtn"].solve(W, H, grid)
    np.testing.assert_array_equal(res.Q[1], rtn.Q[1])
    assert np.isfinite(res.damp[0]) and np.isnan(res.damp[1])


def test_damping_is_raised_until_cholesky_succeeds():
    W, H = problem(5)
    C = H.shape[1]
    H[0] = np.eye(C) * 1.0
    H[0, 0, 0] = -0.05                   # indefinite: needs an absolute damping above 0.05
    grid = fit_grid(W, GridSpec(bits=4))
    res = METHODS["fastobq"].solve(W, H, grid, damp=Damping(0.01, relative=False, retries=3))
    assert not res.fallback[0]
    assert res.damp[0] == pytest.approx(0.1)


def test_absolute_damping_matches_direct_loop():
    W, H = problem(6)
    grid = fit_grid(W, GridSpec(bits=4))
    lam = 0.1
    res = METHODS["fastobq"].solve(W, H, grid, damp=Damping(lam, relative=False))
    rel = lam / np.mean(np.diag(H[0]))   # the reference takes a relative damping
    ref = direct_sweep(W[0], H[0], grid.scale[0], grid.zero[0], grid.qmin, grid.qmax, "sensi_des", damp=rel)
    np.testing.assert_allclose(res.Q[0], ref, atol=1e-6)


@pytest.mark.parametrize("C", [5, 70, 130, 301])          # LAPACK alone; halves, split unevenly
def test_inverse_factors_match_the_explicit_inverse(C):
    """U from the reversed Cholesky is GPTQ's upper factor of A^-1, and the diagonal of A^-1 is right."""
    from onnxobq.solvers.common import inverse_cholesky, inverse_diagonal, upper_inverse_factor

    r = np.random.default_rng(C)
    X = r.standard_normal((2, C, 3 * C))
    A = X @ X.transpose(0, 2, 1) / C + 0.1 * np.eye(C)
    inv = np.linalg.inv(A)
    U, ok = upper_inverse_factor(A, np)
    assert ok.all() and np.array_equal(U, np.triu(U))
    np.testing.assert_allclose(U, np.swapaxes(np.linalg.cholesky(inv), -1, -2), rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(inverse_diagonal(inverse_cholesky(A, np)[0], np), np.diagonal(inv, axis1=1, axis2=2),
                               rtol=1e-10)


@pytest.mark.parametrize("upper", [False, True])
@pytest.mark.parametrize("C", [90, 129, 301, 600])       # LAPACK alone; halves of 64 + 65; three levels
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_inverse_cholesky_is_the_inverse_of_lapacks_factor(dtype, C, upper):
    """L^-1 for A = L L^T; with upper, the U with U^T U = A^-1 (the transposed lower factor of A^-1)."""
    from onnxobq.solvers.common import inverse_cholesky

    r = np.random.default_rng(C)
    X = r.standard_normal((3, C, 2 * C))
    A = X @ X.transpose(0, 2, 1) / C + 0.05 * np.eye(C)
    got, ok = inverse_cholesky(A.astype(dtype), np, upper)
    triangle = np.triu if upper else np.tril
    assert ok.all() and got.dtype == dtype and np.array_equal(got, triangle(got))
    if upper:
        want = np.swapaxes(np.linalg.cholesky(np.linalg.inv(A)), 1, 2)
    else:
        want = np.linalg.inv(np.linalg.cholesky(A))
    scale = np.abs(want).max()
    np.testing.assert_allclose(got, want, rtol=0, atol=(2e-4 if dtype == np.float32 else 1e-11) * scale)


@pytest.mark.parametrize("upper", [False, True])
@pytest.mark.parametrize("C,bad", [(50, 0), (300, 7), (300, 250)])   # the failure in the first or the second half
def test_inverse_cholesky_fails_only_the_matrix_that_is_not_positive_definite(C, bad, upper):
    """A stack of three where the middle matrix has a negative diagonal entry at ``bad``: it
    gets the identity and ok False, the others their exact factors."""
    from onnxobq.solvers.common import inverse_cholesky

    r = np.random.default_rng(1)
    X = r.standard_normal((3, C, 2 * C))
    A = X @ X.transpose(0, 2, 1) / C + 0.05 * np.eye(C)
    A[1, bad, bad] = -1.0
    got, ok = inverse_cholesky(A, np, upper)
    assert ok.tolist() == [True, False, True]
    np.testing.assert_array_equal(got[1], np.eye(C))
    for g in (0, 2):
        want = np.linalg.inv(np.linalg.cholesky(A[g]))
        if upper:
            want = np.linalg.cholesky(np.linalg.inv(A[g])).T
        np.testing.assert_allclose(got[g], want, rtol=0, atol=1e-11 * np.abs(want).max())


@pytest.mark.parametrize("C", [30, 90])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_lower_inverse_inverts_each_triangle_and_keeps_the_dtype(dtype, C):
    from onnxobq.solvers.common import lower_inverse

    r = np.random.default_rng(7)
    L = np.tril(r.standard_normal((3, C, C))) + 10 * np.eye(C)
    got = lower_inverse(L.astype(dtype), np)
    assert got.dtype == dtype and np.array_equal(got, np.tril(got))
    np.testing.assert_allclose(got, np.linalg.inv(L), rtol=1e-4 if dtype == np.float32 else 1e-10,
                               atol=1e-6 if dtype == np.float32 else 1e-13)


@pytest.mark.parametrize("order", ["sensi_des", "none", "act"])
@pytest.mark.parametrize("group_size", [5, 8, 30])
def test_sweep_with_groups_equals_direct_loop(order, group_size):
    # groups of 5 and 8 columns of 30 (the last one of 8 is short), and one group of all 30
    for seed in range(2):
        W, H = problem(seed, G=2)
        grid = fit_grid(W, GridSpec(bits=3, symmetric=seed == 0, group_size=group_size))
        res = METHODS["fastobq"].solve(W, H, grid, order=order, block=7)
        for g in range(W.shape[0]):
            ref = direct_sweep(W[g], H[g], grid.scale[g], grid.zero[g], grid.qmin, grid.qmax, order)
            np.testing.assert_allclose(res.Q[g], ref, atol=1e-5)


def test_one_group_of_every_column_is_the_per_row_grid():
    W, H = problem(3, G=2)
    for method in ("rtn", "gptq", "fastobq", "obq"):
        rows = METHODS[method].solve(W, H, fit_grid(W, GridSpec(bits=4)))
        whole = METHODS[method].solve(W, H, fit_grid(W, GridSpec(bits=4, group_size=30)))
        np.testing.assert_array_equal(rows.codes, whole.codes)
        np.testing.assert_array_equal(rows.Q, whole.Q)
