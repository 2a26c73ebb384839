"""Column orders for the sweep: the paper's Fig. 1 / Table 3 ablation, and GPTQ's.

Each score is one number per column (summed over rows); the order sorts columns
by it, largest first (``_des``) or smallest first (``_asc``).

- ``sensi``: S_j = sum_i (w_ij - q(w_ij))^2 / [H^-1]_jj  (Eqn. 11 without the 1/2)
- ``err``:   sum_i (w_ij - q(w_ij))^2
- ``w``:     sum_i w_ij^2
- ``act``:   diag(H), largest first (GPTQ's act-order)
- ``none``:  the natural order (plain GPTQ)
"""
from __future__ import annotations

import numpy as np


def _sensi(W, Wq, hinv_diag, h_diag, xp):
    return (((W - Wq) ** 2).sum(axis=1)) / hinv_diag


def _err(W, Wq, hinv_diag, h_diag, xp):
    return ((W - Wq) ** 2).sum(axis=1)


def _w(W, Wq, hinv_diag, h_diag, xp):
    return (W ** 2).sum(axis=1)


SCORES = {"sensi": _sensi, "err": _err, "w": _w}
ORDERS = tuple([f"{k}_{d}" for k in SCORES for d in ("des", "asc")] + ["act", "none"])


def uses_inverse_diagonal(name: str) -> bool:
    """Whether an order's score needs diag(H^-1) (the others do not pay for it)."""
    return name.startswith("sensi")


def argsort_stable(a, xp):
    """Stable argsort on the last axis (ties keep their natural order on both backends)."""
    if xp is np:
        return np.argsort(a, axis=-1, kind="stable")
    return xp.argsort(a, axis=-1)  # CuPy's sort is a stable radix sort


def column_order(name: str, W, Wq, hinv_diag, h_diag, xp):
    """The sweep order of each group's columns.

    Args:
        name: one of ORDERS.
        W: weights (G, R, C); Wq: their round-to-nearest values (G, R, C).
        hinv_diag: diag of the damped inverse Hessian (G, C), or None where the
            order does not use it (see uses_inverse_diagonal); h_diag: diag of H (G, C).
        xp: numpy or cupy.

    Returns:
        perm (G, C) of integer column indices, first-swept first.
    """
    G, _, C = W.shape
    if name == "none":
        return xp.broadcast_to(xp.arange(C), (G, C)).copy()
    if name == "act":
        return argsort_stable(-h_diag, xp)
    return order_of_scores(name, column_scores(name, W, Wq, hinv_diag, h_diag, xp), xp)


def depends_on_weights(name: str) -> bool:
    """Whether an order's scores are sums over the weight's rows (the others need only H)."""
    return name.partition("_")[0] in SCORES


def column_scores(name: str, W, Wq, hinv_diag, h_diag, xp):
    """A weight-dependent order's scores (G, C): sums over the rows of W, so the scores of parts
    of the rows add up to the whole's."""
    key, _, direction = name.partition("_")
    if key not in SCORES or direction not in ("des", "asc"):
        raise ValueError(f"unknown column order {name!r}; choose from {', '.join(ORDERS)}")
    return SCORES[key](W, Wq, hinv_diag, h_diag, xp)


def order_of_scores(name: str, score, xp):
    """The permutation (G, C) that sorts ``score`` as order ``name`` asks."""
    return argsort_stable(-score if name.endswith("_des") else score, xp)
