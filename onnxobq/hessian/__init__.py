"""The Hessians' numerics: im2col, shifted products, running sums. NumPy and backend only."""
from .sums import HessianSum, Products, accumulate, gather_columns, merge_sums
from .shifted import shifted_products, shifts_pay
from .unfold import conv_outputs, conv_pads, layer_columns, unfold

__all__ = ["HessianSum", "Products", "accumulate", "gather_columns", "merge_sums", "shifted_products",
           "shifts_pay", "conv_outputs", "conv_pads", "layer_columns", "unfold"]
