"""Everything that reads or edits ONNX graphs: load/save and the layer scan."""
from .fold import fold_weights, scan_folded
from .io import check_output_path, load_model, save_model, stored_externally, uses_external_data
from .layers import (ConvGeometry, Layer, LayerScan, Skipped, from_matrix, scan_layers,
                     to_matrix, weight_values)

__all__ = ["fold_weights", "scan_folded", "check_output_path", "load_model", "save_model", "stored_externally", "uses_external_data",
           "ConvGeometry", "Layer", "LayerScan", "Skipped", "from_matrix", "scan_layers",
           "to_matrix", "weight_values"]
