#!/usr/bin/env python
"""How many samples BatchNorm re-estimation needs: a real case's metric and BN time against
``--bn-samples``, with one calibration set and one capture.

Example::

    python scripts/bn_samples_bench.py --case det --calib-samples 256 --bits 4 --bn-samples 32,64,128,all

The calibration set is the case's own (``det``: 5/8 CJK, then Latin; ``ocr_rec``: clean lines,
then hard ones), made larger. The Hessians are captured once (``--save-hessians``) and every
run reuses them, so the runs differ only in the BN passes. Each run's model is scored with the
case's metric on its evaluation data. Needs the ``bench`` extra (see the README's benchmark
harness section). Prints a table and writes OUT/bn_samples_CASE_wBITS.json.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent / "bench"))
from bench import cases  # noqa: E402
from bench.harness import default_cli  # noqa: E402


def calibration(name: str, n: int, seed: int) -> np.ndarray:
    """``n`` calibration inputs of case ``name``, from the streams its own calibration set uses."""
    if name == "det":
        from bench.cases import det
        cjk = (5 * n) // 8
        return det.make_calibration((cjk, n - cjk), seed)
    if name == "ocr_rec":
        from bench.cases import ocr_rec
        return ocr_rec.make_calibration(n, seed + 1)[0]
    raise SystemExit(f"bn_samples_bench.py: error: --case {name}: only det and ocr_rec have BatchNorm work here")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--case", default="det", help="det or ocr_rec")
    p.add_argument("--calib-samples", type=int, default=256)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--bn-samples", default="32,64,128,all", help="comma list of --bn-samples values")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("bench_out/bn_samples"))
    args = p.parse_args(argv)

    case = cases.load(args.case)
    work = args.out / args.case
    data = case.make_data(work / "data", args.seed)
    calib = work / f"calib{args.calib_samples}_seed{args.seed}.npz"
    if not calib.exists():
        key = "images" if args.case == "det" else "x"
        np.savez(calib, **{key: calibration(args.case, args.calib_samples, args.seed)})
    hessians = work / f"hessians_w_calib{args.calib_samples}_seed{args.seed}.npz"
    rows = []
    for value in args.bn_samples.split(","):
        model = work / f"{args.case}.w{args.bits}.bn{value}.onnx"
        report = work / f"{args.case}.w{args.bits}.bn{value}.json"
        reuse = ["--hessians", str(hessians)] if hessians.exists() else ["--save-hessians", str(hessians)]
        cmd = [*default_cli(), "quantize", str(case.model_path()), "--calib", str(calib), *data.calib_args,
               "--bits", str(args.bits), "--format", "fake", "--bn-samples", value, *reuse,
               "-o", str(model), "--report", str(report), "--overwrite", "-q"]
        start = time.perf_counter()
        subprocess.run(cmd, check=True)
        wall = time.perf_counter() - start
        r = json.loads(report.read_text())
        metrics = case.evaluate(model, data)
        rows.append({"bn_samples": value, "samples": r["bn"]["samples"], "bn_seconds": r["stages_seconds"]["bn"],
                     "error_before": r["bn"]["error_before"], "error_after": r["bn"]["error_after"],
                     "kept": r["bn"]["kept"], "wall_seconds": wall, "metrics": metrics, "command": cmd})
        m = " ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        print(f"--bn-samples {value:>4}: {r['bn']['samples']} samples, BN {r['stages_seconds']['bn']:.1f} s, "
              f"error {r['bn']['error_before']:.4g} -> {r['bn']['error_after']:.4g}, {m}", flush=True)
    out = args.out / f"bn_samples_{args.case}_w{args.bits}.json"
    out.write_text(json.dumps({"case": args.case, "bits": args.bits, "calib_samples": args.calib_samples,
                               "seed": args.seed, "runs": rows}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
