"""Round to nearest: the solver that ignores H."""
from __future__ import annotations

import numpy as np

from ..quant import quantize, dequantize
from .common import Result
from .registry import register


@register("rtn", uses_hessian=False)
def rtn(W, H, grid, *, order=None, block=128, damp=None, xp=np, kernel=False) -> Result:
    """Round every weight of W (G, R, C) to the nearest point of ``grid`` (scale (G, R), or (G, R, C))."""
    s, z = grid.columns()
    codes = quantize(W, s, z, grid.qmin, grid.qmax, xp)
    G = W.shape[0]
    return Result(dequantize(codes, s, z), codes, grid.scale, grid.zero,
                  np.full(G, np.nan), np.zeros(G, dtype=bool))
