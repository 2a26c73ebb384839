#!/usr/bin/env python
"""Speed benchmark: the time of each stage of ``onnxobq quantize`` per method and device.

Models (``--models``):

* ``resnet50``: the ResNet-50 graph that ships with the onnx package
  (``onnx/backend/test/data/light/light_resnet50.onnx``, docs/benchmarks.md section 5)
  with its ``ConstantOfShape`` weights replaced by seeded random initializers and a
  dynamic batch; 53 Conv + 1 Gemm, 53 BatchNormalization;
* any other ``NAME=PATH.onnx``, e.g. ``yolox=.../common_det.onnx``.

Each run is one ``onnxobq quantize MODEL --calib random --samples N --report R.json``
subprocess (random calibration tensors: the time depends only on the shapes). A
warm-up run per device first compiles CuPy's kernels, which are cached on disk.
The script prints, per model, the stages (load, capture, solve, bn, export), the
peak host RSS and GPU memory from each report, and the ratios of the solve times
measured in the same run: every method against FastOBQ on the same device, and
CPU against GPU for the same method. It writes every report and the table to
``--out``.

Examples::

    python scripts/speed_bench.py --models resnet50 --methods rtn,gptq,fastobq \\
        --devices cpu,cuda --samples 256 --bits 4 --out bench_out/speed

    # MiniLM (69 MB) for a machine that can be sent 64 MiB: strip it here, fill it there
    python scripts/speed_bench.py --strip-weights paraphrase-MiniLM-L3-v2.onnx minilm.shapes.onnx
    python scripts/speed_bench.py --models minilm=minilm.shapes.onnx --random-weights \\
        --input-shape input_ids=8x128 --input-shape attention_mask=8x128 --batch-size 8
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench.harness import default_cli  # noqa: E402

STAGES = ("load", "capture", "solve", "bn", "export")


def resnet50(seed: int = 0) -> onnx.ModelProto:
    """The onnx package's light_resnet50 with seeded random weights and a dynamic batch.

    Conv weights are He-normal, BatchNorm scale ~1, shift and mean ~0, variance ~1;
    the classifier is N(0, 0.01).
    """
    path = Path(onnx.__file__).parent / "backend/test/data/light/light_resnet50.onnx"
    model = onnx.load(path)
    g = model.graph
    rng = np.random.default_rng(seed)
    shapes = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    keep_nodes, inits = [], []
    for node in g.node:
        if node.op_type == "Reshape" and node.input[1] in shapes:   # (1, 2048) -> (batch, 2048)
            shapes[node.input[1]] = np.array([-1, int(shapes[node.input[1]][-1])], np.int64)
        if node.op_type != "ConstantOfShape" or node.input[0] not in shapes:
            keep_nodes.append(node)
            continue
        name, shape = node.output[0], tuple(int(d) for d in shapes[node.input[0]])
        inits.append(numpy_helper.from_array(_random_weight(name, shape, rng), name))
    used = {i for n in keep_nodes for i in n.input}
    inits += [numpy_helper.from_array(shapes[t.name], t.name) for t in g.initializer if t.name in used]
    names = {t.name for t in inits}
    inputs = [vi for vi in g.input if vi.name not in shapes and vi.name not in names]
    new = helper.make_graph(keep_nodes, "resnet50_random", inputs, list(g.output), inits)
    for vi in list(new.input) + list(new.output):
        vi.type.tensor_type.shape.dim[0].dim_param = "batch"
    out = helper.make_model(new, opset_imports=list(model.opset_import), producer_name="onnxobq-speed-bench")
    out.ir_version = 7  # initializers need not be graph inputs (IR >= 4)
    onnx.checker.check_model(out)
    return out


def _random_weight(name: str, shape: tuple, rng) -> np.ndarray:
    if name.endswith("_riv_0"):                   # running variance
        return (1.0 + 0.1 * rng.random(shape)).astype(np.float32)
    if name.endswith("_bn_s_0"):                  # BN scale
        return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    if name.endswith(("_bn_b_0", "_rm_0", "_b_0")):
        return (0.01 * rng.standard_normal(shape)).astype(np.float32)
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    std = 0.01 if name.startswith("gpu_0/pred") else np.sqrt(2.0 / fan_in)
    return (std * rng.standard_normal(shape)).astype(np.float32)


# Float initializers at least this large are what --strip-weights leaves out.
STRIP_MIN_ELEMENTS = 1 << 18


def strip_weights(src: Path, dst: Path) -> int:
    """Write ``src`` without the values of its large float initializers (their shapes stay,
    marked as external data that is never written), so that a model past the GPU machine's
    carry limit travels as a few kB. Returns how many were left out."""
    model = onnx.load(src)
    count = 0
    for t in model.graph.initializer:
        size = int(np.prod(t.dims)) if len(t.dims) else 1
        if t.data_type != onnx.TensorProto.FLOAT or size < STRIP_MIN_ELEMENTS:
            continue
        t.ClearField("raw_data")
        t.ClearField("float_data")
        t.data_location = onnx.TensorProto.EXTERNAL
        del t.external_data[:]
        t.external_data.add(key="location", value="stripped-weights.bin")
        count += 1
    onnx.save(model, dst)
    return count


def fill_stripped(src: Path, dst: Path, seed: int) -> int:
    """The inverse of strip_weights, with seeded N(0, 0.02^2) values where the weights were
    (the stages' times depend only on the shapes). Returns how many were filled."""
    model = onnx.load(src, load_external_data=False)
    rng = np.random.default_rng(seed)
    count = 0
    for i, t in enumerate(model.graph.initializer):
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        values = (0.02 * rng.standard_normal(tuple(t.dims))).astype(np.float32)
        model.graph.initializer[i].CopyFrom(numpy_helper.from_array(values, t.name))
        count += 1
    onnx.save(model, dst)
    return count


def quantize(model: Path, out_dir: Path, tag: str, method: str, device: str, args) -> dict:
    """One ``onnxobq quantize`` subprocess; the parsed report plus the wall time."""
    report = out_dir / f"{tag}.json"
    cmd = list(default_cli()) + ["quantize", str(model), "-o", str(out_dir / "q.onnx"), "--calib", "random",
                   "--samples", str(args.samples), "--batch-size", str(args.batch_size),
                   "--bits", str(args.bits), "--method", method, "--device", device,
                   "--report", str(report), "--overwrite", "-q"]
    for shape in args.input_shape:
        cmd += ["--input-shape", shape]
    if not args.bn:
        cmd.append("--no-bn-reestimate")
    elif args.bn_samples is not None:
        cmd += ["--bn-samples", str(args.bn_samples)]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        return {"status": "failed", "wall": wall, "command": cmd,
                "error": (done.stderr or done.stdout).strip().splitlines()[-1:]}
    rec = json.loads(report.read_text())
    rec.update(status="ok", wall=wall, command=cmd)
    return rec


def forward_seconds(model_path: Path, samples: int, batch_size: int, capture_outputs: bool,
                    shapes: dict | None = None) -> float:
    """onnxruntime's forward passes alone over the same random calibration data as the runs,
    through a session that (with ``capture_outputs``) exposes every layer input as the capture does."""
    import onnx_graphsurgeon as gs
    from onnxobq.calibration import CalibConfig, batches
    from onnxobq.capturing import layer_input_outputs
    from onnxobq.graph import scan_layers
    from onnxobq.runtime import model_inputs, session

    model = onnx.load(model_path)
    inputs = model_inputs(model)
    layers = scan_layers(gs.import_onnx(model)).layers
    sess = session(model, layer_input_outputs(model, layers) if capture_outputs else {})
    names = [o.name for o in sess.get_outputs()]
    data = list(batches(CalibConfig(source="random", samples=samples, batch_size=batch_size, shapes=shapes or {}),
                        inputs))
    start = time.perf_counter()
    for feed in data:
        sess.run(names, feed)
    return time.perf_counter() - start


def fmt_table(model: str, runs: dict) -> str:
    lines = [f"### {model}", "",
             "| method | device | " + " | ".join(STAGES) + " | total s | peak RSS MB | peak GPU MB "
             "| solve vs fastobq | solve cpu/gpu |",
             "|---" * (len(STAGES) + 7) + "|"]
    for (method, device), r in runs.items():
        if r["status"] != "ok":
            lines.append(f"| {method} | {device} | failed: {' '.join(r['error'])} |")
            continue
        st = r["stages_seconds"]
        ref = runs.get(("fastobq", device))
        vs = (st["solve"] / ref["stages_seconds"]["solve"]) if ref and ref["status"] == "ok" else None
        cpu, gpu = runs.get((method, "cpu")), runs.get((method, "cuda"))
        cg = (cpu["stages_seconds"]["solve"] / gpu["stages_seconds"]["solve"]
              if cpu and gpu and cpu["status"] == gpu["status"] == "ok" else None)
        gpu_mb = r.get("peak_gpu_mb")
        lines.append(
            f"| {method} | {device} | " + " | ".join(f"{st.get(s, 0.0):.2f}" for s in STAGES)
            + f" | {r['total_seconds']:.2f} | {r['peak_rss_mb']:.0f} | "
            + ("-" if gpu_mb is None else f"{gpu_mb:.0f}") + " | "
            + ("-" if vs is None else f"{vs:.2f}x") + " | " + ("-" if cg is None else f"{cg:.1f}x") + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="resnet50", help="comma list: resnet50 and/or NAME=PATH.onnx")
    p.add_argument("--methods", default="rtn,gptq,fastobq")
    p.add_argument("--devices", default="cpu,cuda")
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--bn", action="store_true", help="keep BN re-estimation on (default: off, to time the solver)")
    p.add_argument("--bn-samples", help="with --bn: onnxobq quantize's --bn-samples (N or all; default: its own, 128)")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--input-shape", action="append", default=[], metavar="NAME=DIMS",
                   help="shape of a dynamic model input, as onnxobq quantize takes it (repeatable)")
    p.add_argument("--out", type=Path, default=Path("bench_out/speed"))
    p.add_argument("--strip-weights", nargs=2, type=Path, metavar=("MODEL", "OUT"),
                   help="only write MODEL without its large float weights to OUT (for the GPU machine's carry)")
    p.add_argument("--random-weights", action="store_true",
                   help="fill the weights a --strip-weights model left out with seeded random values")
    args = p.parse_args(argv)
    if args.strip_weights:
        count = strip_weights(*args.strip_weights)
        print(f"wrote {args.strip_weights[1]} ({args.strip_weights[1].stat().st_size} bytes) without "
              f"the values of {count} float initializers")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    results = {"machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                           "argv": sys.argv}, "models": {}}
    tables = []
    for spec in args.models.split(","):
        name, _, path = spec.partition("=")
        if name == "resnet50" and not path:
            path = args.out / "resnet50_random.onnx"
            onnx.save(resnet50(args.seed), path)
        model = Path(path)
        if args.random_weights:
            filled = args.out / f"{name}_filled.onnx"
            fill_stripped(model, filled, args.seed)
            model = filled
        runs = {}
        for device in args.devices.split(","):
            quantize(model, args.out, f"{name}_warmup_{device}", "fastobq", device,
                     argparse.Namespace(**{**vars(args), "samples": 2, "bn": False}))
            for method in args.methods.split(","):
                rec = quantize(model, args.out, f"{name}_{method}_{device}", method, device, args)
                runs[(method, device)] = rec
                print(f"{name} {method} {device}: {rec['status']} "
                      + (f"total {rec['total_seconds']:.2f}s stages {rec['stages_seconds']} "
                         f"capture waited for onnxruntime {rec.get('capture_waited_seconds')}s "
                         f"GPU pool {rec.get('peak_gpu_mb')} MB"
                         if rec["status"] == "ok" else str(rec["error"])), flush=True)
        shapes = {name: tuple(int(d) for d in dims.lower().split("x"))
                  for name, _, dims in (shape.rpartition("=") for shape in args.input_shape)}
        fwd = forward_seconds(model, args.samples, args.batch_size, True, shapes)
        plain = forward_seconds(model, args.samples, args.batch_size, False, shapes)
        line = (f"onnxruntime forward passes alone ({args.samples} samples, batch {args.batch_size}): "
                f"{fwd:.2f} s exposing the layer inputs, {plain:.2f} s without")
        tables.append(fmt_table(name, runs) + "\n\n" + line)
        results["models"][name] = {f"{m}/{d}": r for (m, d), r in runs.items()}
        results["models"][name]["forward_seconds"] = {"capture_outputs": fwd, "plain": plain}
    text = "\n\n".join(tables)
    print(text)
    (args.out / "speed.md").write_text(text + "\n")
    (args.out / "speed.json").write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
