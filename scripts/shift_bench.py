#!/usr/bin/env python
"""Capture speed of one stride-1 3 x 3 conv: shifted products against im2col, on NumPy.

For each shape (channels, height = width, batch) the script times
``onnxobq.hessian.accumulate`` on random inputs with shifted products forced on and off
(alternating, best of ``--repeat``; each timing is the mean of calls over at least 0.3 s,
with the held-back columns multiplied at the end), and prints the time ratio beside the
cost ratio ``hessian.shifted.shift_cost`` predicts. ``shifts_pay`` uses shifted products where
that cost ratio is at most ``Tuning.shift_cost``. The sums use the gathers a real capture gives
the layer (``hessian.gather_columns``).

Examples::

    python scripts/shift_bench.py
    python scripts/shift_bench.py --shapes 96x52x1,512x7x8 --repeat 5
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from onnxobq.backend import Tuning, Uploader, choose_device
from onnxobq.hessian import HessianSum, Products, accumulate, gather_columns
from onnxobq.hessian.shifted import shift_cost
from onnxobq.types import ConvGeometry, Layer

SHAPES = "96x52x1,192x26x1,192x13x1,384x13x1,96x10x1,96x7x1,64x56x8,128x28x8,256x14x8,512x7x8,32x7x8,128x7x1"


def conv(channels: int) -> Layer:
    """A 3 x 3 conv of ``channels`` in and out, stride 1, padding 1."""
    geom = ConvGeometry((3, 3), (1, 1), (1, 1, 1, 1), (1, 1))
    return Layer(name="conv", op="Conv", weight="w", source="initializer", input="x", output="y",
                 shape=(channels, channels, 3, 3), dtype="float32", groups=1, rows=channels,
                 cols=channels * 9, conv=geom)


def seconds_per_call(layer: Layer, x: np.ndarray, shifted: bool) -> float:
    """Mean time of accumulate over at least 0.3 s, after one warm-up call."""
    device = choose_device("cpu", tuning=Tuning(shift_cost=float("inf") if shifted else float("-inf")))
    gather = gather_columns(layer, device)
    upload, product = Uploader(np), Products(np)
    accumulate(layer, x, HessianSum(gather=gather), device, upload, product)
    acc, calls, start = HessianSum(gather=gather), 0, time.perf_counter()
    while calls < 2 or time.perf_counter() - start < 0.3:
        accumulate(layer, x, acc, device, upload, product)
        calls += 1
    acc.hessian(np, product)
    return (time.perf_counter() - start) / calls


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default=SHAPES, help="comma-separated CHANNELSxSIZExBATCH (default: %(default)s)")
    p.add_argument("--repeat", type=int, default=3, help="alternating timings of each way (default 3)")
    args = p.parse_args()
    rng = np.random.default_rng(0)
    device = choose_device("cpu")
    print(f"shift_cost {device.tuning.shift_cost}")
    print(f"{'channels':>8} {'size':>5} {'batch':>5} {'cost':>6} {'time':>6} {'im2col ms':>10} {'shifted ms':>10}")
    for shape in args.shapes.split(","):
        channels, size, batch = map(int, shape.split("x"))
        layer = conv(channels)
        x = rng.standard_normal((batch, channels, size, size), dtype=np.float32)
        cost = shift_cost(layer.conv, x.shape, device.tuning, gather_columns(layer, device))
        times = {False: [], True: []}
        for _ in range(args.repeat):
            for shifted in (False, True):
                times[shifted].append(seconds_per_call(layer, x, shifted))
        unfolded, shifted = min(times[False]), min(times[True])
        print(f"{channels:>8} {size:>5} {batch:>5} {cost:>6.2f} {shifted / unfolded:>6.2f} "
              f"{unfolded * 1e3:>10.2f} {shifted * 1e3:>10.2f}", flush=True)


if __name__ == "__main__":
    main()
