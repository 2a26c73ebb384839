"""The solve stage: each layer's stored weight and Hessian in, its quantized form out.

solve_all maps the layers (or stacks of same-shaped ones) to solutions on Device.workers
threads, the costliest first; solve_stack is the seam between the graph's layout (Layer) and
the pure solvers, which see only (G, R, C) stacks. No onnx here.
"""
from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, replace

import numpy as np

from .backend import Device, Tuning, available_bytes, synchronize, to_numpy
from .config import QuantizeConfig, SolveConfig
from .errors import option
from .quant import fit_grid
from .selection import layer_grid
from .solvers import METHODS
from .solvers.common import relative_error, weighted_norms
from .solvers.sweep import layer_order
from .threads import LayerWorkers
from .types import Captured, Layer, LayerScan, LayerStats, QuantizedLayer, from_matrix, to_matrix


def solve_all(scan: LayerScan, captured: Captured, cfg: QuantizeConfig, device: Device, progress=None):
    """Solve every layer, on a GPU same-shaped small layers as one stack (plan_stacks); free
    each Hessian after its last layer (from ``captured.hessians``, which the run owns). Returns the
    QuantizedLayers and LayerStats in graph order.

    On NumPy the stacks go to one thread per core, the costliest first, BLAS on one thread each
    (see onnxobq.threads): on the 2-core machine the detector's 83 layers took 2.04 and 2.05 s
    this way against 2.51 and 2.63 s one after another on two BLAS threads, and ResNet-50's 54
    16.8 and 17.8 s against 21.7 and 22.5 s (FastOBQ from saved Hessians)."""
    layers, hessians = scan.layers, captured.hessians
    uses = Counter(layer.hessian_key for layer in layers)
    itemsize = np.dtype(device.solve_dtype).itemsize
    grids = [layer_grid(layer, cfg) for layer in layers]
    plan = plan_stacks(layers, [hessians.get(l.hessian_key) is not None for l in layers], itemsize,
                       device.stack_bytes, grids, device.tuning.stack_max_cols)
    results = [None] * len(layers)
    lock = threading.Lock()

    def solve(_key, stack, _tools):
        members = [layers[i] for i in stack]
        solved = solve_stack(members, [scan.weights[l.name] for l in members],
                             [hessians.get(l.hessian_key) for l in members],
                             replace(cfg.solve, grid=grids[stack[0]]), device,
                             [captured.rows.get(l.hessian_key) for l in members])
        with lock:
            for i, result in zip(stack, solved):
                results[i] = result
            for layer in members:
                uses[layer.hessian_key] -= 1
                if uses[layer.hessian_key] == 0:
                    hessians.pop(layer.hessian_key, None)
            if progress:
                progress.advance(len(stack))

    def cost(stack):                            # the factorisations and the sweep, every group
        return sum(layers[i].groups * (layers[i].cols ** 3 + layers[i].rows * layers[i].cols ** 2) for i in stack)

    if progress:
        progress.start("layers", len(layers))
    with LayerWorkers(min(device.workers, len(plan), _memory_workers(layers, plan, device))) as workers:
        workers.run([(n, stack, cost(stack)) for n, stack in enumerate(plan)], solve)
    if progress:
        progress.finish()
    return [q for q, _ in results], [s for _, s in results]




# A solve thread holds about this many times the part of a stack's rows it works on (in the
# solve's dtype) at once: one 200,000 x 256 layer in parts of 64 MB peaked at 2.7 times its float32
# weight, 527 MB (scripts/memory_bench.py --pieces), about 8 times a part beside its codes.
PART_WORKING_SET = 8


def _memory_workers(layers: list[Layer], plan: list[list[int]], device: Device) -> int:
    """How many threads may solve at once within half the memory available now, each holding
    the working set of the largest part of rows it may take (at least one thread)."""
    free = available_bytes()
    if free is None or device.gpu:
        return device.workers
    itemsize = np.dtype(device.solve_dtype).itemsize
    largest = 0
    for stack in plan:
        G = sum(layers[i].groups for i in stack)
        R, C = layers[stack[0]].rows, layers[stack[0]].cols
        part = _rows_per_part(G, R, C, itemsize, device.tuning) * G * C * itemsize
        largest = max(largest, PART_WORKING_SET * part + 3 * G * C * C * itemsize)
    return max(1, int(free // 2 // max(largest, 1)))


def _rows_per_part(G: int, R: int, C: int, itemsize: int, tuning: Tuning) -> int:
    """The rows of a (G, R, C) stack that the solve takes at once: Tuning.solve_rows_bytes, but at
    least four times H's own size (each part factorises H again, and that work grows with C)."""
    budget = max(tuning.solve_rows_bytes, 4 * G * C * C * itemsize)
    return max(1, min(R, budget // max(1, G * C * itemsize)))


def plan_stacks(layers: list[Layer], has_hessian: list[bool], itemsize: int, max_bytes: int,
                grids: list | None = None, max_cols: int = Tuning.stack_max_cols) -> list[list[int]]:
    """Group layer indices into stacks to solve together, each in graph order.

    Layers join the open stack of their (rows, cols, has_hessian, grid) while the stack's
    weights and Hessians fit in ``max_bytes`` (Device.stack_bytes: 0 on the CPU, where every
    layer goes alone); layers wider than ``max_cols`` (Tuning.stack_max_cols) stay alone: the
    solvers treat groups independently, so each layer gets what it would get alone, and a GPU
    pays each operation's launch once per stack, but larger layers are dominated by their own
    O(C^3) work.
    ``grids`` gives each layer's grid (a GridSpec, or anything comparable: its bit width).
    """
    stacks: list[list[int]] = []
    open_stack: dict[tuple, tuple[list[int], int]] = {}
    for i, (layer, has_h) in enumerate(zip(layers, has_hessian)):
        size = layer.groups * (layer.rows + layer.cols) * layer.cols * itemsize
        key = (layer.rows, layer.cols, has_h, None if grids is None else grids[i])
        members, used = open_stack.get(key, (None, 0))
        if layer.cols > max_cols or members is None or used + size > max_bytes:
            members, used = [], 0
            stacks.append(members)
        members.append(i)
        open_stack[key] = (members, used + size)
    return stacks


def solve_layer(layer: Layer, w: np.ndarray, H, cfg: SolveConfig, device: Device,
                rows: int | None = None) -> tuple[QuantizedLayer, LayerStats]:
    """Quantize one layer (see solve_stack)."""
    return solve_stack([layer], [w], [H], cfg, device, [rows])[0]


# The report's layer errors come from three (R, C) x (C, C) products per layer, as costly as
# the solve's sweep, and are float32 products on every device. On the 2-core machine one took
# 7.8 s in float64 against 4.0 s in float32 for a 4096 x 9216 layer (AlexNet's first FC), and
# the float32 errors of FastOBQ-solved 512 x 2048 layers were within 1.5e-6 (relative) of the
# float64 ones, also with an H of rank 64 and errors of 4.8e-5 (W4) and 2.1e-7 (W8). On
# ResNet-50 (W4, 64 random images) the 54 layers' errors moved by at most 1.1e-5 of themselves.
REPORT_DTYPE = np.float32


def solve_stack(layers: list[Layer], weights: list[np.ndarray], hessians: list, cfg: SolveConfig, device: Device,
                rows: list[int | None]) -> list[tuple[QuantizedLayer, LayerStats]]:
    """Quantize layers whose groups share one (rows, cols) shape, as one stack of groups.

    Args:
        layers: the layers.
        weights: their stored float weights (NumPy).
        hessians: their Hessians (G, C, C) on ``device.xp``, or all None when there is no calibration data.
        cfg: solver settings.
        device: where to solve, in Device.solve_dtype.
        rows: how many rows of X (samples times output positions) built each H, for the report.

    Returns:
        A (QuantizedLayer, LayerStats) per layer. Each layer's seconds are its share (by groups)
        of the stack's solve time.
    """
    method, xp = METHODS[cfg.method], device.xp
    dtype = device.solve_dtype
    mats = [to_matrix(l, w) for l, w in zip(layers, weights)]
    Hw = None if hessians[0] is None else _stack(hessians, dtype, xp)
    bad_input = Hw is not None and not bool(xp.isfinite(Hw).all())
    if bad_input and len(layers) > 1:   # find which: each alone
        return [out for i in range(len(layers))
                for out in solve_stack(layers[i:i + 1], weights[i:i + 1], hessians[i:i + 1], cfg, device, rows[i:i + 1])]
    if bad_input:  # NaN/Inf activations (e.g. from a layer upstream left in float): no usable H
        method, Hw = METHODS["rtn"], None
    parts = _solve_rows(mats, Hw, method, cfg, device)
    B = parts.group_size
    out, g0, total = [], 0, parts.codes.shape[0]
    for layer, n_rows in zip(layers, rows):
        g = slice(g0, g0 + layer.groups)
        g0 += layer.groups
        q = QuantizedLayer(layer=layer, codes=from_matrix(layer, parts.codes[g]),
                           scale=_channels(parts.scale[g], B).astype(np.float64),
                           zero=_channels(parts.zero[g], B).astype(np.int32),
                           qmin=parts.qmin, qmax=parts.qmax, bits=cfg.grid.bits, group_size=B)
        out.append((q, _stats(layer, g, parts, method, cfg, bad_input, parts.seconds * layer.groups / total,
                              n_rows, len(layers))))
    return out


@dataclass
class _Solved:
    """A stack's solution gathered over its parts of rows: codes (G, R, C) int16, the grid per row
    (G, R) or per group (G, R, n), damping and fallback per group, the error sums and the time."""

    codes: np.ndarray
    scale: np.ndarray
    zero: np.ndarray
    damp: np.ndarray
    fallback: np.ndarray
    figures: tuple | None
    seconds: float = 0.0
    qmin: int = 0
    qmax: int = 0
    group_size: int = 0


def _solve_rows(mats: list, Hw, method, cfg: SolveConfig, device: Device) -> _Solved:
    """Solve the stack of weight matrices ``mats`` (each (G_i, R, C)) a part of its rows at a time,
    within Tuning.solve_rows_bytes in the solve's dtype (each row's grid and rounding depend on
    H and that row alone)."""
    xp, dtype = device.xp, device.solve_dtype
    G, (R, C) = sum(m.shape[0] for m in mats), mats[0].shape[1:]
    step = _rows_per_part(G, R, C, np.dtype(dtype).itemsize, device.tuning)
    part = lambda r0: _stack([m[:, r0:r0 + step] for m in mats], dtype, xp)   # noqa: E731
    order, grids = cfg.order or method.default_order, {}
    if step < R and order and Hw is not None:       # an order that sums over rows is the whole layer's
        def parts():
            for r0 in range(0, R, step):
                W = part(r0)
                grid = fit_grid(W, cfg.grid, xp)
                if not grid.group_size:     # one scale per row: small, kept for the solve below
                    grids[r0] = grid
                yield W, grid
        order = layer_order(parts(), Hw, order, cfg.damp, xp)
    with np.errstate(over="ignore", invalid="ignore"):       # the report's errors, H cast once (see _error_sums)
        H32 = None if Hw is None else Hw.astype(REPORT_DTYPE, copy=False)
    out = None
    for r0 in range(0, R, step):
        W = part(r0)
        grid = grids.pop(r0, None) or fit_grid(W, cfg.grid, xp)
        synchronize(xp)
        start = time.perf_counter()
        if Hw is None:
            res = method.solve(W, None, grid, xp=xp)
        else:
            res = method.solve(W, Hw, grid, order=order, block=cfg.block, damp=cfg.damp, xp=xp,
                               kernel=device.sweep_kernel)
        synchronize(xp)
        seconds = time.perf_counter() - start
        figures = _error_sums(W, res.Q, Hw, H32, grid, xp) if Hw is not None else None
        scale, zero = to_numpy(res.scale), to_numpy(res.zero)
        if grid.group_size:       # per column, equal within each group: one per group
            scale, zero = scale[..., ::grid.group_size], zero[..., ::grid.group_size]
        if out is None:
            out = _Solved(np.empty((G, R, C), np.int16), np.empty((G, R) + scale.shape[2:], scale.dtype),
                          np.empty((G, R) + zero.shape[2:], zero.dtype), np.asarray(res.damp, np.float64),
                          np.asarray(res.fallback, bool), figures, 0.0, grid.qmin, grid.qmax, grid.group_size)
        else:
            with np.errstate(invalid="ignore"):
                out.damp = np.fmax(out.damp, res.damp)
            out.fallback = out.fallback | res.fallback
            out.figures = None if figures is None else tuple(a + b for a, b in zip(out.figures, figures))
        out.codes[:, r0:r0 + step] = to_numpy(res.codes)
        out.scale[:, r0:r0 + step], out.zero[:, r0:r0 + step] = scale, zero
        out.seconds += seconds
        del W, grid, res
    return out


def _error_sums(W, Q, Hw, H32, grid, xp) -> tuple:
    """The report's error sums per group: ||WX||^2, ||(W - Q)X||^2 and RTN's, from H, in float32
    (see REPORT_DTYPE; ``H32``: H cast to it); in H's own dtype where float32's range is too small."""
    diffs = (lambda: W, lambda: W - Q, lambda: W - METHODS["rtn"].solve(W, None, grid, xp=xp).Q)
    with np.errstate(over="ignore", invalid="ignore"):
        figures = [weighted_norms(d().astype(REPORT_DTYPE, copy=False), H32, xp) for d in diffs]
        if not all(np.isfinite(f).all() for f in figures):
            figures = [weighted_norms(d(), Hw, xp) for d in diffs]
    return tuple(figures)


def _stats(layer: Layer, g: slice, res, method, cfg: SolveConfig, bad_input: bool, seconds: float,
           rows: int | None, stacked: int) -> LayerStats:
    """One layer's figures from its groups ``g`` of a stack's result (_Solved)."""
    name, note = method.name, ""
    if bad_input:
        note = ("NaN or Inf in its calibration inputs: rounded to nearest; check the calibration data "
                "and the layers before it")
    elif res.fallback[g].any():
        name = f"{cfg.method}+rtn"
        note = (f"Cholesky failed in {int(res.fallback[g].sum())}/{layer.groups} group(s) even with "
                f"more damping: rounded to nearest there; raise {option('damp')}")
    lam = res.damp[g][np.isfinite(res.damp[g])]
    figures = res.figures
    den, num, rtn_num = figures if figures is not None else (None, None, None)
    return LayerStats(layer.name, layer.op, layer.shape, layer.groups, cfg.grid.bits, name,
                      None if figures is None else relative_error(num[g], den[g]),
                      None if figures is None else relative_error(rtn_num[g], den[g]),
                      seconds, float(lam.max()) if lam.size else None, layer.cols,
                      rows if method.uses_hessian else None, note, stacked=stacked, group_size=cfg.grid.group_size)


def _channels(a: np.ndarray, group_size: int) -> np.ndarray:
    """A layer's grid values (G, R) as (O,), or (G, R, n) per group of columns as (O, n)."""
    return a.reshape(-1, a.shape[-1]) if group_size else a.reshape(-1)


def _stack(arrays: list, dtype, xp):
    """Concatenate (G, ., .) arrays along the groups into one on ``xp`` (no copy for a single one)."""
    if len(arrays) == 1:
        return xp.asarray(arrays[0], dtype=dtype)
    return xp.concatenate([xp.asarray(a, dtype=dtype) for a in arrays])
