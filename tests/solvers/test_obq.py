import numpy as np
import pytest

from onnxobq.quant import GridSpec, fit_grid, snap
from onnxobq.solvers import METHODS, Damping, layer_error

from test_sweep import problem


def direct_obq_row(w, H, scale, zero, qmin, qmax, damp=0.01, off_grid_rule=True):
    """One row, one weight at a time, with its own explicit H^-1 (Eqns. 10, 11, 13), and OBC's
    rule for weights pushed off the grid (rounding error above half a step: worst first).
    ``scale`` and ``zero`` are the row's, or one per weight (C,)."""
    w = w.astype(np.float64).copy()
    C = len(w)
    H = H.copy()
    dead = np.diag(H) == 0
    H[dead, dead] = 1
    Hinv = np.linalg.inv(H + damp * np.mean(np.diag(H)) * np.eye(C))
    step = np.broadcast_to(scale, (C,))
    left = list(range(C))
    q_out = np.zeros(C)
    for _ in range(C):
        q = snap(w, scale, zero, qmin, qmax)
        p = min(left, key=lambda j: (w[j] - q[j]) ** 2 / Hinv[j, j])
        worst = max(left, key=lambda j: ((w[j] - q[j]) / step[j]) ** 2)
        if off_grid_rule and ((w[worst] - q[worst]) / step[worst]) ** 2 > 0.25:
            p = worst
        delta = w[p] - q[p]
        w -= delta / Hinv[p, p] * Hinv[p, :]
        Hinv -= np.outer(Hinv[:, p], Hinv[p, :]) / Hinv[p, p]
        w[p] = q[p]
        q_out[p] = q[p]
        left.remove(p)
    return q_out


@pytest.mark.parametrize("seed", range(4))
def test_obq_equals_a_direct_loop(seed, monkeypatch):
    from onnxobq.solvers import obq
    monkeypatch.setitem(obq.ROW_BATCH_BYTES, "cpu", 3 * 14 * 14 * 8)   # batches of 3 rows
    W, H = problem(seed, G=2, R=7, C=14, N=200)
    H[0, 5, :] = H[0, :, 5] = 0                                     # a dead input
    grid = fit_grid(W, GridSpec(bits=3))
    res = METHODS["obq"].solve(W, H, grid)
    for g in range(2):
        for r in range(7):
            ref = direct_obq_row(W[g, r], H[g], grid.scale[g, r], grid.zero[g, r], grid.qmin, grid.qmax)
            np.testing.assert_allclose(res.Q[g, r], ref, atol=1e-9)


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_obq_error_at_most_rtn(bits):
    for seed in range(4):
        W, H = problem(seed, R=16, C=40, N=400)
        grid = fit_grid(W, GridSpec(bits=bits))
        e_obq = layer_error(W, METHODS["obq"].solve(W, H, grid).Q, H, np)
        e_rtn = layer_error(W, METHODS["rtn"].solve(W, H, grid).Q, H, np)
        assert e_obq <= e_rtn


def test_off_grid_rule_is_exercised():
    """With 2 bits and strong correlations the updates push weights off the grid: OBQ follows the
    rule, and the rule changes the answer (so the equality above is not vacuous)."""
    W, H = problem(9, R=6, C=20, N=300)
    grid = fit_grid(W, GridSpec(bits=2))
    res = METHODS["obq"].solve(W, H, grid)
    args = [(W[0, r], H[0], grid.scale[0, r], grid.zero[0, r], grid.qmin, grid.qmax) for r in range(6)]
    with_rule = np.stack([direct_obq_row(*a) for a in args])
    without = np.stack([direct_obq_row(*a, off_grid_rule=False) for a in args])
    np.testing.assert_allclose(res.Q[0], with_rule, atol=1e-9)
    assert not np.allclose(with_rule, without)


def test_obq_falls_back_to_rtn_where_cholesky_fails():
    W, H = problem(3, G=2, R=4, C=10, N=100)
    H[1] = -np.eye(10)
    grid = fit_grid(W, GridSpec(bits=4))
    res = METHODS["obq"].solve(W, H, grid, damp=Damping(0.01, relative=False, retries=1))
    assert list(res.fallback) == [False, True]
    np.testing.assert_array_equal(res.Q[1], METHODS["rtn"].solve(W, H, grid).Q[1])


def test_obq_with_groups_equals_a_direct_loop():
    W, H = problem(7, G=2, R=5, C=14, N=200)
    grid = fit_grid(W, GridSpec(bits=3, group_size=4))       # groups of 4, 4, 4 and 2 columns
    res = METHODS["obq"].solve(W, H, grid)
    for g in range(2):
        for r in range(5):
            ref = direct_obq_row(W[g, r], H[g], grid.scale[g, r], grid.zero[g, r], grid.qmin, grid.qmax)
            np.testing.assert_allclose(res.Q[g, r], ref, atol=1e-9)
