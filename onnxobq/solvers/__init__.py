"""Layer solvers behind one registry: rtn, gptq, fastobq, obq.

Each is a pure function ``solve(W, H, grid, *, order, block, damp, xp, kernel) -> Result``
over arrays shaped (G, R, C) and (G, C, C); none imports onnx or writes anything back.
"""
from . import obq, rtn, sweep  # noqa: F401  (importing registers the methods)
from .common import Damping, Result, layer_error
from .orders import ORDERS
from .registry import METHODS, Method

__all__ = ["Damping", "Result", "layer_error", "ORDERS", "METHODS", "Method"]
