"""Capture the Hessians once, then sweep bit widths and methods without capturing again.

The Hessians depend only on the model and the calibration data, so one capture serves every
setting; each model is compared with the float one on held-out lines.

    python examples/03_capture_once_sweep.py [OUT_DIR]
"""
import sys
from pathlib import Path

import onnxobq

MODELS = Path(__file__).resolve().parents[1] / "models" / "ppocr_cls"
out = Path(sys.argv[1] if len(sys.argv) > 1 else "out/examples")
out.mkdir(parents=True, exist_ok=True)
model, calib, held_out = MODELS / "ch_ppocr_mobile_v2.0_cls_infer.onnx", MODELS / "calib.npz", MODELS / "eval.npz"

hessians = onnxobq.capture(model, calib)
hessians.save(out / "cls.hessians.npz")             # the file --hessians reads
print(hessians)
print(f"{'bits':>4} {'method':>8} {'SQNR dB':>8} {'top-1':>7}")
for bits in (8, 6, 4):
    for method in ("rtn", "gptq", "fastobq"):
        # BatchNorm re-estimation still reads the calibration data; the Hessians are not captured again
        report = onnxobq.quantize(model, calibration=calib, hessians=hessians, bits=bits, method=method)
        (agreement,) = onnxobq.compare(model, report.quantized_model, held_out).outputs
        print(f"{bits:>4} {method:>8} {agreement.sqnr_db:>8.2f} {agreement.top1_agreement:>7.4f}")
