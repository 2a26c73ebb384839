#!/usr/bin/env python
"""Layer error of exact OBQ against FastOBQ and GPTQ on a synthetic correlated problem.

Prints each method's ||WX-QX||^2 relative to round-to-nearest's, for the symmetric and the
asymmetric 4-bit grid, and exact OBQ's also without OBC's rule for weights pushed off the
grid. Used in the README's limitations (exact OBQ on real layers).

    python scripts/obq_vs_fastobq.py [--rows 32] [--cols 128] [--seed 0]
"""
from __future__ import annotations

import argparse
import inspect

import numpy as np

import onnxobq.solvers.obq as obq_module
from onnxobq.quant import GridSpec, fit_grid
from onnxobq.solvers import METHODS, layer_error


def obq_without_offgrid_rule():
    """obq_rows with the off-grid rule removed (a copy of its source, one line dropped)."""
    src = inspect.getsource(obq_module.obq_rows)
    rule = "p = xp.where(off_grid, xp.argmax(sq, axis=1), p)"
    assert rule in src, "obq_rows changed: update this script"
    namespace: dict = {}
    exec(src.replace(rule, "pass"), obq_module.__dict__, namespace)
    return namespace["obq_rows"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--cols", type=int, default=128)
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    r = np.random.default_rng(args.seed)
    C = args.cols
    mix = np.eye(C) + 1.5 * r.standard_normal((C, C)) / np.sqrt(C)
    X = mix @ r.standard_normal((C, args.samples))
    H = (2 * X @ X.T / args.samples)[None]
    W = r.standard_normal((1, args.rows, C))
    for symmetric in (True, False):
        grid = fit_grid(W, GridSpec(bits=4, symmetric=symmetric))
        rtn = layer_error(W, METHODS["rtn"].solve(W, None, grid).Q, H, np)
        out = {}
        for m in ("fastobq", "gptq", "obq"):
            kwargs = {} if m == "obq" else dict(order=METHODS[m].default_order)
            out[m] = layer_error(W, METHODS[m].solve(W, H, grid, **kwargs).Q, H, np) / rtn
        original, obq_module.obq_rows = obq_module.obq_rows, obq_without_offgrid_rule()
        try:
            out["obq without the off-grid rule"] = layer_error(W, METHODS["obq"].solve(W, H, grid).Q, H, np) / rtn
        finally:
            obq_module.obq_rows = original
        print(("symmetric " if symmetric else "asymmetric") + " grid, error / RTN error: "
              + ", ".join(f"{k} {v:.3f}" for k, v in out.items()))


if __name__ == "__main__":
    main()
