"""onnxobq: Hessian-based (FastOBQ) post-training weight quantization of ONNX models.

    import onnxobq
    report = onnxobq.quantize("model.onnx", "model.w4.onnx", calibration="images/", bits=4)

quantize, capture, inspect and compare are the API (see onnxobq.api); the command line
``onnxobq`` calls the same functions. Importing onnxobq loads nothing else until one of them
is used.
"""
from importlib import import_module

__version__ = "0.1.0"
__all__ = ["quantize", "capture", "inspect", "compare", "Report", "Hessians", "Inspection", "Comparison",
           "ImageOptions", "UserError"]

_WHERE = {"quantize": "api", "capture": "api", "inspect": "api", "compare": "api", "Report": "report",
          "Hessians": "hessians", "Inspection": "inspection", "Comparison": "agreement", "ImageOptions": "config",
          "UserError": "errors"}


def __getattr__(name):
    if name in _WHERE:
        return getattr(import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *__all__])
