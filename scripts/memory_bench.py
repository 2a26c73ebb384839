#!/usr/bin/env python
"""Memory benchmark: peak host RSS of ``onnxobq quantize`` (and ``compare``) against model size.

Each model is built here, with seeded random weights stored as external data:

    img (N, 3, 16, 16) -> Conv 3x3 (16) -> BatchNormalization -> Relu -> GlobalAveragePool
        -> Flatten -> MatMul (16 x 256) -> h (N, 256) -> MatMul (256 x COLS) -> y_i, for i < 4

so the Conv and its BN take the BN stage's path, and four MatMuls of 256 rows hold nearly all of
the bytes (COLS is chosen for the size asked for; 3 GB is four 256 x 732,422 weights).

Each run is one subprocess, ``onnxobq quantize MODEL --method M --calib calib.npz`` (8 random
samples), whose peak RSS is read from ``getrusage(RUSAGE_CHILDREN)`` after it exits (the OS's
count, so nothing in onnxobq measures itself). The table gives the peak against the model's
size, and against the bound that issue 29 sets: the model, plus one layer's working set, plus one
calibration batch, plus a fixed overhead (the peak of the smallest model's run, less its size).

With ``--pieces`` it measures two pieces instead, each in a fresh child: the memory one
onnxruntime session of the 0.25 GB model keeps (made from the model's bytes, from a file with
external data, and from that file without prepacking), and the peak of one 200,000 x 256
layer's solve, whole and in parts of rows (Tuning.solve_rows_bytes).

Examples::

    python scripts/memory_bench.py --sizes 0.5,1,2,3 --methods rtn,fastobq --out bench_out/memory
    python scripts/memory_bench.py --pieces --out bench_out/memory
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROWS, BRANCHES, SAMPLES = 256, 4, 8


def build(path: Path, gb: float, seed: int = 0) -> int:
    """Write the model of about ``gb`` GB of weights to ``path`` (+ ``.data``); return its weight bytes."""
    r = np.random.default_rng(seed)
    cols = int(gb * 1e9 / (BRANCHES * ROWS * 4))
    inits = [numpy_helper.from_array((0.2 * r.standard_normal((16, 3, 3, 3))).astype(np.float32), "conv_w"),
             numpy_helper.from_array((1 + 0.1 * r.standard_normal(16)).astype(np.float32), "bn_s"),
             numpy_helper.from_array((0.1 * r.standard_normal(16)).astype(np.float32), "bn_b"),
             numpy_helper.from_array(np.zeros(16, np.float32), "bn_m"),
             numpy_helper.from_array(np.ones(16, np.float32), "bn_v"),
             numpy_helper.from_array((0.25 * r.standard_normal((16, ROWS))).astype(np.float32), "proj")]
    nodes = [helper.make_node("Conv", ["img", "conv_w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "bn_s", "bn_b", "bn_m", "bn_v"], ["b"], name="bn"),
             helper.make_node("Relu", ["b"], ["r"], name="relu"),
             helper.make_node("GlobalAveragePool", ["r"], ["p"], name="gap"),
             helper.make_node("Flatten", ["p"], ["f"], name="flat"),
             helper.make_node("MatMul", ["f", "proj"], ["h"], name="proj")]
    outputs = []
    for i in range(BRANCHES):
        w = np.empty((ROWS, cols), np.float32)
        for start in range(0, cols, 1 << 16):      # drawn in slices: no float64 copy of the weight
            stop = min(cols, start + (1 << 16))
            w[:, start:stop] = r.standard_normal((ROWS, stop - start), dtype=np.float32) * 0.06
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        del w
        nodes.append(helper.make_node("MatMul", ["h", f"w{i}"], [f"y{i}"], name=f"big{i}"))
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [None, cols]))
    graph = helper.make_graph(nodes, "memory_bench", [helper.make_tensor_value_info("img", TensorProto.FLOAT,
                                                                                    [None, 3, 16, 16])],
                              outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    weight_bytes = sum(t.ByteSize() for t in inits)
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=1024)
    return weight_bytes


def peak_of(cmd: list[str]) -> tuple[float, float, int, str]:
    """Run ``cmd``; return (peak RSS in MB of the largest child so far, seconds, exit status, last stderr line)."""
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0
    last = (done.stderr.strip().splitlines() or [""])[-1]
    return peak, seconds, done.returncode, last


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="0.5,1,2,3", help="model sizes in GB of weights, smallest first")
    ap.add_argument("--methods", default="rtn,fastobq")
    ap.add_argument("--compare", action="store_true", help="also run onnxobq compare on each output")
    ap.add_argument("--out", default="bench_out/memory")
    ap.add_argument("--pieces", action="store_true", help="measure one session and one layer's solve instead")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.pieces:
        return pieces(out)
    calib = out / "calib.npz"
    np.savez(calib, img=np.random.default_rng(1).standard_normal((SAMPLES, 3, 16, 16)).astype(np.float32))
    rows = []
    for gb in [float(s) for s in args.sizes.split(",")]:
        model = out / f"m{gb:g}.onnx"
        size = build(model, gb)
        for method in args.methods.split(","):
            q = out / f"m{gb:g}.{method}.onnx"
            cmd = [sys.executable, "-m", "onnxobq", "quantize", str(model), "--method", method, "--bits", "4",
                   "--calib", str(calib), "-o", str(q), "--overwrite", "--report", str(q) + ".json", "-q"]
            peak, seconds, code, last = _isolated(cmd)
            rows.append({"gb": gb, "weight_bytes": size, "method": method, "command": "quantize",
                         "peak_rss_mb": peak, "seconds": seconds, "exit": code, "last": last})
            print(json.dumps(rows[-1]), flush=True)
            if args.compare and code == 0:
                peak, seconds, code, last = _isolated([sys.executable, "-m", "onnxobq", "compare", str(model), str(q),
                                                       "--calib", str(calib)])
                rows.append({"gb": gb, "weight_bytes": size, "method": method, "command": "compare",
                             "peak_rss_mb": peak, "seconds": seconds, "exit": code, "last": last})
                print(json.dumps(rows[-1]), flush=True)
            for f in (q, Path(str(q) + ".data")):
                f.unlink(missing_ok=True)
        for f in (model, Path(str(model) + ".data")):
            f.unlink(missing_ok=True)
    (out / "memory.json").write_text(json.dumps(rows, indent=1))
    _table(rows)
    return 0


PIECES = {
    "session": """
import gc, sys, onnx, onnxruntime as ort
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096 / 2 ** 20
mode, path = sys.argv[1], sys.argv[2]
opts = ort.SessionOptions()
if mode == "file-noprepack":
    opts.add_session_config_entry("session.disable_prepacking", "1")
base = rss()
source = onnx.load(path).SerializeToString() if mode == "bytes" else path
sess = ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
del source
gc.collect()
print(rss() - base)
""",
    "solve": """
import sys, threading, time, numpy as np
from onnxobq.backend import Tuning, choose_device
from onnxobq.config import SolveConfig
from onnxobq.quant import GridSpec
from onnxobq.solve import solve_layer
from onnxobq.types import Layer
rows, part = int(sys.argv[2]), int(sys.argv[1])
w = np.random.default_rng(0).standard_normal((256, rows), dtype=np.float32)
X = np.random.default_rng(1).standard_normal((4096, 256))
H = (2 * X.T @ X / 4096)[None]
layer = Layer("mm", "MatMul", "w", "initializer", "x", "y", (256, rows), "float32", 1, rows, 256, transposed=True)
device = choose_device("cpu", tuning=Tuning(solve_rows_bytes=part), cores=1)
# the current RSS, sampled: a child's ru_maxrss starts from its parent's at the fork
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096 / 2 ** 20
base, peak, done = rss(), [0.0], threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], rss())
        time.sleep(0.002)
sampler = threading.Thread(target=sample)
sampler.start()
solve_layer(layer, w, H, SolveConfig(method="fastobq", grid=GridSpec(bits=4)), device, 4096)
done.set()
sampler.join()
print((peak[0] - base) / (w.nbytes / 2 ** 20))
""",
}


def pieces(out: Path) -> int:
    """One session's memory by how it is made, and one layer's solve peak whole and in parts."""
    model = out / "m0.25.onnx"
    build(model, 0.25)
    run = lambda piece, *a: float(subprocess.run([sys.executable, "-c", PIECES[piece], *map(str, a)],   # noqa: E731
                                                 capture_output=True, text=True, check=True).stdout.split()[-1])
    for mode in ("bytes", "file", "file-noprepack"):
        print(f"a session of {model.name} made from {mode} holds {run('session', mode, model):,.0f} MB (RSS once "
              "only the session is left)")
    for name, part in (("whole", 1 << 40), ("in parts", 64 << 20)):
        print(f"fastobq solve of a 200,000 x 256 layer, {name}: peak {run('solve', part, 200_000):.1f} times its "
              "float32 weight")
    for f in (model, Path(str(model) + ".data")):
        f.unlink(missing_ok=True)
    return 0


def _isolated(cmd: list[str]) -> tuple[float, float, int, str]:
    """peak_of in a fresh Python child, so that each run's peak is its own (RUSAGE_CHILDREN keeps
    the largest child's peak for the life of the process that waits for it)."""
    code = ("import json, sys; sys.path.insert(0, %r); from memory_bench import peak_of; "
            "print(json.dumps(peak_of(%r)))" % (os.path.dirname(os.path.abspath(__file__)), cmd))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    peak, seconds, status, last = json.loads(done.stdout.strip().splitlines()[-1])
    return peak, seconds, status, last


def _table(rows: list[dict]) -> None:
    print(f"\n{'GB':>5} {'method':>8} {'command':>9} {'weights MB':>11} {'peak RSS MB':>12} {'peak/model':>11} "
          f"{'seconds':>8} exit")
    for r in rows:
        mb = r["weight_bytes"] / 2 ** 20
        print(f"{r['gb']:>5g} {r['method']:>8} {r['command']:>9} {mb:>11,.0f} {r['peak_rss_mb']:>12,.0f} "
              f"{r['peak_rss_mb'] / mb:>11.2f} {r['seconds']:>8.1f} {r['exit']}")


if __name__ == "__main__":
    sys.exit(main())
