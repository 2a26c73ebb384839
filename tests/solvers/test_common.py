"""The shared pieces of the solvers: damping with retries, dead columns."""
import numpy as np

from onnxobq.solvers.common import Damping, damped_inverse_cholesky, fix_dead_columns


def hessians_needing_retries(C=6):
    """Three groups: positive definite; indefinite until an absolute damping above 0.05 (the
    second try of 0.01, 0.1, ...); negative definite (every try fails)."""
    r = np.random.default_rng(3)
    X = r.standard_normal((C, 3 * C))
    H = np.stack([X @ X.T / C, np.eye(C), -100 * np.eye(C)])
    H[1, 0, 0] = -0.05
    return H


def test_damping_in_place_gives_what_a_copy_gives():
    H = hessians_needing_retries()
    damp = Damping(0.01, relative=False, retries=3)
    kept = H.copy()
    X, lam, ok = damped_inverse_cholesky(H, damp, np, upper=True)
    np.testing.assert_array_equal(H, kept)                       # the input is kept
    scratch = H.copy()
    X2, lam2, ok2 = damped_inverse_cholesky(scratch, damp, np, upper=True, overwrite=True)
    np.testing.assert_array_equal(X2, X)
    np.testing.assert_array_equal(lam2, lam)
    assert list(ok2) == list(ok) == [True, True, False]
    assert lam[0] == 0.01 and lam[1] == 0.1 and np.isnan(lam[2])
    np.testing.assert_array_equal(X[2], np.eye(6))               # the identity where every try failed
    # the scratch copy is left damped by the last try (10, for the group that fails them all)
    np.testing.assert_array_equal(scratch - kept, 10.0 * np.broadcast_to(np.eye(6), (3, 6, 6)))
    # and the factor of a damped group is the factor of H + lam I
    U1 = damped_inverse_cholesky(kept[1:2] + 0.1 * np.eye(6), Damping(0.0, relative=False, retries=0), np,
                                 upper=True)[0]
    np.testing.assert_allclose(X[1:2], U1, rtol=1e-12)


def test_dead_columns_get_a_unit_diagonal_in_a_copy_and_a_live_H_is_used_as_it_is():
    H = np.stack([np.diag([2.0, 0.0, 3.0]), np.diag([1.0, 1.0, 1.0])])
    fixed = fix_dead_columns(H, np)
    np.testing.assert_array_equal(np.diagonal(fixed, axis1=1, axis2=2), [[2, 1, 3], [1, 1, 1]])
    assert H[0, 1, 1] == 0.0                                      # not modified
    live = H[1:]
    assert fix_dead_columns(live, np) is live
