"""onnxobq: Hessian-based (FastOBQ) post-training weight quantization of ONNX models.

The command line is the main interface (``onnxobq quantize MODEL --bits 4 --calib DATA``);
``onnxobq.pipeline.run(QuantizeConfig(...))`` does the same from Python.
"""
import os

# OpenBLAS's idle threads spin for about 2^28 cycles after each call. On the CPU, every
# forward pass of the capture follows the Hessian products, so a spinning BLAS thread took a
# core from onnxruntime. 2^4 cycles lets them sleep at once. On the YOLOX detector (2 cores,
# 256 images) the capture took 71.2 s instead of 76.5 s, and the solve did not change. This
# only takes effect if NumPy is not loaded yet (as for the command line), and a value
# the user set wins.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

__version__ = "0.1.0"
