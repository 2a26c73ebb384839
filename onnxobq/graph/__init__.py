"""Everything that reads or edits ONNX graphs: load/save and the layer scan."""
from .fold import fold_weights, scan_folded
from .io import load, load_model, save_model, uses_external_data
from .layers import scan_layers, weight_values

__all__ = ["fold_weights", "scan_folded", "load", "load_model", "save_model",
           "uses_external_data", "scan_layers", "weight_values"]
