"""Exact OBQ (Frantar & Alistarh's Optimal Brain Quantizer): the baseline FastOBQ speeds up.

Every row is solved on its own: it keeps its own copy of H^-1, and at each step
quantizes the not-yet-quantized weight p with the smallest
(w_p - q(w_p))^2 / [H^-1]_pp (Eqn. 11), moves its other weights by Eqn. 10 and
downdates its own H^-1 by Eqn. 13. As in the reference OBC code, a row one of whose
weights the updates have pushed off the grid's range (a rounding error above half a
step) quantizes its worst such weight first (in steps of its own grid, where groups give
the weights of a row different steps), before the error can grow further. The rows take different orders, so nothing is
shared: O(d_row * d_col^3) work and one d_col^2 matrix per row in flight, against
FastOBQ's O(d_col^3 + d_row * d_col^2) and a single matrix. Rows are processed in
batches, vectorised over the batch.
"""
from __future__ import annotations

import numpy as np

from ..backend import is_cupy, to_numpy
from ..quant import dequantize, quantize
from .common import Damping, Result, fix_dead_columns, inverse_hessian
from .registry import register

# Rows in flight are limited so that their H^-1 copies fit in this many bytes: on a GPU,
# enough for OBC's 32 rows at d_col 4608 (ResNet-50's widest layers), so that each step's
# downdate is bound by memory bandwidth rather than by kernel launches.
ROW_BATCH_BYTES = {"cpu": 256 * 2 ** 20, "gpu": 4 * 2 ** 30}


def row_batch(R: int, C: int, itemsize: int, xp) -> int:
    """Rows of a layer solved together: as many as ROW_BATCH_BYTES allows, at least 1, at most R."""
    budget = ROW_BATCH_BYTES["gpu" if is_cupy(xp) else "cpu"]
    return max(1, min(R, budget // (C * C * itemsize)))


def obq_rows(W, Hinv, scale, zero, qmin: int, qmax: int, xp):
    """Quantize a batch of rows, each greedily with its own inverse Hessian.

    Args:
        W: weights (B, C) of B rows (copied, not modified).
        Hinv: damped inverse Hessian (C, C), the same at the start for every row.
        scale, zero: the rows' grids (B,), or one per weight (B, C) with groups.
        qmin, qmax: the integer range.
        xp: numpy or cupy.

    Returns:
        Integer codes (B, C), as floats.
    """
    B, C = W.shape
    W = W.copy()
    Hi = xp.broadcast_to(Hinv, (B, C, C)).copy()
    codes = xp.zeros_like(W)
    done = xp.zeros((B, C), dtype=bool)
    rows = xp.arange(B)
    s = xp.broadcast_to(scale[:, None] if scale.ndim == 1 else scale, (B, C))
    z = xp.broadcast_to(zero[:, None] if zero.ndim == 1 else zero, (B, C))
    for _ in range(C):
        q = quantize(W, s, z, qmin, qmax, xp)
        err = W - dequantize(q, s, z)
        diag = xp.diagonal(Hi, axis1=1, axis2=2)
        score = xp.where(done, xp.inf, err ** 2 / xp.where(done, 1, diag))   # Eqn. 11
        p = xp.argmin(score, axis=1)
        off = xp.where(done, 0, (err / s) ** 2)                   # squared error in steps
        off_grid = (off > 0.25).any(axis=1)                            # |w - q| > step / 2
        p = xp.where(off_grid, xp.argmax(off, axis=1), p)
        d = diag[rows, p]
        hrow = Hi[rows, p, :]                                   # (B, C): H^-1[p, :]
        W -= (err[rows, p] / d)[:, None] * hrow                 # Eqn. 10
        Hi -= hrow[:, :, None] * (hrow / d[:, None])[:, None, :]  # Eqn. 13
        codes[rows, p] = q[rows, p]
        W[rows, p] = dequantize(q[rows, p], s[rows, p], z[rows, p])
        done[rows, p] = True
    return codes


@register("obq", default_order=None)
def obq(W, H, grid, *, order=None, block=128, damp=Damping(), xp=np, kernel=False) -> Result:
    """Exact OBQ over every group and row of W (G, R, C). ``order``, ``block`` and ``kernel`` do not apply."""
    G, R, C = W.shape
    H = fix_dead_columns(H, xp)
    Hinv, lam, ok = inverse_hessian(H, damp, xp)
    codes = xp.empty_like(W)
    step = row_batch(R, C, W.dtype.itemsize, xp)
    s, z = grid.columns()
    for g in range(G):
        if not bool(ok[g]):   # no usable H^-1: round to nearest
            codes[g] = quantize(W[g], s[g], z[g], grid.qmin, grid.qmax, xp)
            continue
        for r0 in range(0, R, step):
            r1 = min(r0 + step, R)
            codes[g, r0:r1] = obq_rows(W[g, r0:r1], Hinv[g], grid.scale[g, r0:r1], grid.zero[g, r0:r1],
                                       grid.qmin, grid.qmax, xp)
    lam = to_numpy(xp.where(ok, lam, xp.nan)).astype(np.float64)
    return Result(dequantize(codes, s, z), codes, grid.scale, grid.zero, lam, ~to_numpy(ok))
