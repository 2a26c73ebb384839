"""Opset checks and conversion for the QDQ format."""
from __future__ import annotations

import onnx
from onnx import version_converter

from ..errors import UserError

QDQ_MIN_OPSET = 13     # per-channel DequantizeLinear (the axis attribute)
INT4_MIN_OPSET = 21    # INT4/UINT4 tensors
BLOCKED_MIN_OPSET = 21  # DequantizeLinear's block_size (a scale per group of columns)
FP16_SCALE_OPSET = 19  # DequantizeLinear producing float16


def model_opset(model: onnx.ModelProto) -> int:
    """The default-domain opset of a model."""
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx"):
            return int(op.version)
    return 1


def prepare_opset(model: onnx.ModelProto, fmt: str, wanted: int | None,
                  activations: bool = False, grouped: str = "") -> onnx.ModelProto:
    """Convert the model to the opset the output needs.

    Args:
        model: the loaded model.
        fmt: "qdq" needs opset 13 or later for per-channel DequantizeLinear; "fake" needs nothing.
        wanted: an explicit --opset, or None.
        activations: the output quantizes activations too (QuantizeLinear, opset 13 or later
            in either format).
        grouped: the option that gives some layer a scale per group of columns
            ("--group-size" or "--layer-group-size"; "": none), which "qdq" stores with
            DequantizeLinear's block_size (opset 21 or later).

    Returns:
        The model itself, or a converted copy.

    Raises:
        UserError: the conversion is impossible (--opset below the model's or past what the
            installed onnx knows, or no adapter), or --opset is below what QDQ needs.
    """
    current = model_opset(model)
    target = wanted if wanted is not None else current
    if wanted is not None and wanted < current:
        raise UserError(f"--opset {wanted}: the model already uses opset {current}; "
                        "onnxobq only converts upwards")
    newest = onnx.defs.onnx_opset_version()
    if wanted is not None and wanted > newest:
        raise UserError(f"--opset {wanted}: the installed onnx {onnx.__version__} knows opsets up to {newest}; "
                        f"give {newest} or less")
    if fmt == "qdq" and wanted is not None and wanted < QDQ_MIN_OPSET:
        raise UserError(f"--opset {wanted}: QDQ weights need opset {QDQ_MIN_OPSET} or later (per-channel "
                        f"DequantizeLinear); give --opset {QDQ_MIN_OPSET} or later, or --format fake")
    if activations and wanted is not None and wanted < QDQ_MIN_OPSET:
        raise UserError(f"--opset {wanted}: --act-bits needs opset {QDQ_MIN_OPSET} or later "
                        f"(QuantizeLinear on the activations); give --opset {QDQ_MIN_OPSET} or later, "
                        "or drop --act-bits")
    blocked = fmt == "qdq" and grouped
    if blocked and wanted is not None and wanted < BLOCKED_MIN_OPSET:
        raise UserError(f"--opset {wanted}: {grouped} needs opset {BLOCKED_MIN_OPSET} or later in QDQ "
                        f"(DequantizeLinear's block_size); give --opset {BLOCKED_MIN_OPSET} or later, "
                        "or --format fake")
    if fmt == "qdq" or activations:
        target = max(target, BLOCKED_MIN_OPSET if blocked else QDQ_MIN_OPSET)
    if target == current:
        return model
    try:
        converted = version_converter.convert_version(model, target)
        onnx.checker.check_model(converted)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        fix = "--format fake without --act-bits" if activations else "--format fake"
        raise UserError(f"cannot convert the model from opset {current} to {target} ({first}); "
                        f"use {fix}, which keeps the opset") from None
    return converted
