"""A slow, direct reference: the paper's Eqn. 12-13 column by column, with explicit H^-1."""
import numpy as np

from onnxobq.quant import snap
from onnxobq.solvers.orders import column_order


def direct_sweep(W, H, scale, zero, qmin, qmax, order="sensi_des", damp=0.01):
    """Quantize one group W (R, C) in ``order``, downdating H^-1 explicitly (Eqn. 13)
    and updating every row's remaining weights (Eqn. 12) after each column. ``scale`` and
    ``zero`` are per row (R,) or per weight (R, C)."""
    W, H = W.astype(np.float64).copy(), H.astype(np.float64).copy()
    C = H.shape[0]
    dead = np.diag(H) == 0
    H[dead, dead] = 1
    Hinv = np.linalg.inv(H + damp * np.mean(np.diag(H)) * np.eye(C))
    s, z = (scale, zero) if scale.ndim == 2 else (np.repeat(scale[:, None], C, 1), np.repeat(zero[:, None], C, 1))
    Wq = snap(W, s, z, qmin, qmax)
    perm = column_order(order, W[None], Wq[None], np.diag(Hinv)[None], np.diag(H)[None], np)[0]
    Q = np.zeros_like(W)
    for k in perm:
        q = snap(W[:, k], s[:, k], z[:, k], qmin, qmax)
        Q[:, k] = q
        delta = W[:, k] - q
        W -= np.outer(delta / Hinv[k, k], Hinv[k, :])                 # Eqn. 12
        Hinv -= np.outer(Hinv[:, k], Hinv[k, :]) / Hinv[k, k]         # Eqn. 13
    return Q
