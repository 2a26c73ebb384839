#!/usr/bin/env python
"""Solver speed, given the Hessians: a scaling table and the ResNet-50 layer set.

Only the solver is timed (``onnxobq.solvers.METHODS[m].solve`` on arrays already
on the device, with a device synchronisation before and after), not the capture.
Each problem is a weight W (G, R, C) ~ N(0, 1) and a Hessian H = 2 Z Z^T / (2C) of
Gaussian Z (C x 2C) with correlated rows; the solvers' cost depends only on the
shapes; W and H are in the working dtype (``--precision``). Every timing is the best of
``--repeat`` after one warm-up run of the shape; with ``--repeat 0`` the one timed run
follows a warm-up on the first 8 rows.

Nominal work, for the effective GFLOP/s column (flops = 2 x multiply-adds):

* fastobq: (4/3) C^3 (two Cholesky factorisations and two triangular inverses) + R C^2
  (the sweep); gptq: (2/3) C^3 + R C^2 (it needs no diag(H^-1));
* obq: (4/3) C^3 + (2/3) R C^3 (each row downdates its own C x C inverse C times).

A scaling table (``--cols``/``--rows``) is followed, for FastOBQ and GPTQ, by the fitted
model seconds = F / rate_F + R C^2 / rate_S + d R C + fixed, with F the C^3 term above, each
cell's measured time beside the model's, and the share of the model's time in the expected
O(C^3 + R C^2) terms (``fit_cost_model``).

Exact OBQ processes rows in batches (``onnxobq.solvers.obq.row_batch``: as many
inverse-Hessian copies as ``ROW_BATCH_BYTES`` holds). Here it solves whole batches holding at least
``--obq-rows`` rows of each problem, and its time is scaled by the number of batches
the full problem needs (rows are independent, and batches run one after another).
Lines so extrapolated are marked ``*``.

Examples::

    python scripts/solve_bench.py --device cpu --cols 256,512,1024 --rows 256,1024
    python scripts/solve_bench.py --device cuda --cols 256,512,1024,2048,4096,8192 --rows 256,1024,4096
    python scripts/solve_bench.py --device cuda --resnet50 --methods fastobq,gptq,obq --obq-per-shape
    python scripts/solve_bench.py --device cuda --resnet50 --methods fastobq,gptq --stacked
    python scripts/solve_bench.py --device cpu --model paraphrase-MiniLM-L3-v2.onnx --methods fastobq,obq
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def problem(G: int, R: int, C: int, xp, dtype, seed: int = 0):
    """W (G, R, C) and H (G, C, C) on ``xp``, built on the device."""
    rs = xp.random.RandomState(seed)
    W = rs.standard_normal((G, R, C)).astype(dtype)
    Z = rs.standard_normal((G, C, 2 * C)).astype(dtype)
    mix = (xp.eye(C) + 0.3 * rs.standard_normal((C, C)) / np.sqrt(C)).astype(dtype)
    Z = mix @ Z
    H = (Z @ xp.swapaxes(Z, 1, 2) / C).astype(dtype)    # 2 Z Z^T / N with N = 2C samples
    return W, H


def nominal_flops(method: str, G: int, R: int, C: int) -> float:
    base = G * (4 / 3) * C ** 3
    if method == "obq":
        return base + G * (2 / 3) * R * C ** 3
    if method == "rtn":
        return 0.0
    if method == "gptq":
        base /= 2
    return base + G * R * C ** 2


def fit_cost_model(method: str, cells: list[tuple[int, int, float]]) -> tuple[float, float, float, float]:
    """Fit seconds = a F + b S + d R C + c over a scaling table's cells (R, C, seconds).

    F is the factorisations' nominal flops ((4/3) C^3 for FastOBQ, (2/3) C^3 for GPTQ) and S
    the sweep's (R C^2): the expected O(C^3 + R C^2). R C counts the per-column work (each
    column's rounding and its update of the rest of its inner block, R x INNER_BLOCK / 2
    elements), which O() drops but which is memory-bound; c is a fixed cost per solve
    (launches, Python). The fit minimises the squared relative error with every coefficient
    >= 0 (each subset of the four terms is fitted, and the best one with no negative
    coefficient kept). Returns (a, b, d, c): 1/a and 1/b are the effective flop rates of the
    two O() parts, d the seconds per weight of the per-column work, c seconds.
    """
    import itertools

    factor = nominal_flops(method, 1, 0, 1)           # (4/3) or (2/3): the C^3 coefficient
    X = np.array([[factor * C ** 3, R * C ** 2, R * C, 1.0] for R, C, _ in cells])
    t = np.array([sec for _, _, sec in cells])
    best, best_err = (0.0, 0.0, 0.0, float(t.mean())), np.inf
    for k in (4, 3, 2, 1):
        for cols in itertools.combinations(range(4), k):
            A = X[:, cols] / t[:, None]                    # relative residuals: rows scaled by 1/t
            coef = np.linalg.lstsq(A, np.ones(len(t)), rcond=None)[0]
            if (coef < 0).any():
                continue
            err = float(((A @ coef - 1) ** 2).sum())
            if err < best_err - 1e-12:
                full = np.zeros(4)
                full[list(cols)] = coef
                best, best_err = tuple(float(v) for v in full), err
    return best


def model_seconds(method: str, fit: tuple, R: int, C: int) -> tuple[float, float]:
    """The fitted model's seconds for one (R, C) problem, and its share in the O() terms."""
    a, b, d, c = fit
    expected = a * nominal_flops(method, 1, 0, C) + b * R * C ** 2
    total = expected + d * R * C + c
    return total, expected / total


def print_cost_model(records: list[dict], methods: list[str]) -> dict:
    """Beside each scaling-table cell, the time the fitted cost model gives it."""
    fits = {}
    for m in methods:
        if m not in ("fastobq", "gptq"):
            continue
        rows = [r for r in records if r["method"] == m]
        fit = fit_cost_model(m, [(r["R"], r["C"], r["seconds"]) for r in rows])
        a, b, d, c = fit
        fits[m] = dict(factor_s_per_flop=a, sweep_s_per_flop=b, per_weight_s=d, fixed_s=c)
        rate = lambda k: f"{1 / k / 1e9:.1f} GFLOP/s" if k > 0 else "not resolved"  # noqa: E731
        print(f"{m}: seconds = F / ({rate(a)}) + R C^2 / ({rate(b)}) + R C x {d * 1e9:.2f} ns "
              f"+ {c * 1e3:.2f} ms, F = {'(4/3)' if m == 'fastobq' else '(2/3)'} C^3")
        print(f"{'R':>6} {'C':>6} {'measured s':>11} {'model s':>10} {'ratio':>6} {'O() share':>9}")
        for r in rows:
            model, share = model_seconds(m, fit, r["R"], r["C"])
            r["model_seconds"] = model
            print(f"{r['R']:>6} {r['C']:>6} {r['seconds']:>11.4f} {model:>10.4f} {r['seconds'] / model:>6.2f} "
                  f"{share:>9.2f}")
    return fits


def obq_sample_rows(R: int, C: int, itemsize: int, want: int, xp) -> int:
    """Rows of a problem that exact OBQ solves for timing: whole row batches of the
    solver (``obq.row_batch``), at least ``want`` rows, at most R."""
    import math
    from onnxobq.solvers.obq import row_batch

    batch = row_batch(R, C, itemsize, xp)
    return min(R, batch * math.ceil(want / batch))


def time_solve(method: str, W, H, xp, repeat: int, obq_rows: int, group_size: int = 0) -> tuple[float, int]:
    """Best-of-``repeat`` seconds for one solve scaled to all rows, and the rows actually solved.

    Exact OBQ solves whole row batches of ``obq_sample_rows`` rows; its time is scaled by
    the number of row batches of the full problem over those solved.
    """
    import math
    from onnxobq.backend import choose_device, is_cupy, synchronize
    from onnxobq.quant import GridSpec, fit_grid
    from onnxobq.solvers import METHODS
    from onnxobq.solvers.obq import row_batch

    G, R, C = W.shape
    rows, factor = R, 1.0
    if method == "obq":
        rows = obq_sample_rows(R, C, W.dtype.itemsize, obq_rows, xp)
        batch = row_batch(R, C, W.dtype.itemsize, xp)
        factor = math.ceil(R / batch) / math.ceil(rows / batch)
        W = W[:, :rows].copy()
    spec = GridSpec(bits=4, group_size=group_size if group_size < C else 0)   # as onnxobq quantize
    grid = fit_grid(W, spec, xp)
    solver = METHODS[method]
    # as onnxobq quantize solves on that device: the sweep's CUDA kernel where the device allows it
    kwargs = {} if method == "rtn" else dict(order=solver.default_order, kernel=choose_device(
        "cuda" if is_cupy(xp) else "cpu").sweep_kernel)
    if repeat == 0:
        # One cheap run on a few rows first, for CuPy's kernel compilation: without it, three
        # ResNet-50 shapes took 6.5 to 6.7 s of exact OBQ on a fresh GPU machine, against
        # 0.2 to 0.4 s for shapes beside them with more work.
        few = W[:, :min(8, R)].copy()
        solver.solve(few, None if method == "rtn" else H, fit_grid(few, spec, xp), xp=xp, **kwargs)
    best = np.inf
    for i in range(repeat + 1):                 # the first run warms up (kernel compilation)
        synchronize(xp)
        t = time.perf_counter()
        solver.solve(W, None if method == "rtn" else H, grid, xp=xp, **kwargs)
        synchronize(xp)
        if i > 0 or repeat == 0:
            best = min(best, time.perf_counter() - t)
    return best * factor, rows


def resnet50_layers() -> list:
    """The layers of the speed benchmark's random ResNet-50."""
    from speed_bench import resnet50

    return model_layers(resnet50(0))


def model_layers(model) -> list:
    """The layers onnxobq quantize finds in ``model`` (a ModelProto or a path)."""
    import onnx
    import onnx_graphsurgeon as gs
    from onnxobq.graph import scan_layers

    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(model, load_external_data=False)   # only the shapes are needed
    return scan_layers(gs.import_onnx(model)).layers


def time_stacks(layers: list, methods: list[str], xp, dtype: str, repeat: int, group_size: int = 0) -> tuple[dict, int]:
    """Seconds per method to solve ``layers`` as ``onnxobq quantize`` groups them on a GPU
    (``solve.plan_stacks``: same-shaped small layers as one stack), and the number of stacks."""
    from onnxobq.backend import Tuning
    from onnxobq.solve import plan_stacks

    plan = plan_stacks(layers, [True] * len(layers), np.dtype(dtype).itemsize, Tuning.stack_max_bytes)
    totals = {m: 0.0 for m in methods}
    for stack in plan:
        first = layers[stack[0]]
        W, H = problem(sum(layers[i].groups for i in stack), first.rows, first.cols, xp, dtype)
        for m in methods:
            totals[m] += time_solve(m, W, H, xp, repeat, first.rows, group_size)[0]
        del W, H
    return totals, len(plan)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="examples:\n" + __doc__.split("Examples::\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--methods", default="fastobq,gptq,obq")
    p.add_argument("--cols", default="256,512,1024")
    p.add_argument("--rows", default="256,1024")
    p.add_argument("--resnet50", action="store_true", help="time every ResNet-50 layer shape instead")
    p.add_argument("--model", type=Path, help="time every layer shape of this ONNX model instead")
    p.add_argument("--layers", help="with --resnet50 or --model: only these comma-separated layers (e.g. n143,n155)")
    p.add_argument("--stacked", action="store_true",
                   help="with --resnet50: also time the layers in the stacks onnxobq quantize solves them in "
                        "on a GPU (same-shaped small layers together; exact OBQ is left out)")
    p.add_argument("--precision", choices=("float32", "float64"), default=None,
                   help="default: float64 on the CPU, float32 on the GPU (as onnxobq quantize)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--obq-rows", type=int, default=32, help="rows exact OBQ solves before scaling (default 32)")
    p.add_argument("--obq-per-shape", action="store_true",
                   help="time exact OBQ once per layer shape (G, R, C) and count that time for every "
                        "layer of the shape (its work does not depend on the values)")
    p.add_argument("--gpu-recursive-min-cols", type=float, default=None,
                   help="set onnxobq.solvers.common.GPU_RECURSIVE_MIN_COLS: on CuPy, layers of at least "
                        "this many columns build their inverse Cholesky factors by halves in matrix "
                        "products (default: the package's value)")
    p.add_argument("--group-size", type=int, default=0,
                   help="W4 grids with one scale per this many columns (default 0: per row), as --group-size")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)

    from onnxobq.backend import choose_device
    from onnxobq.solvers import common
    if args.gpu_recursive_min_cols is not None:
        common.GPU_RECURSIVE_MIN_COLS = args.gpu_recursive_min_cols
    xp = choose_device(args.device).xp
    dtype = args.precision or ("float32" if args.device == "cuda" else "float64")
    methods = args.methods.split(",")
    layers = []
    if args.resnet50 or args.model:
        layers = resnet50_layers() if args.resnet50 else model_layers(args.model)
        if args.layers:
            wanted = set(args.layers.split(","))
            layers = [l for l in layers if l.name in wanted]
        shapes = [(l.name, l.groups, l.rows, l.cols) for l in layers]
    else:
        shapes = [(f"R{r}xC{c}", 1, int(r), int(c)) for c in args.cols.split(",") for r in args.rows.split(",")]
    device = args.device
    if xp.__name__ == "cupy":
        props = xp.cuda.runtime.getDeviceProperties(0)
        device = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    print(f"device {device}, {dtype}, best of {args.repeat}, GPU_RECURSIVE_MIN_COLS {common.GPU_RECURSIVE_MIN_COLS:g}"
          + (f", groups of {args.group_size}" if args.group_size else ""))
    print(f"{'problem':>22} {'G':>4} {'R':>5} {'C':>5} " + " ".join(f"{m + ' s':>12} {'GF/s':>7}" for m in methods))
    records, totals, per_shape = [], {m: 0.0 for m in methods}, {}
    for name, G, R, C in shapes:
        W, H = problem(G, R, C, xp, dtype)
        cells = []
        for m in methods:
            reused = m == "obq" and args.obq_per_shape and (m, G, R, C) in per_shape
            if not reused:
                per_shape[m, G, R, C] = time_solve(m, W, H, xp, args.repeat, args.obq_rows, args.group_size)
            scaled, rows = per_shape[m, G, R, C]
            totals[m] += scaled
            gf = nominal_flops(m, G, R, C) / scaled / 1e9 if scaled > 0 else 0.0
            mark = "=" if reused else ("*" if rows < R else " ")
            cells.append(f"{scaled:>11.4f}{mark} {gf:>7.1f}")
            records.append(dict(problem=name, G=G, R=R, C=C, method=m, seconds=scaled, solved_rows=rows,
                                extrapolated=rows < R, same_shape_as_earlier=reused,
                                nominal_tflops=nominal_flops(m, G, R, C) / 1e12))
        print(f"{name:>22} {G:>4} {R:>5} {C:>5} " + " ".join(cells), flush=True)
        del W, H
    print("total: " + ", ".join(f"{m} {totals[m]:.3f} s" for m in methods))
    if "fastobq" in totals and totals["fastobq"] > 0:
        print("ratio to fastobq: " + ", ".join(f"{m} {totals[m] / totals['fastobq']:.1f}x" for m in methods))
    stacked = None
    if args.stacked and layers:
        stack_methods = [m for m in methods if m != "obq"]
        stacked, count = time_stacks(layers, stack_methods, xp, dtype, args.repeat, args.group_size)
        print(f"stacked as onnxobq quantize solves them on a GPU ({count} solves for {len(layers)} layers): "
              + ", ".join(f"{m} {stacked[m]:.3f} s ({totals[m] / stacked[m]:.2f}x faster than one by one)"
                          for m in stack_methods))
    fits = None
    if not layers and len(shapes) >= 3:
        fits = print_cost_model(records, methods)
    if any(r["extrapolated"] for r in records):
        print("* exact OBQ solved only some of the rows (whole row batches, at least "
              f"{args.obq_rows}); its time is scaled by the number of row batches")
    if any(r["same_shape_as_earlier"] for r in records):
        print("= exact OBQ's time for an earlier layer of the same shape (--obq-per-shape)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(device=device, dtype=dtype, platform=platform.platform(),
                                             gpu_recursive_min_cols=None if np.isinf(common.GPU_RECURSIVE_MIN_COLS)
                                             else common.GPU_RECURSIVE_MIN_COLS,
                                             argv=sys.argv, records=records, totals=totals,
                                             stacked_totals=stacked, cost_model=fits), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
