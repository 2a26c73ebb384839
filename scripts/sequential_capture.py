#!/usr/bin/env python
"""Experiment: does sequential capture help FastOBQ? (It did not on the quickstart model.)

Compares one-shot capture (every layer's Hessian from the float model, what onnxobq does)
with sequential capture in CHUNKS steps: the layers are split into CHUNKS groups in graph
order, and each group's Hessians come from the model whose earlier groups are already
quantized. No BatchNorm step. It prints the output SQNR against FP32 on held-out inputs.

Usage::

    python scripts/sequential_capture.py MODEL CALIB.npz HELD_OUT.npz BITS CHUNKS
    python scripts/sequential_capture.py models/ppocr_cls/ch_ppocr_mobile_v2.0_cls_infer.onnx \\
        models/ppocr_cls/calib.npz models/ppocr_cls/eval.npz 4 54
"""
import sys
import time

import numpy as np
import onnx_graphsurgeon as gs
import onnxruntime as ort

from onnxobq.backend import choose_device
from onnxobq.calibration import CalibConfig
from onnxobq.capturing import capture_hessians
from onnxobq.config import SolveConfig
from onnxobq.export import build_model, model_opset
from onnxobq.graph import load_model, scan_layers
from onnxobq.metrics import SignalNoise
from onnxobq.quant import GridSpec
from onnxobq.runtime import session_options
from onnxobq.solve import solve_layer


def main(model_path, calib, held_out, bits, chunks):
    model = load_model(model_path)
    scan = scan_layers(gs.import_onnx(model))
    layers, opset = scan.layers, model_opset(model)
    cfg = SolveConfig(method="fastobq", grid=GridSpec(bits=int(bits)))
    feed = dict(np.load(held_out))

    def outputs(m):
        return ort.InferenceSession(m.SerializeToString(), session_options()).run(None, feed)[0].astype(np.float64)

    ref = outputs(model)

    def sqnr(qlayers):
        agreement = SignalNoise()
        agreement.add(ref, outputs(build_model(model, qlayers, "fake", opset, True)))
        return agreement.sqnr_db()

    device = choose_device("cpu")

    def solve(group, current):
        cap = capture_hessians(current, group, CalibConfig(source=calib), device)
        return [solve_layer(l, scan.weights[l.name], cap.hessians[l.hessian_key], cfg, device)[0] for l in group]

    start = time.perf_counter()
    print(f"one-shot capture:    SQNR {sqnr(solve(layers, model)):.2f} dB ({time.perf_counter() - start:.1f} s)")
    start, done = time.perf_counter(), []
    bounds = np.linspace(0, len(layers), int(chunks) + 1).astype(int)
    for a, b in zip(bounds[:-1], bounds[1:]):
        current = build_model(model, done, "fake", opset, True) if done else model
        done += solve(layers[a:b], current)
    print(f"sequential x{chunks}: SQNR {sqnr(done):.2f} dB ({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main(*sys.argv[1:6])
