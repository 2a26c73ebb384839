"""Quantize an image model to 4 bits, calibrated on a folder of images.

The bundled PP-OCR text-direction classifier takes 48 x 192 text lines, pre-processed as
PaddleOCR does (BGR, (x/255 - 0.5)/0.5, right-padded): the "ppocr" preset. Its input has a
dynamic height and width, so the size is given. The quantized model is then compared with
the float one on 64 held-out lines that were not used to calibrate it.

    python examples/01_quantize_image_folder.py [OUT_DIR]
"""
import sys
from pathlib import Path

import onnxobq

MODELS = Path(__file__).resolve().parents[1] / "models" / "ppocr_cls"
out = Path(sys.argv[1] if len(sys.argv) > 1 else "out/examples")
out.mkdir(parents=True, exist_ok=True)
model = MODELS / "ch_ppocr_mobile_v2.0_cls_infer.onnx"

report = onnxobq.quantize(model, out / "cls.w4.onnx", calibration=MODELS / "calib", bits=4,
                          preprocess={"preset": "ppocr", "size": (48, 192)}, overwrite=True)
print(f"quantized {len(report.layers)} layers on {report.samples} images in {sum(report.stages.values()):.1f} s; "
      f"wrote {report.outputs[0]} ({report.storage})")

result = onnxobq.compare(model, out / "cls.w4.onnx", MODELS / "eval.npz")
for agreement in result.outputs:
    print(f"{agreement.output}: SQNR {agreement.sqnr_db:.2f} dB, top-1 agreement {agreement.top1_agreement:.4f} "
          f"on {result.samples} held-out lines")
