#!/usr/bin/env python
"""How far BatchNorm re-estimation's per-channel variances are from float64 moments.

Runs the float model on a few inputs, exposes every Conv output, and compares each
channel's variance from ``bn.stats.Moments.of`` (two passes: the mean, then the deviations) and
from one-pass sums of squares (E[x^2] - E[x]^2 from float32 runs, as onnxobq once summed them)
against float64 moments of the same arrays. Prints the largest |mean| / std of
any channel and the largest relative error of either method.

Examples::

    python scripts/bn_moments_check.py PATH/common_det.onnx --random 1x3x416x416
    python scripts/bn_moments_check.py PATH/ch_PP-OCRv4_rec_infer.onnx --calib calib.npz --samples 8
"""
from __future__ import annotations

import argparse

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxobq.backend import Tuning
from onnxobq.bn.stats import Moments
from onnxobq.graph import scan_layers
from onnxobq.runtime import run, session

SQUARES_RUN = Tuning.squares_run


def one_pass_variance(a: np.ndarray) -> np.ndarray:
    """Per-channel variance as sums of squares minus the squared mean (float32 runs, float64 sums)."""
    r = a.reshape(a.shape[0], a.shape[1], -1)
    n = a.size // a.shape[1]
    total = r.sum(axis=2).sum(axis=0, dtype=np.float64)
    squares = np.zeros(a.shape[1])
    for i in range(0, r.shape[2], SQUARES_RUN):
        part = r[:, :, i:i + SQUARES_RUN]
        squares += np.einsum("ncm,ncm->c", part, part)
    mean = total / n
    return np.maximum(squares / n - mean ** 2, 0.0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("--random", help="NxCxHxW: one batch of uniform [0, 1) inputs (seed 0)")
    p.add_argument("--calib", help=".npz with one array per model input")
    p.add_argument("--samples", type=int, default=8, help="samples of --calib (default 8)")
    args = p.parse_args()
    model = onnx.load(args.model)
    name = model.graph.input[0].name
    if args.calib:
        x = np.load(args.calib)[name][:args.samples]
    else:
        x = np.random.default_rng(0).random(tuple(int(d) for d in args.random.split("x")), np.float32)
    convs = {layer.output: onnx.TensorProto.FLOAT for layer in scan_layers(gs.import_onnx(model)).layers
             if layer.op == "Conv"}
    got = run(session(model, convs), list(convs), {name: x})
    ratio = err_one = err_two = 0.0
    for a in got.values():
        a64 = a.astype(np.float64)
        axes = (0,) + tuple(range(2, a.ndim))
        var, mean = a64.var(axis=axes), a64.mean(axis=axes)
        live = var > 1e-12
        if not live.any():
            continue
        ratio = max(ratio, float((np.abs(mean[live]) / np.sqrt(var[live])).max()))
        err_one = max(err_one, float((np.abs(one_pass_variance(a) - var)[live] / var[live]).max()))
        err_two = max(err_two, float((np.abs(Moments.of(a).var() - var)[live] / var[live]).max()))
    print(f"{len(got)} conv outputs, {x.shape[0]} samples: largest |mean|/std {ratio:.1f}; "
          f"largest relative variance error: one pass {err_one:.3g}, two passes {err_two:.3g}")


if __name__ == "__main__":
    main()
