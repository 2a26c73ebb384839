"""Opset checks and conversion for the QDQ format."""
from __future__ import annotations

import onnx
from onnx import version_converter

from ..errors import UserError, option
from ..graph.io import EXTERNAL_DATA_THRESHOLD, shell_of, tensor_bytes

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


def prepare_opset(model: onnx.ModelProto, fmt: str, wanted: int | None, activations: bool = False,
                  grouped: str = "", int4: bool = False) -> tuple[onnx.ModelProto, str | None]:
    """Convert the model to the opset the output needs.

    Args:
        model: the loaded model.
        fmt: "qdq" needs opset 13 or later for per-channel DequantizeLinear; "fake" needs nothing.
        wanted: an explicit opset, or None.
        activations: the output quantizes activations too (QuantizeLinear, opset 13 or later
            in either format).
        grouped: the option that gives some layer a scale per group of columns (as the caller
            spells it; "": none), which "qdq" stores with DequantizeLinear's block_size (opset 21
            or later).
        int4: store codes of 4 bits and below as INT4, which takes opset 21: the model is
            converted to it where it can be, and kept at its opset (INT8 storage) where the
            conversion fails, with a note saying so.

    Returns:
        (model, note): the model itself or a converted copy, and a note where INT4 storage was
        given up (else None).

    Raises:
        UserError: the conversion is impossible (an opset below the model's or past what the
            installed onnx knows, or no adapter), or the opset is below what QDQ needs.
    """
    current = model_opset(model)
    _check_wanted(current, wanted, fmt, activations, grouped)
    target = wanted if wanted is not None else current
    if fmt == "qdq" or activations:
        target = max(target, BLOCKED_MIN_OPSET if fmt == "qdq" and grouped else QDQ_MIN_OPSET)
    if int4 and target < INT4_MIN_OPSET:
        try:
            return _converted(model, INT4_MIN_OPSET), None
        except UserError as exc:
            why = exc.args[0].split(" (", 1)[1].split("); ", 1)[0]
            note = (f"kept opset {target}: onnx could not convert the model to opset {INT4_MIN_OPSET} for INT4 "
                    f"storage ({why}), so the codes of 4 bits and below are stored in INT8")
            return (model if target == current else _converted(model, target)), note
    return (model if target == current else _converted(model, target, activations)), None


def _check_wanted(current: int, wanted: int | None, fmt: str, activations: bool, grouped: str) -> None:
    """Refuse an explicit opset that the model or the output cannot have."""
    if wanted is None:
        return
    if wanted < current:
        raise UserError(f"{option('opset', wanted)}: the model already uses opset {current}; "
                        "onnxobq only converts upwards")
    newest = onnx.defs.onnx_opset_version()
    if wanted > newest:
        raise UserError(f"{option('opset', wanted)}: the installed onnx {onnx.__version__} knows opsets up to "
                        f"{newest}; give {newest} or less")
    if fmt == "qdq" and wanted < QDQ_MIN_OPSET:
        raise UserError(f"{option('opset', wanted)}: QDQ weights need opset {QDQ_MIN_OPSET} or later (per-channel "
                        f"DequantizeLinear); give {option('opset', QDQ_MIN_OPSET)} or later, or "
                        f"{option('format', 'fake')}")
    if activations and wanted < QDQ_MIN_OPSET:
        raise UserError(f"{option('opset', wanted)}: {option('act_bits')} needs opset {QDQ_MIN_OPSET} or later "
                        f"(QuantizeLinear on the activations); give {option('opset', QDQ_MIN_OPSET)} or later, "
                        f"or drop {option('act_bits')}")
    if fmt == "qdq" and grouped and wanted < BLOCKED_MIN_OPSET:
        raise UserError(f"{option('opset', wanted)}: {grouped} needs opset {BLOCKED_MIN_OPSET} or later in QDQ "
                        f"(DequantizeLinear's block_size); give {option('opset', BLOCKED_MIN_OPSET)} or later, "
                        f"or {option('format', 'fake')}")


def _converted(model: onnx.ModelProto, target: int, activations: bool = False) -> onnx.ModelProto:
    """The model converted to opset ``target``, checked.

    The converter sees the graph with its large initializers as placeholders (external data it
    does not read): its copies of the weights made the conversion peak at 4.3 times them, and it
    cannot take a model past 2 GB. Each keeps its tensor, put back after."""
    current = model_opset(model)
    held = {t.name: t for t in model.graph.initializer if t.ByteSize() > PLACEHOLDER_BYTES}
    shell = shell_of(model)
    for t in model.graph.initializer:
        if t.name not in held:
            shell.graph.initializer.append(t)
            continue
        stand_in = shell.graph.initializer.add(name=t.name, data_type=t.data_type, dims=t.dims,
                                               data_location=onnx.TensorProto.EXTERNAL)
        stand_in.external_data.add(key="location", value=PLACEHOLDER)
    try:
        converted = version_converter.convert_version(shell, target)
        for t in converted.graph.initializer:
            if t.name in held and any(e.key == "location" and e.value == PLACEHOLDER for e in t.external_data):
                t.CopyFrom(held[t.name])
        if tensor_bytes(converted) <= EXTERNAL_DATA_THRESHOLD:      # the checker serialises it
            onnx.checker.check_model(converted)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        fix = f"{option('format', 'fake')} without {option('act_bits')}" if activations else option("format", "fake")
        raise UserError(f"cannot convert the model from opset {current} to {target} ({first}); "
                        f"use {fix}, which keeps the opset") from None
    return converted


# Initializers past this many bytes go through the opset converter as placeholders (_converted).
PLACEHOLDER_BYTES = 1024
PLACEHOLDER = "onnxobq-placeholder"
