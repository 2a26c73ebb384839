#!/usr/bin/env python
"""onnxruntime's own static quantizer on the PP-OCRv4 recognizer, for comparison with onnxobq.

The peer rows of the recognizer benchmark (``ocr_rec_bench.py``). The script

1. runs ``quant_pre_process`` on the FP32 model, as onnxruntime recommends
   before quantizing (needs sympy; with ``auto_merge``, without which its
   symbolic shape inference gives up on this model), and converts the result
   to opset ``--opset`` (``OUT/ort_pre.onnx``): the model has opset 12, where
   per-channel QDQ is not valid ONNX (DequantizeLinear has no ``axis`` before
   opset 13), yet ``quantize_static`` writes it there for 8-bit types;
2. quantizes it with ``onnxruntime.quantization.quantize_static`` once per
   configuration of ``--configs`` (QDQ format, per-channel weights, MinMax
   calibration; output ``OUT/NAME.onnx``), calibrated on exactly the lines
   that onnxobq sees: ``OUT/calib.npz`` as written by ``ocr_rec_bench.py``,
   fed one line at a time;
3. evaluates each result on the same clean and hard lines with the code of
   ``ocr_rec_bench.py`` (same ``--lines`` and ``--seed``) and prints its table.

A configuration that onnxruntime refuses is reported with its error and the
others still run. Configurations (weights / activations):

* ``ort_w4s_a8``: QInt4 / QUInt8;   ``ort_w4u_a8``: QUInt4 / QUInt8;
* ``ort_w4s_a16``: QInt4 / QUInt16; ``ort_w4u_a16``: QUInt4 / QUInt16;
* ``ort_w8a8``: QInt8 / QUInt8.

Examples::

    python scripts/ocr_rec_bench.py --out bench_out/ocr_peers     # writes calib.npz
    python scripts/ort_static_bench.py --out bench_out/ocr_peers
    python scripts/ort_static_bench.py --out bench_out/ocr_peers --configs ort_w8a8 --fp32
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnx.version_converter
import onnxruntime as ort
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                      QuantType, quantize_static)
from onnxruntime.quantization.shape_inference import quant_pre_process

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ocr_rec_bench  # noqa: E402
import ppocr  # noqa: E402
import textlines  # noqa: E402

#: Configuration name -> (weight type, activation type).
CONFIGS = {
    "ort_w4s_a8": (QuantType.QInt4, QuantType.QUInt8),
    "ort_w4u_a8": (QuantType.QUInt4, QuantType.QUInt8),
    "ort_w4s_a16": (QuantType.QInt4, QuantType.QUInt16),
    "ort_w4u_a16": (QuantType.QUInt4, QuantType.QUInt16),
    "ort_w8a8": (QuantType.QInt8, QuantType.QUInt8),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line.

    Args:
        argv: Arguments (default: ``sys.argv[1:]``).

    Returns:
        The parsed namespace.
    """
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="examples:\n" + __doc__.split("Examples::\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ocr_rec_bench.DEFAULT_OUT,
                   help=f"folder with calib.npz, and for the models (default {ocr_rec_bench.DEFAULT_OUT})")
    p.add_argument("--configs", default=",".join(CONFIGS),
                   help=f"comma-separated configurations (default: all of {', '.join(CONFIGS)})")
    p.add_argument("--lines", type=int, default=200, help="lines per evaluation set (default 200)")
    p.add_argument("--seed", type=int, default=0, help="seed of the evaluation sets (default 0)")
    p.add_argument("--opset", type=int, default=21,
                   help="convert the pre-processed model to this opset (default 21; 0: keep its own, 12)")
    p.add_argument("--fp32", action="store_true", help="also evaluate the FP32 model")
    p.add_argument("--json", type=Path, help="also write the results (and predictions) to this JSON file")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: default)")
    return p.parse_args(argv)


class NpzReader(CalibrationDataReader):
    """Feeds the lines of a calibration ``.npz`` (key ``x``) one at a time.

    Args:
        path: The ``calib.npz`` of ``ocr_rec_bench.py``.
        input_name: The model's input name.
    """

    def __init__(self, path: Path, input_name: str):
        self.x = np.load(path)["x"]
        self.input_name = input_name
        self.i = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.i >= len(self.x):
            return None
        self.i += 1
        return {self.input_name: self.x[self.i - 1:self.i]}

    def rewind(self) -> None:
        self.i = 0


def quantize(name: str, model: Path, calib: Path, out_dir: Path) -> dict:
    """Quantize the pre-processed model with ``quantize_static``.

    Args:
        name: Key of ``CONFIGS``.
        model: Pre-processed FP32 model.
        calib: Calibration ``.npz``.
        out_dir: Folder for ``NAME.onnx``.

    Returns:
        ``{"name", "path", "settings", "quant_seconds"}``, plus ``"error"`` (one
        line) if onnxruntime refused the configuration.
    """
    weights, activations = CONFIGS[name]
    out = out_dir / f"{name}.onnx"
    out.unlink(missing_ok=True)
    settings = dict(quant_format=QuantFormat.QDQ, per_channel=True, weight_type=weights,
                    activation_type=activations, calibrate_method=CalibrationMethod.MinMax)
    input_name = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).get_inputs()[0].name
    text = ", ".join(f"{k}={v}" for k, v in settings.items())
    print(f"quantize_static({model}, {out}, NpzReader({calib}), {text})", flush=True)
    row = {"name": name, "path": str(out), "settings": text}
    start = time.perf_counter()
    try:
        quantize_static(model, out, NpzReader(calib, input_name), **settings)
    except Exception as exc:  # record onnxruntime's refusal, run the other configurations
        row["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0]
        print(f"  {name}: {row['error']}", file=sys.stderr, flush=True)
    row["quant_seconds"] = round(time.perf_counter() - start, 2)
    return row


def main(argv: list[str] | None = None) -> int:
    """Run the comparison (see the module docstring).

    Args:
        argv: Command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit status: 0, or 1 if a quantization or an evaluation failed.
    """
    args = parse_args(argv)
    names = [n for n in args.configs.split(",") if n]
    if unknown := set(names) - set(CONFIGS):
        raise SystemExit(f"unknown configurations {sorted(unknown)}; known: {', '.join(CONFIGS)}")
    calib = args.out / "calib.npz"
    if not calib.is_file():
        raise SystemExit(f"{calib} not found; run: python scripts/ocr_rec_bench.py --out {args.out}")
    command = shlex.join(["python", "scripts/ort_static_bench.py"] + (sys.argv[1:] if argv is None else argv))
    print(f"$ {command}\nonnxruntime {ort.__version__}", flush=True)

    fp32 = ppocr.rapidocr_model(ppocr.REC_MODEL)
    pre = args.out / "ort_pre.onnx"
    quant_pre_process(str(fp32), str(pre), auto_merge=True)
    if args.opset:
        onnx.save(onnx.version_converter.convert_version(onnx.load(pre), args.opset), pre)
    models = [{"name": "fp32", "path": str(fp32)}] if args.fp32 else []
    models += [quantize(name, pre, calib, args.out) for name in names]
    failed = any("error" in m for m in models)

    data = {s: textlines.make_lines(args.lines, args.seed, "eval", hard=s == "hard") for s in ("clean", "hard")}
    meta = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"]).get_modelmeta()
    charset = ppocr.charset_from_metadata(meta.custom_metadata_map)
    done, eval_failed = ocr_rec_bench.evaluate_models([m for m in models if "error" not in m],
                                                      data, charset, args.threads)
    rows = [next((r for r in done if r["name"] == m["name"]), m) for m in models]
    print()
    ocr_rec_bench.print_table(rows, list(data))
    print(f"\n{args.lines} lines per set, seed {args.seed}, opset {args.opset or 'of the model'}; "
          f"reproduce with:\n$ {command}")

    if args.json:
        report = {"benchmark": "ppocrv4_rec_ort_static", "command": command, "lines": args.lines,
                  "seed": args.seed, "opset": args.opset, "calib": str(calib), "python": platform.python_version(),
                  "onnxruntime": ort.__version__, "models": rows}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
        print(f"wrote {args.json}")
    return 1 if failed or eval_failed else 0


if __name__ == "__main__":
    sys.exit(main())
