"""Per-output-channel (or per-group) uniform grids: integer range, scale search, rounding.

A grid maps a real weight w of row r to the integer code
``q = clip(round(w / scale[r]) + zero[r], qmin, qmax)`` and back to
``(q - zero[r]) * scale[r]``. Every solver (RTN, GPTQ, FastOBQ, OBQ) rounds
with :func:`snap`; they differ only in how they move the weights before rounding.

Arrays have rows on the second-to-last axis and columns on the last axis, so a
stack of groups (G, R, C) gets one scale per (G, R). With a group size B, each row
has one scale per B consecutive columns (the last group may be shorter), as GPTQ's
groups and DequantizeLinear's ``block_size`` have it; the grid then holds the scale
of every column, (G, R, C), so that the solvers round column k with the scale of its group.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

# OBQ's scale search: shrink the range by p = 1.00, 0.99, ..., 0.20 and keep
# the p that minimises sum |q - w|^2.4 for each channel.
MSE_SHRINKS = tuple(round(1.0 - 0.01 * i, 2) for i in range(81))
MSE_NORM = 2.4


@dataclass(frozen=True)
class GridSpec:
    """How the grid is chosen.

    Args:
        bits: bit width, 2 to 8.
        symmetric: zero-point 0 and a signed range (default, what TensorRT needs);
            False gives an unsigned range with a per-channel zero-point.
        narrow: use the restricted signed range [-(2^(b-1)-1), 2^(b-1)-1] that
            TensorRT has historically required for INT8 weights. Symmetric only.
        search: "minmax" (scale from the channel's range) or "mse" (shrink search).
        group_size: one scale per this many consecutive columns of each row (0: one per row).
    """

    bits: int = 4
    symmetric: bool = True
    narrow: bool = False
    search: str = "minmax"
    group_size: int = 0


@dataclass(frozen=True)
class Grid:
    """A fitted grid: one scale and zero-point per row (per group and row), or with
    ``group_size`` > 0 one per column, equal within each group of columns."""

    scale: object  # xp array, shape (..., R), or (..., R, C) with groups
    zero: object   # xp array, the shape of scale; integer-valued floats
    qmin: int
    qmax: int
    group_size: int = 0

    def columns(self):
        """(scale, zero) shaped to broadcast against the weights (..., R, C)."""
        if self.group_size:
            return self.scale, self.zero
        return self.scale[..., None], self.zero[..., None]


def int_range(bits: int, symmetric: bool = True, narrow: bool = False) -> tuple[int, int]:
    """The integer code range of a grid.

    Args:
        bits: bit width.
        symmetric: signed codes (True) or unsigned codes with a zero-point.
        narrow: drop the most negative signed code (symmetric only).

    Returns:
        (qmin, qmax).
    """
    if symmetric:
        half = 2 ** (bits - 1)
        return (-(half - 1) if narrow else -half), half - 1
    return 0, 2 ** bits - 1


def quantize(w, scale, zero, qmin: int, qmax: int, xp=np):
    """Integer codes (as floats) of ``w`` on the grid; scale/zero broadcast on the last axis of w's rows."""
    return xp.clip(xp.round(w / scale) + zero, qmin, qmax)


def dequantize(q, scale, zero):
    """Real values of integer codes."""
    return (q - zero) * scale


def snap(w, scale, zero, qmin: int, qmax: int, xp=np):
    """Round ``w`` to the nearest grid point: the rounding primitive of every solver."""
    return dequantize(quantize(w, scale, zero, qmin, qmax, xp), scale, zero)


def _scale_zero(lo, hi, spec: GridSpec, qmin: int, qmax: int, xp):
    """Scale and zero-point for a range [lo, hi] that contains 0."""
    if spec.symmetric:
        absmax = xp.maximum(-lo, hi)
        # 2*absmax spread over all qmax - qmin steps: with the full range the
        # extremes land on -2^(b-1) and 2^(b-1)-1 (the +absmax end rounds down by
        # half a step); with the narrow range this is absmax / qmax exactly.
        scale = 2.0 * absmax / (qmax - qmin)
        zero = xp.zeros_like(scale)
    else:
        scale = (hi - lo) / (qmax - qmin)
        zero = None
    scale = xp.where(scale > 0, scale, xp.ones_like(scale))  # all-zero rows: any scale works
    if zero is None:
        zero = xp.clip(xp.round(-lo / scale), qmin, qmax)
    return scale, zero


def fit_grid(W, spec: GridSpec, xp=np) -> Grid:
    """Fit one grid per row of ``W`` (rows on axis -2, columns on axis -1), or per group of
    ``spec.group_size`` columns of each row.

    Args:
        W: weights, shape (..., R, C).
        spec: the grid choice.
        xp: numpy or cupy.

    Returns:
        A Grid whose scale and zero have shape (..., R), or (..., R, C) with groups.
    """
    B = spec.group_size
    if B:
        # Each group becomes a row of its own. The last group is padded with zeros, which
        # change neither its range (that always holds 0) nor its MSE search (0 is on the grid).
        C = W.shape[-1]
        n = -(-C // B)
        padded = xp.zeros(W.shape[:-1] + (n * B,), dtype=W.dtype)
        padded[..., :C] = W
        g = fit_grid(padded.reshape(W.shape[:-1] + (n, B)), replace(spec, group_size=0), xp)
        return Grid(xp.repeat(g.scale, B, axis=-1)[..., :C], xp.repeat(g.zero, B, axis=-1)[..., :C],
                    g.qmin, g.qmax, B)
    qmin, qmax = int_range(spec.bits, spec.symmetric, spec.narrow)
    lo = xp.minimum(W.min(axis=-1), 0)
    hi = xp.maximum(W.max(axis=-1), 0)
    if spec.search == "minmax":
        scale, zero = _scale_zero(lo, hi, spec, qmin, qmax, xp)
        return Grid(scale, zero, qmin, qmax)
    if spec.search != "mse":
        raise ValueError(f"unknown scale search {spec.search!r}")
    best = xp.full(lo.shape, xp.inf, dtype=W.dtype)
    scale = xp.ones_like(lo)
    zero = xp.zeros_like(lo)
    for p in MSE_SHRINKS:
        s, z = _scale_zero(lo * p, hi * p, spec, qmin, qmax, xp)
        err = (xp.abs(snap(W, s[..., None], z[..., None], qmin, qmax, xp) - W) ** MSE_NORM).sum(axis=-1)
        better = err < best
        best = xp.where(better, err, best)
        scale = xp.where(better, s, scale)
        zero = xp.where(better, z, zero)
    return Grid(scale, zero, qmin, qmax)
