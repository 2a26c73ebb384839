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
from .solvers import METHODS
from .solvers.common import relative_error, weighted_norms


@dataclass(frozen=True)
class QuantizedLayer:
    """A layer's quantized weight in its stored layout.

    Attributes:
        layer: the layer.
        codes: integer grid codes (int32), shaped like the stored weight.
        scale: per output channel (O,), float64; zero: per output channel (O,), int32. With
            ``group_size`` B > 0, one per output channel and group of B columns (O, ceil(C / B)),
            the columns being those of the solver's matrix (``graph.layers.to_matrix``).
        qmin, qmax: the integer range; bits: the bit width.
        bias: a replacement bias (O,) set by BN folding or correction, else None.
        group_size: the grid's group size (0: one scale per output channel).
    """

    layer: Layer
    codes: np.ndarray
    scale: np.ndarray
    zero: np.ndarray
    qmin: int
    qmax: int
    bits: int
    bias: np.ndarray | None = None
    group_size: int = 0

    def channel_shape(self) -> tuple[int, ...]:
        """Shape that broadcasts a per-channel vector against the stored weight."""
        shape = [1] * len(self.layer.shape)
        shape[self.layer.channel_axis] = -1
        return tuple(shape)

    def per_weight(self, values: np.ndarray) -> np.ndarray:
        """Per-channel (O,) or per-group (O, n) values broadcast against the stored weight."""
        if not self.group_size:
            return values.reshape(self.channel_shape())
        layer = self.layer
        m = np.repeat(values.reshape(layer.groups, layer.rows, -1), self.group_size, axis=-1)[..., :layer.cols]
        return from_matrix(layer, m)

    def stored_scale(self) -> np.ndarray:
        """The scale as the model stores it: in the weight's dtype (DequantizeLinear's output type)."""
        return self.scale.astype(self.layer.dtype)

    def weight(self) -> np.ndarray:
        """The dequantized weight in the layer's dtype, computed as DequantizeLinear does
        (in float32 for a float32 or float16 weight, then rounded to the weight's dtype)."""
        work = np.float64 if np.dtype(self.layer.dtype) == np.float64 else np.float32
        diff = (self.codes - self.per_weight(self.zero)).astype(work)
        return (diff * self.per_weight(self.stored_scale().astype(work))).astype(self.layer.dtype)


@dataclass(frozen=True)
class LayerStats:
    """Per-layer figures for the report (errors are ||WX-QX||^2/||WX||^2 from the Hessian).

    ``stacked`` is how many layers were solved together with it (1: alone); ``seconds`` is
    then its share of their solve time. ``group_size`` is its grid's (0: one scale per channel).
    """

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
    stacked: int = 1
    group_size: int = 0

    @property
    def rank_deficient(self) -> bool:
        """Its Hessian came from fewer rows of X than it has inputs (Hessian methods only)."""
        return self.rows is not None and self.rows < self.cols


def working_dtype(precision: str, xp):
    """float64 on the CPU and float32 on a GPU unless the user chose."""
    if precision == "auto":
        return xp.float32 if is_cupy(xp) else xp.float64
    return getattr(xp, precision)


# On a GPU, layers whose groups have the same (rows, cols) are solved as one stack of groups
# when their columns are this few: the solvers treat groups independently, so each layer gets
# what it would get alone, and the GPU pays each operation's launch once per stack instead
# of once per layer. Larger layers are dominated by their own O(C^3) work.
STACK_MAX_COLS = 1024
# The stacked weights and Hessians, in the working dtype; the solver holds several temporaries
# of this size.
STACK_MAX_BYTES = 64 << 20


def stack_budget(xp) -> int:
    """Bytes a stack may hold: STACK_MAX_BYTES on a GPU, 0 (every layer alone) on the CPU,
    where stacking saved no time and its temporaries raised the peak memory."""
    return STACK_MAX_BYTES if is_cupy(xp) else 0


def plan_stacks(layers: list[Layer], has_hessian: list[bool], itemsize: int, max_bytes: int,
                grids: list | None = None) -> list[list[int]]:
    """Group layer indices into stacks to solve together, each in graph order.

    Layers join the open stack of their (rows, cols, has_hessian, grid) while the stack's
    weights and Hessians fit in ``max_bytes``; layers wider than STACK_MAX_COLS stay alone.
    ``grids`` gives each layer's grid (a GridSpec, or anything comparable: its bit width).
    """
    stacks: list[list[int]] = []
    open_stack: dict[tuple, tuple[list[int], int]] = {}
    for i, (layer, has_h) in enumerate(zip(layers, has_hessian)):
        size = layer.groups * (layer.rows + layer.cols) * layer.cols * itemsize
        key = (layer.rows, layer.cols, has_h, None if grids is None else grids[i])
        members, used = open_stack.get(key, (None, 0))
        if layer.cols > STACK_MAX_COLS or members is None or used + size > max_bytes:
            members, used = [], 0
            stacks.append(members)
        members.append(i)
        open_stack[key] = (members, used + size)
    return stacks


def solve_layer(layer: Layer, w: np.ndarray, H, cfg: SolveConfig, xp,
                rows: int | None = None) -> tuple[QuantizedLayer, LayerStats]:
    """Quantize one layer (see solve_stack)."""
    return solve_stack([layer], [w], [H], cfg, xp, [rows])[0]


# The report's layer errors come from three (R, C) x (C, C) products per layer, as costly as
# the solve's sweep, and are float32 products on every device. On the 2-core machine one took
# 7.8 s in float64 against 4.0 s in float32 for a 4096 x 9216 layer (AlexNet's first FC), and
# the float32 errors of FastOBQ-solved 512 x 2048 layers were within 1.5e-6 (relative) of the
# float64 ones, also with an H of rank 64 and errors of 4.8e-5 (W4) and 2.1e-7 (W8). On
# ResNet-50 (W4, 64 random images) the 54 layers' errors moved by at most 1.1e-5 of themselves.
REPORT_DTYPE = np.float32


def solve_stack(layers: list[Layer], weights: list[np.ndarray], hessians: list, cfg: SolveConfig, xp,
                rows: list[int | None]) -> list[tuple[QuantizedLayer, LayerStats]]:
    """Quantize layers whose groups share one (rows, cols) shape, as one stack of groups.

    Args:
        layers: the layers.
        weights: their stored float weights (NumPy).
        hessians: their Hessians (G, C, C) on ``xp``, or all None when there is no calibration data.
        cfg: solver settings.
        xp: numpy or cupy.
        rows: how many rows of X (samples times output positions) built each H, for the report.

    Returns:
        A (QuantizedLayer, LayerStats) per layer. Each layer's seconds are its share (by groups)
        of the stack's solve time.
    """
    method = METHODS[cfg.method]
    dtype = working_dtype(cfg.precision, xp)
    W = _stack([to_matrix(l, w) for l, w in zip(layers, weights)], dtype, xp)
    Hw = None if hessians[0] is None else _stack(hessians, dtype, xp)
    bad_input = Hw is not None and not bool(xp.isfinite(Hw).all())
    if bad_input and len(layers) > 1:   # find which: each alone
        return [out for i in range(len(layers))
                for out in solve_stack(layers[i:i + 1], weights[i:i + 1], hessians[i:i + 1], cfg, xp, rows[i:i + 1])]
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
    if Hw is not None:       # the report's errors, in float32 (see REPORT_DTYPE), H cast once
        diffs = (lambda: W, lambda: W - res.Q, lambda: W - METHODS["rtn"].solve(W, None, grid, xp=xp).Q)
        with np.errstate(over="ignore", invalid="ignore"):
            H32 = Hw.astype(REPORT_DTYPE, copy=False)
            figures = [weighted_norms(d().astype(REPORT_DTYPE, copy=False), H32, xp) for d in diffs]
            if not all(np.isfinite(f).all() for f in figures):   # past float32's range: in H's own dtype
                figures = [weighted_norms(d(), Hw, xp) for d in diffs]
        den, num, rtn_num = figures
    codes, scale, zero = to_numpy(res.codes), to_numpy(res.scale), to_numpy(res.zero)
    B = grid.group_size
    if B:       # per column, equal within each group: one per group
        scale, zero = scale[..., ::B], zero[..., ::B]
    out, g0, total = [], 0, W.shape[0]
    for layer, n_rows in zip(layers, rows):
        g = slice(g0, g0 + layer.groups)
        g0 += layer.groups
        name, note = method.name, ""
        if bad_input:
            note = ("NaN or Inf in its calibration inputs: rounded to nearest; check the calibration data "
                    "and the layers before it")
        elif res.fallback[g].any():
            name = f"{cfg.method}+rtn"
            note = (f"Cholesky failed in {int(res.fallback[g].sum())}/{layer.groups} group(s) even with "
                    "more damping: rounded to nearest there; raise --damp")
        lam = res.damp[g][np.isfinite(res.damp[g])]
        q = QuantizedLayer(layer=layer,
                           codes=from_matrix(layer, codes[g]).astype(np.int32),
                           scale=_channels(scale[g], B).astype(np.float64),
                           zero=_channels(zero[g], B).astype(np.int32),
                           qmin=grid.qmin, qmax=grid.qmax, bits=cfg.grid.bits, group_size=B)
        stats = LayerStats(layer.name, layer.op, layer.shape, layer.groups, cfg.grid.bits, name,
                           None if Hw is None else relative_error(num[g], den[g]),
                           None if Hw is None else relative_error(rtn_num[g], den[g]),
                           seconds * layer.groups / total, float(lam.max()) if lam.size else None, layer.cols,
                           n_rows if method.uses_hessian else None, note, stacked=len(layers),
                           group_size=cfg.grid.group_size)
        out.append((q, stats))
    return out


def _channels(a: np.ndarray, group_size: int) -> np.ndarray:
    """A layer's grid values (G, R) as (O,), or (G, R, n) per group of columns as (O, n)."""
    return a.reshape(-1, a.shape[-1]) if group_size else a.reshape(-1)


def _stack(arrays: list, dtype, xp):
    """Concatenate (G, ., .) arrays along the groups into one on ``xp`` (no copy for a single one)."""
    if len(arrays) == 1:
        return xp.asarray(arrays[0], dtype=dtype)
    return xp.concatenate([xp.asarray(a, dtype=dtype) for a in arrays])
