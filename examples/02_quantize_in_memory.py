"""Quantize with calibration data that lives in memory, and get the model back in memory.

Any iterable of dicts keyed by input name works (a list, a generator, a DataLoader of NumPy
arrays), as does onnxruntime's CalibrationDataReader protocol (get_next()); the batches are
read one at a time. With no output path, quantize writes nothing and returns the model.

    python examples/02_quantize_in_memory.py [OUT_DIR]
"""
import sys
from pathlib import Path

import numpy as np
import onnx

import onnxobq

MODELS = Path(__file__).resolve().parents[1] / "models" / "ppocr_cls"
out = Path(sys.argv[1] if len(sys.argv) > 1 else "out/examples")
out.mkdir(parents=True, exist_ok=True)
lines = np.load(MODELS / "calib.npz")["x"]                 # (32, 3, 48, 192), already pre-processed


def batches():
    """Eight batches of four lines, as a data loader would give them."""
    for i in range(0, len(lines), 4):
        yield {"x": lines[i:i + 4]}


model = onnx.load(MODELS / "ch_ppocr_mobile_v2.0_cls_infer.onnx")
report = onnxobq.quantize(model, calibration=batches, bits=6, method="gptq")   # a callable: one call per pass
quantized = report.quantized_model
print(f"mean layer error {np.mean([s.error for s in report.layers]):.3e} over {len(report.layers)} layers; "
      f"BatchNorm correction {'kept' if report.bn['kept'] else 'dropped'}")

onnx.save(quantized, out / "cls.w6.gptq.onnx")
result = onnxobq.compare(model, quantized, MODELS / "eval.npz")
print(f"SQNR on held-out lines: {result.outputs[0].sqnr_db:.2f} dB")
