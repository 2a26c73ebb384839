"""Compare a quantized model with its float original, and read what the report recorded.

compare runs both models on the same data and measures each output's SQNR, cosine similarity
and top-1 agreement. It says which data and pre-processing it used, and warns when that data
is the one the model was quantized on, which measures the calibration set, not held-out data.

    python examples/04_compare.py [OUT_DIR]
"""
import json
import sys
from pathlib import Path

import onnxobq

MODELS = Path(__file__).resolve().parents[1] / "models" / "ppocr_cls"
out = Path(sys.argv[1] if len(sys.argv) > 1 else "out/examples")
out.mkdir(parents=True, exist_ok=True)
model = MODELS / "ch_ppocr_mobile_v2.0_cls_infer.onnx"

onnxobq.quantize(model, out / "cls.w4.rtn.onnx", calibration=MODELS / "calib.npz", bits=4, method="rtn",
                 report=out / "cls.w4.rtn.json", overwrite=True)
report = json.loads((out / "cls.w4.rtn.json").read_text())
print(f"{report['model']} (sha256 {report['model_sha256'][:12]}...) with onnxobq {report['versions']['onnxobq']}, "
      f"onnxruntime {report['versions']['onnxruntime']}: {report['weights']['quantized']:,} weights quantized, "
      f"{report['weights']['float']:,} parameters left in float")

for data in (MODELS / "eval.npz", MODELS / "calib.npz"):
    result = onnxobq.compare(model, out / "cls.w4.rtn.onnx", data)
    (agreement,) = result.outputs
    print(f"on {result.samples} samples of {Path(result.calibration['source']).name}: "
          f"SQNR {agreement.sqnr_db:.2f} dB, cosine {agreement.cosine:.5f}")
    for warning in result.warnings:
        print(f"  warning: {warning}")
