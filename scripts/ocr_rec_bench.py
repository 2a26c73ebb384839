#!/usr/bin/env python
"""Benchmark PP-OCRv4 text recognizers (FP32 and quantized) on rendered lines.

This is the recognizer benchmark of docs/benchmarks.md. The FP32 model is
``ch_PP-OCRv4_rec_infer.onnx`` from ``rapidocr_onnxruntime==1.4.4``.

The script

1. renders the evaluation sets (``--lines`` clean and as many hard lines,
   seed ``--seed``, evaluation half of the corpus, see ``textlines.py``);
2. renders a calibration set (``--calib-lines``: half clean, half hard, seed
   ``--calib-seed``, calibration half of the corpus) and writes it as
   ``OUT/calib.npz`` (key ``x``, shape (N, 3, 48, W), zero-padded to a common
   width), ready for ``onnxobq quantize MODEL --calib OUT/calib.npz``;
3. optionally quantizes the FP32 model with the onnxobq CLI, once per
   ``--quantize NAME:ARGS`` (output ``OUT/NAME.onnx``);
4. evaluates the FP32 model, the quantized ones and any ONNX models given on
   the command line, one line at a time with onnxruntime on the CPU, and prints
   exact-match rate and character error rate (CER: total edit distance over
   total reference characters) on the clean and hard sets. Leading and
   trailing spaces of a prediction are dropped before scoring.

Examples::

    python scripts/ocr_rec_bench.py                       # FP32 only, 200 lines
    python scripts/ocr_rec_bench.py --lines 1000 --json bench_out/ocr_rec/fp32.json
    python scripts/ocr_rec_bench.py --quantize "rtn4:--method rtn --bits 4" \\
        --quantize "fastobq4:--bits 4"
    python scripts/ocr_rec_bench.py --no-fp32 path/to/model_w4.onnx
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ppocr  # noqa: E402
import textlines  # noqa: E402
from bench.cases.ocr_rec import make_calibration, open_session, recognize, score  # noqa: E402

DEFAULT_OUT = Path("bench_out") / "ocr_rec"


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
    p.add_argument("models", nargs="*", type=Path, help="extra ONNX models to evaluate")
    p.add_argument("--lines", type=int, default=200, help="lines per evaluation set (default 200)")
    p.add_argument("--seed", type=int, default=0, help="seed of the evaluation sets (default 0)")
    p.add_argument("--calib-lines", type=int, default=64,
                   help="calibration lines, half clean and half hard (default 64)")
    p.add_argument("--calib-seed", type=int, default=1, help="seed of the calibration set (default 1)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    p.add_argument("--json", type=Path, help="also write the results (and predictions) to this JSON file")
    p.add_argument("--quantize", action="append", default=[], metavar="NAME:ARGS",
                   help="run 'onnxobq quantize FP32 --calib CALIB -o OUT/NAME.onnx ARGS' and "
                        "evaluate the result; repeatable")
    p.add_argument("--onnxobq", default=None,
                   help="command that runs the onnxobq CLI (default: 'onnxobq' on PATH, "
                        "else the current Python's 'python -m onnxobq')")
    p.add_argument("--no-fp32", action="store_true", help="do not evaluate the FP32 model")
    p.add_argument("--sets", default="clean,hard", help="evaluation sets to run (default clean,hard)")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: default)")
    p.add_argument("--show-errors", type=int, default=0, metavar="K",
                   help="print the first K wrong predictions of each model and set")
    return p.parse_args(argv)


def onnxobq_command(option: str | None) -> list[str]:
    """Return the argv prefix that runs the onnxobq CLI.

    Args:
        option: The ``--onnxobq`` value, or ``None``.

    Returns:
        A list such as ``["onnxobq"]``.
    """
    if option:
        return shlex.split(option)
    exe = shutil.which("onnxobq")
    if exe:
        return [exe]
    return [sys.executable, "-m", "onnxobq"]


def quantize(spec: str, fp32: Path, calib: Path, out_dir: Path, cli: list[str]) -> dict:
    """Quantize the FP32 model with the onnxobq CLI.

    Args:
        spec: ``NAME:ARGS``, e.g. ``"rtn4:--method rtn --bits 4"``.
        fp32: FP32 model path.
        calib: Calibration ``.npz`` path.
        out_dir: Folder for ``NAME.onnx``.
        cli: Command prefix (see ``onnxobq_command``).

    Returns:
        ``{"name", "path", "command", "quant_seconds", "returncode"}``.
    """
    name, _, extra = spec.partition(":")
    if not name or "/" in name:
        raise SystemExit(f"--quantize expects NAME:ARGS, got {spec!r}")
    out = out_dir / f"{name}.onnx"
    cmd = cli + ["quantize", str(fp32), "--calib", str(calib), "-o", str(out)] + shlex.split(extra)
    out.unlink(missing_ok=True)
    print("$", shlex.join(cmd), flush=True)
    start = time.perf_counter()
    rc = subprocess.run(cmd).returncode
    seconds = time.perf_counter() - start
    if rc != 0 or not out.is_file():
        print(f"  quantization {name!r} failed (exit status {rc})", file=sys.stderr)
    return {"name": name, "path": str(out), "command": shlex.join(cmd),
            "quant_seconds": round(seconds, 2), "returncode": rc}


def evaluate(path: Path, lines: list[tuple[np.ndarray, str]], charset: list[str],
             threads: int = 0) -> dict:
    """Recognize each line with one model and score the results.

    Args:
        path: ONNX model.
        lines: ``(image, label)`` pairs.
        charset: CTC charset (used when the model has no 'character' metadata).
        threads: onnxruntime intra-op threads (0: default).

    Returns:
        ``{"exact", "cer", "edits", "chars", "seconds", "predictions"}``.
    """
    session = open_session(path, threads)
    start = time.perf_counter()
    predictions = recognize(session, [image for image, _ in lines], charset)
    seconds = time.perf_counter() - start
    found = score(predictions, [label for _, label in lines])
    return {**found, "seconds": round(seconds, 2), "predictions": predictions}


def evaluate_models(models: list[dict], data: dict, charset: list[str], threads: int = 0,
                    show_errors: int = 0) -> tuple[list[dict], bool]:
    """Evaluate each model on each set, printing progress as it goes.

    A model that is missing or fails to run is marked with an ``"error"``
    entry, and the others are still evaluated.

    Args:
        models: Dicts with at least ``"name"`` and ``"path"``.
        data: Set name -> list of ``(image, label)`` pairs.
        charset: CTC charset of the FP32 model.
        threads: onnxruntime intra-op threads (0: default).
        show_errors: How many wrong predictions to print per model and set.

    Returns:
        ``(rows, failed)``: one result dict per model (the model's dict plus
        one entry per set) and whether any evaluation failed.
    """
    failed = False
    rows = []
    for model in models:
        row = dict(model)
        rows.append(row)
        if not Path(model["path"]).is_file():
            row["error"] = "no model file"
            continue
        for s in data:
            try:
                row[s] = evaluate(Path(model["path"]), data[s], charset, threads)
            except Exception as exc:  # keep going: other models may have taken long to make
                row["error"] = f"{type(exc).__name__}: {exc}"
                print(f"{model['name']}: evaluation failed: {row['error']}", file=sys.stderr)
                failed = True
                break
            print(f"{model['name']} {s}: exact {row[s]['exact']:.3f} CER {row[s]['cer']:.4f} "
                  f"({row[s]['seconds']:.1f} s)", flush=True)
            wrong = [(p, t) for p, (_, t) in zip(row[s]["predictions"], data[s]) if p != t]
            for pred, label in wrong[:show_errors]:
                print(f"    {label!r} -> {pred!r}")
    return rows, failed


def print_table(rows: list[dict], sets: list[str]) -> None:
    """Print one row per model: exact-match rate and CER of each set.

    Args:
        rows: Results, each with ``"name"`` and one entry per set.
        sets: Set names, e.g. ``["clean", "hard"]``.
    """
    width = max([5] + [len(r["name"]) for r in rows])
    head = f"{'model':<{width}}" + "".join(f"  {s + ' exact':>11}  {s + ' CER':>9}" for s in sets)
    print(head + "  eval s  quant s")
    for r in rows:
        cells = "".join(f"  {r[s]['exact']:>11.3f}  {r[s]['cer']:>9.4f}" if s in r
                        else f"  {'-':>11}  {'-':>9}" for s in sets)
        seconds = sum(r[s]["seconds"] for s in sets if s in r)
        quant = f"{r['quant_seconds']:>7.1f}" if "quant_seconds" in r else f"{'':>7}"
        note = f"  FAILED ({r['error']})" if "error" in r else ""
        print(f"{r['name']:<{width}}{cells}  {seconds:>6.1f}  {quant}{note}")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (see the module docstring).

    Args:
        argv: Command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit status: 0, or 1 if a quantization or an evaluation failed.
    """
    args = parse_args(argv)
    sets = [s for s in args.sets.split(",") if s]
    if not set(sets) <= {"clean", "hard"}:
        raise SystemExit("--sets takes 'clean', 'hard' or both")
    fp32 = ppocr.rapidocr_model(ppocr.REC_MODEL)
    args.out.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    data = {s: textlines.make_lines(args.lines, args.seed, "eval", hard=s == "hard") for s in sets}
    x, calib_labels = make_calibration(args.calib_lines, args.calib_seed)
    calib = args.out / "calib.npz"
    np.savez(calib, x=x)
    (args.out / "calib_labels.txt").write_text("\n".join(calib_labels) + "\n")
    print(f"rendered {args.lines} lines per set ({', '.join(sets)}) and {len(x)} calibration lines "
          f"-> {calib} {tuple(x.shape)} in {time.perf_counter() - start:.1f} s", flush=True)

    session = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"])
    charset = ppocr.charset_from_metadata(session.get_modelmeta().custom_metadata_map)
    del session

    models = [] if args.no_fp32 else [{"name": "fp32", "path": str(fp32)}]
    cli = onnxobq_command(args.onnxobq) if args.quantize else []
    failed = False
    for spec in args.quantize:
        result = quantize(spec, fp32, calib, args.out, cli)
        failed |= result["returncode"] != 0 or not Path(result["path"]).is_file()
        models.append(result)
    models += [{"name": p.stem, "path": str(p)} for p in args.models]

    rows, eval_failed = evaluate_models(models, data, charset, args.threads, args.show_errors)
    failed |= eval_failed
    print()
    print_table(rows, sets)

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        report = {
            "benchmark": "ppocrv4_rec", "lines": args.lines, "seed": args.seed,
            "calib_lines": args.calib_lines, "calib_seed": args.calib_seed, "calib": str(calib),
            "python": platform.python_version(), "onnxruntime": ort.__version__,
            "labels": {s: [t for _, t in data[s]] for s in sets}, "models": rows,
        }
        args.json.write_text(json.dumps(report, indent=1))
        print(f"wrote {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
