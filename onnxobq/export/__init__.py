"""Write quantized weights back into a graph: fake-quantized floats or QDQ integers."""
from .graph_edit import build_model, storage_type
from .opset import model_opset, prepare_opset

__all__ = ["build_model", "storage_type", "model_opset", "prepare_opset"]
