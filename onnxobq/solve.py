"""The solve stage: one layer's stored weight and Hessian in, its quantized form out.

This is the seam between the graph's layout (Layer) and the pure solvers, which
see only (G, R, C) stacks. No onnx here.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from .backend import is_cupy, synchronize, to_numpy
from .config import SolveConfig
from .graph.layers import Layer, from_matrix, to_matrix
from .quant import fit_grid
from .solvers import METHODS, layer_error


@dataclass(frozen=True)
class QuantizedLayer:
    """A layer's quantized weight in its stored layout.

    Attributes:
        layer: the layer.
        codes: integer grid codes (int32), shaped like the stored weight.
        scale: per output channel (O,), float64; zero: per output channel (O,), int32.
        qmin, qmax: the integer range; bits: the bit width.
        bias: a replacement bias (O,) set by BN folding or correction, else None.
    """

    layer: Layer
    codes: np.ndarray
    scale: np.ndarray
    zero: np.ndarray
    qmin: int
    qmax: int
    bits: int
    bias: np.ndarray | None = None

    def channel_shape(self) -> tuple[int, ...]:
        """Shape that broadcasts a per-channel vector against the stored weight."""
        shape = [1] * len(self.layer.shape)
        shape[self.layer.channel_axis] = -1
        return tuple(shape)

    def stored_scale(self) -> np.ndarray:
        """The scale as the model stores it: in the weight's dtype (DequantizeLinear's output type)."""
        return self.scale.astype(self.layer.dtype)

    def weight(self) -> np.ndarray:
        """The dequantized weight in the layer's dtype, computed as DequantizeLinear does
        (in float32 for a float32 or float16 weight, then rounded to the weight's dtype)."""
        cs = self.channel_shape()
        work = np.float64 if np.dtype(self.layer.dtype) == np.float64 else np.float32
        diff = (self.codes - self.zero.reshape(cs)).astype(work)
        return (diff * self.stored_scale().astype(work).reshape(cs)).astype(self.layer.dtype)


@dataclass(frozen=True)
class LayerStats:
    """Per-layer figures for the report (errors are ||WX-QX||^2/||WX||^2 from the Hessian)."""

    name: str
    op: str
    shape: tuple[int, ...]
    groups: int
    bits: int
    method: str
    error: float | None
    rtn_error: float | None
    seconds: float
    damp: float | None
    cols: int = 0
    rows: int | None = None
    note: str = ""

    @property
    def rank_deficient(self) -> bool:
        """Its Hessian came from fewer rows of X than it has inputs (Hessian methods only)."""
        return self.rows is not None and self.rows < self.cols


def working_dtype(precision: str, xp):
    """float64 on the CPU and float32 on a GPU unless the user chose."""
    if precision == "auto":
        return xp.float32 if is_cupy(xp) else xp.float64
    return getattr(xp, precision)


def solve_layer(layer: Layer, w: np.ndarray, H, cfg: SolveConfig, xp,
                rows: int | None = None) -> tuple[QuantizedLayer, LayerStats]:
    """Quantize one layer.

    Args:
        layer: the layer.
        w: its stored float weight (NumPy).
        H: its Hessian (G, C, C) on ``xp``, or None when there is no calibration data.
        cfg: solver settings.
        xp: numpy or cupy.
        rows: how many rows of X (samples times output positions) built H, for the report.

    Returns:
        The QuantizedLayer and its LayerStats.
    """
    method = METHODS[cfg.method]
    dtype = working_dtype(cfg.precision, xp)
    W = xp.asarray(to_matrix(layer, w), dtype=dtype)
    Hw = None if H is None else xp.asarray(H, dtype=dtype)
    bad_input = Hw is not None and not bool(xp.isfinite(Hw).all())
    if bad_input:  # NaN/Inf activations (e.g. from a layer upstream left in float): no usable H
        method, Hw = METHODS["rtn"], None
    grid = fit_grid(W, cfg.grid, xp)
    synchronize(xp)
    start = time.perf_counter()
    if Hw is None:
        res = method.solve(W, None, grid, xp=xp)
    else:
        res = method.solve(W, Hw, grid, order=cfg.order or method.default_order,
                           block=cfg.block, damp=cfg.damp, xp=xp)
    synchronize(xp)
    seconds = time.perf_counter() - start
    error = rtn_error = None
    note = ""
    if Hw is not None:
        error = layer_error(W, res.Q, Hw, xp)
        rtn = METHODS["rtn"].solve(W, None, grid, xp=xp)
        rtn_error = layer_error(W, rtn.Q, Hw, xp)
    name = method.name
    if bad_input:
        note = "its calibration inputs hold NaN or Inf values: rounded to nearest; check the layers before it"
    elif res.fallback.any():
        name = f"{cfg.method}+rtn"
        note = (f"Cholesky failed in {int(res.fallback.sum())}/{layer.groups} group(s) even with "
                "more damping: rounded to nearest there; raise --damp")
    lam = res.damp[np.isfinite(res.damp)]
    q = QuantizedLayer(layer=layer,
                       codes=from_matrix(layer, to_numpy(res.codes)).astype(np.int32),
                       scale=to_numpy(res.scale).reshape(-1).astype(np.float64),
                       zero=to_numpy(res.zero).reshape(-1).astype(np.int32),
                       qmin=grid.qmin, qmax=grid.qmax, bits=cfg.grid.bits)
    stats = LayerStats(layer.name, layer.op, layer.shape, layer.groups, cfg.grid.bits, name,
                       error, rtn_error, seconds, float(lam.max()) if lam.size else None, layer.cols,
                       rows if method.uses_hessian else None, note)
    return q, stats
