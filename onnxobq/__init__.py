"""onnxobq: Hessian-based (FastOBQ) post-training weight quantization of ONNX models.

The command line is the main interface (``onnxobq quantize MODEL --bits 4 --calib DATA``);
``onnxobq.pipeline.run(QuantizeConfig(...))`` does the same from Python.
"""
import os

# OpenBLAS's idle threads spin for 2^28 cycles (about 0.1 s) after each call. On the CPU,
# every forward pass of the capture follows the Hessian products, so a spinning BLAS thread
# took a core from onnxruntime. 2^20 cycles (under a millisecond) still bridges the solver's
# back-to-back calls. Measured on 2 cores: the YOLOX detector's capture of 48 images took
# 12.0 to 12.2 s instead of 12.7 to 14.7 s; ResNet-50's solve took 32.6 and 34.7 s against
# 32.7 and 32.9 s (2^4 cycles made that solve 36.6 to 38.8 s). This takes effect only if
# NumPy is not loaded yet (as for the command line), and a value the user set wins.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "20")

__version__ = "0.1.0"
