#!/usr/bin/env python
"""Layer error of exact OBQ against FastOBQ and GPTQ, on a synthetic problem or on real layers.

Prints each method's ||WX-QX||^2 relative to round-to-nearest's, and exact OBQ's also
without OBC's rule for weights pushed off the grid. On a synthetic correlated problem it
uses the symmetric and the asymmetric 4-bit grid; on real layers, the Hessians saved by
``onnxobq quantize --save-hessians`` and the symmetric grid of ``--bits``. Used in the
README's limitations (exact OBQ on real layers).

    python scripts/obq_vs_fastobq.py [--rows 32] [--cols 128] [--seed 0]
    python scripts/obq_vs_fastobq.py --model M.onnx --hessians H.npz --layers Conv.8,Conv.14 [--bits 4]
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


def error_ratios(W, H, grid, orders=()) -> dict[str, float]:
    """Each method's layer error over round-to-nearest's (and FastOBQ's with extra ``orders``)."""
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
    for order in orders:
        out[f"fastobq {order}"] = layer_error(W, METHODS["fastobq"].solve(W, H, grid, order=order).Q, H, np) / rtn
    return out


def real_layers(args) -> None:
    import onnx_graphsurgeon as gs

    from onnxobq.graph import load_model, scan_layers
    from onnxobq.hessians import from_file, model_digest
    from onnxobq.types import to_matrix

    scan = scan_layers(gs.import_onnx(load_model(args.model)))
    wanted = args.layers.split(",")
    layers = [l for l in scan.layers if l.name in wanted]
    missing = set(wanted) - {l.name for l in layers}
    if missing:
        raise SystemExit(f"obq_vs_fastobq.py: error: --layers: {', '.join(sorted(missing))} not in {args.model}")
    captured = from_file(args.hessians, layers, model_digest(args.model), args.model, None, np)
    for layer in layers:
        W = to_matrix(layer, scan.weights[layer.name]).astype(np.float64)
        H = captured.hessians[layer.hessian_key].astype(np.float64)
        out = error_ratios(W, H, fit_grid(W, GridSpec(bits=args.bits)), ("sensi_asc",))
        print(f"{layer.name} ({layer.rows} x {layer.cols}, groups {layer.groups}), W{args.bits} error / RTN error: "
              + ", ".join(f"{k} {v:.3f}" for k, v in out.items()), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--cols", type=int, default=128)
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", help="a real model: with --hessians and --layers")
    p.add_argument("--hessians", help="its Hessians, saved by onnxobq quantize --save-hessians")
    p.add_argument("--layers", help="comma-separated layer names (onnxobq inspect lists them)")
    p.add_argument("--bits", type=int, default=4)
    args = p.parse_args()
    if args.model:
        return real_layers(args)
    r = np.random.default_rng(args.seed)
    C = args.cols
    mix = np.eye(C) + 1.5 * r.standard_normal((C, C)) / np.sqrt(C)
    X = mix @ r.standard_normal((C, args.samples))
    H = (2 * X @ X.T / args.samples)[None]
    W = r.standard_normal((1, args.rows, C))
    for symmetric in (True, False):
        out = error_ratios(W, H, fit_grid(W, GridSpec(bits=4, symmetric=symmetric)))
        print(("symmetric " if symmetric else "asymmetric") + " grid, error / RTN error: "
              + ", ".join(f"{k} {v:.3f}" for k, v in out.items()))


if __name__ == "__main__":
    main()
