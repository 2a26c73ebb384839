"""FastOBQ and GPTQ: one column sweep with a single inverse Hessian shared by all rows.

FastOBQ (the seed paper, section 4) sorts the columns by aggregated sensitivity,
largest first, then quantizes one whole column at a time. After column k every
row's remaining weights move by Eqn. 12 and the shared H^-1 is downdated by
Eqn. 13. Those column-by-column downdates are exactly what the rows of the upper
Cholesky factor U of H^-1 (H^-1 = U^T U) hold, so the sweep reads them from U
instead of recomputing them (GPTQ's form):

    err      = (w[:, k] - q[:, k]) / U[k, k]
    W[:, k:] -= err (x) U[k, k:]                    (Eqn. 12 with Eqn. 13 folded in)

U comes from one Cholesky factorisation of the permuted, damped H and a triangular
inverse (``common.damped_upper_inverse_factor``); H^-1 itself is never formed. The
sensitivity orders need only diag(H^-1), which the triangular inverse of H's own factor
gives; the other orders factor H only once.

Within a block of B columns the updates are applied column by column; the
columns after the block receive them in one matrix product per block ("lazy
batch updates"). GPTQ is the same sweep in the natural order (or act-order).
"""
from __future__ import annotations

import numpy as np

from ..backend import is_cupy, to_numpy
from . import cuda_sweep
from ..quant import quantize, dequantize
from .common import (Damping, Result, damped_inverse_diagonal, damped_upper_inverse_factor, fix_dead_columns,
                     permute_columns, permute_square)
from .orders import (argsort_stable, column_order, column_scores, depends_on_weights, order_of_scores,
                     uses_inverse_diagonal)
from .registry import register


# Columns per inner block of blocked_sweep: inside a lazy block, each inner block's updates
# reach the block's later columns in one matrix product (see blocked_sweep).
INNER_BLOCK = 16


def blocked_sweep(W, U, scale, zero, qmin, qmax, block, xp):
    """Quantize the columns of W in their stored order, compensating with U.

    Two levels of lazy updates: a column's Eqn. 12 update is applied at once only to the
    other columns of its inner block of INNER_BLOCK; the inner block's errors reach the rest
    of its block in one matrix product, and the block's errors the columns after it in
    another. The sweep runs on W transposed, (G, C, R), so that the columns it reads and
    updates are contiguous. On 2 cores (float64, 4 bits, blocks of 128) the transposed
    layout took a 2,048 x 512 layer's sweep from 0.207 to 0.114 s and a 512 x 4,608 one's
    from 0.66 to 0.344 s; the inner blocks then took them from 0.123 to 0.045 s and from 0.365
    to 0.250 s (4,096 x 256: 0.100 to 0.032 s). The codes were the same in all of these.

    Args:
        W: weights (G, R, C), already permuted into sweep order.
        U: upper Cholesky factor of the (permuted, damped) inverse Hessian (G, C, C).
        scale, zero: the grid, per row (G, R) or per column (G, R, C) in the same permuted
            order; qmin, qmax: the integer range.
        block: columns per lazy block.
        xp: numpy or cupy.

    Returns:
        Integer codes (G, R, C), as floats, in the same (permuted) column order.
    """
    Wt = xp.ascontiguousarray(xp.swapaxes(W, 1, 2))    # a copy: row k is column k of W
    G, C, R = Wt.shape
    codes = xp.empty_like(Wt)
    per_column = scale.ndim == 3
    if per_column:         # (G, C, R), like Wt: column k's scales are row k
        st, zt = xp.ascontiguousarray(xp.swapaxes(scale, 1, 2)), xp.ascontiguousarray(xp.swapaxes(zero, 1, 2))
    else:
        s, z = scale[:, None, :], zero[:, None, :]
    u_diag = xp.diagonal(U, axis1=1, axis2=2)
    for i1 in range(0, C, block):
        i2 = min(i1 + block, C)
        Err1 = xp.empty((G, i2 - i1, R), dtype=Wt.dtype)
        for j1 in range(i1, i2, INNER_BLOCK):
            j2 = min(j1 + INNER_BLOCK, i2)
            W2 = Wt[:, j1:j2]                          # a view: updated in place
            for k in range(j1, j2):
                w = W2[:, k - j1:k - j1 + 1]            # (G, 1, R)
                if per_column:
                    s, z = st[:, k:k + 1], zt[:, k:k + 1]
                q = quantize(w, s, z, qmin, qmax, xp)
                codes[:, k:k + 1] = q
                err = (w - dequantize(q, s, z)) / u_diag[:, k, None, None]
                W2[:, k - j1:] -= U[:, k, k:j2, None] * err   # Eqn. 12, inside the inner block
                Err1[:, k - i1:k - i1 + 1] = err
            if j2 < i2:                                 # the rest of the block
                Wt[:, j2:i2] -= xp.swapaxes(U[:, j1:j2, j2:i2], 1, 2) @ Err1[:, j1 - i1:j2 - i1]
        Wt[:, i2:] -= xp.swapaxes(U[:, i1:i2, i2:], 1, 2) @ Err1   # lazy update of later columns
    return xp.ascontiguousarray(xp.swapaxes(codes, 1, 2))


def use_kernel(W, grid, block: int, xp, kernel: bool = True) -> bool:
    """Whether the sweep runs as one CUDA kernel per block: where ``kernel`` allows it
    (Device.sweep_kernel), on CuPy, for blocks of at most 128 columns and one scale per row."""
    return kernel and is_cupy(xp) and cuda_sweep.supports(W, block) and not grid.group_size


def sweep_solve(W, H, grid, *, order: str, block: int = 128, damp: Damping = Damping(), xp=np,
                kernel: bool = False) -> Result:
    """Quantize W with one shared inverse Hessian per group, sweeping columns in ``order``.

    Args:
        W: weights (G, R, C) in the working precision.
        H: Hessians 2XX^T/N (G, C, C), same dtype.
        grid: the Grid (scale, zero of shape (G, R), or (G, R, C) with groups).
        order: a column order from solvers.orders.ORDERS, or a permutation (G, C) found by
            layer_order where W is a part of a layer's rows.
        block: columns per lazy block (default 128).
        damp: damping rule (default relative 0.01).
        xp: numpy or cupy.
        kernel: run the in-block loop as a CUDA kernel where it can (see use_kernel).

    Returns:
        Result. Groups whose Cholesky fails at every damping are rounded to nearest:
        with U = I the sweep makes no updates, which is exactly RTN.
    """
    H = fix_dead_columns(H, xp)
    s, z = grid.columns()
    if isinstance(order, str):
        Wq = dequantize(quantize(W, s, z, grid.qmin, grid.qmax, xp), s, z)
        hinv_diag = damped_inverse_diagonal(H, damp, xp) if uses_inverse_diagonal(order) else None
        perm = column_order(order, W, Wq, hinv_diag, xp.diagonal(H, axis1=-2, axis2=-1), xp)
        del Wq
    else:       # the layer's order, found over all its rows (layer_order) for a part of them
        perm = order
    # The damping is settled on the factorisation the sweep uses: positive definiteness does
    # not depend on the order, and the other orders then factor H only once. It damps the
    # permuted copy in place: beside H, the solve of a 1,024 x 4,096 float64 layer then peaked
    # at 3.5 arrays of H's size (tracemalloc), against 6.5 when the factor behind hinv_diag was
    # still held, H copied for its dead columns and the permuted copy again for its damping.
    U, lam, ok = damped_upper_inverse_factor(permute_square(H, perm, xp), damp, xp, overwrite=True)
    sweep = cuda_sweep.blocked_sweep_cuda if use_kernel(W, grid, block, xp, kernel) else blocked_sweep
    scale, zero = grid.scale, grid.zero
    if grid.group_size:     # each column keeps its group's scale
        scale, zero = permute_columns(scale, perm, xp), permute_columns(zero, perm, xp)
    codes = sweep(permute_columns(W, perm, xp), U, scale, zero, grid.qmin, grid.qmax, block, xp)
    codes = permute_columns(codes, argsort_stable(perm, xp), xp)   # undo the permutation
    lam = to_numpy(lam).astype(np.float64)           # NaN where every try failed
    return Result(dequantize(codes, s, z), codes, grid.scale, grid.zero, lam, ~to_numpy(ok))


def layer_order(parts, H, order: str, damp: Damping = Damping(), xp=np):
    """The column order ``order`` of a layer given as parts of its rows, for sweep_solve: a
    permutation (G, C) where the order's scores are sums over rows (each part's add up), else
    ``order`` itself. ``parts`` yields (W, grid) for each part."""
    if not depends_on_weights(order):
        return order
    H = fix_dead_columns(H, xp)
    hinv_diag = damped_inverse_diagonal(H, damp, xp) if uses_inverse_diagonal(order) else None
    total = None
    for W, grid in parts:
        s, z = grid.columns()
        Wq = dequantize(quantize(W, s, z, grid.qmin, grid.qmax, xp), s, z)
        score = column_scores(order, W, Wq, hinv_diag, xp.diagonal(H, axis1=-2, axis2=-1), xp)
        total = score if total is None else total + score
    return order_of_scores(order, total, xp)


@register("fastobq", default_order="sensi_des")
def fastobq(W, H, grid, *, order="sensi_des", block=128, damp=Damping(), xp=np, kernel=False) -> Result:
    """FastOBQ: sensitivity-descending column order, one shared inverse Hessian."""
    return sweep_solve(W, H, grid, order=order, block=block, damp=damp, xp=xp, kernel=kernel)


@register("gptq", default_order="none")
def gptq(W, H, grid, *, order="none", block=128, damp=Damping(), xp=np, kernel=False) -> Result:
    """GPTQ: the same sweep in the natural column order ("none") or act-order ("act")."""
    return sweep_solve(W, H, grid, order=order, block=block, damp=damp, xp=xp, kernel=kernel)
