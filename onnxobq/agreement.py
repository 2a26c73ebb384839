"""Output agreement between a float model and its quantized version on the same data."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

from .backend import Device
from .calibration import CalibConfig, batch_size_for, batches, describe, feed_samples
from .errors import UserError, option
from .graph.io import load
from .metrics import OutputAgreement
from .runtime import check_opset, model_inputs, run, side_by_side, side_sessions
from .types import fmt_shape

# The metadata key under which a quantized model records its calibration data (calibration.describe).
CALIBRATION_KEY = "onnxobq.calibration"


@dataclass(frozen=True)
class Agreement:
    """How one output of the quantized model agrees with the float model's.

    Attributes:
        output: the output's name.
        sqnr_db: 10 log10(sum y^2 / sum (y - y_q)^2) over all samples and elements.
        cosine: the mean over samples of the cosine similarity of the flattened outputs.
        top1_agreement: how often the argmax over the last axis is the same; None where the
            output is not classifier-like ((N, K) scores, or probabilities over the last axis).
    """

    output: str
    sqnr_db: float
    cosine: float | None
    top1_agreement: float | None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Comparison:
    """What compare measured, and on what.

    Attributes:
        outputs: one Agreement per floating-point output of the float model.
        samples: the samples both models ran on.
        calibration: the data and its pre-processing (calibration.describe).
        warnings: things that make the figures mean less than they seem (the data is the
            quantized model's own calibration data, say).
    """

    outputs: list[Agreement]
    samples: int = 0
    calibration: dict | None = None
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"outputs": [a.to_dict() for a in self.outputs], "samples": self.samples,
                "calibration": self.calibration, "warnings": self.warnings}


def compare_models(float_model, quant_model, calib: CalibConfig, device: Device, on_batch=None) -> Comparison:
    """Run both models (paths or ModelProtos) on the same batches and measure, per output, how far
    apart they are."""
    fp, fp_name, _ = load(float_model)
    q, q_name, _ = load(quant_model)
    for model, name in ((fp, fp_name), (q, q_name)):
        check_opset(model, name, False, "re-export the model at an older opset")
    names = [o.name for o in fp.graph.output if np.issubdtype(_np_type(o), np.floating)]
    if not names:
        given = ", ".join(f"{o.name!r} ({_np_type(o)})" for o in fp.graph.output)
        raise UserError(f"{fp_name}: has no floating-point output to compare (its outputs: {given}); compare models "
                        "whose outputs are floats, or measure your own metric on their outputs")
    q_names = {o.name for o in q.graph.output}
    missing = [n for n in names if n not in q_names]
    if missing:
        raise UserError(f"{q_name}: has no output {missing[0]!r} of {fp_name}; "
                        "compare a model with its own quantized version")
    inputs = model_inputs(fp)
    if model_inputs(q) != inputs:
        raise UserError(f"{q_name}: its inputs ({_described(model_inputs(q))}) are not those of {fp_name} "
                        f"({_described(inputs)}); compare a model with its own quantized version")
    batch = batch_size_for(calib, inputs)
    pairs = list(zip(side_sessions(fp, {}, device, batch), side_sessions(q, {}, device, batch)))

    def both(pair, feed):
        return run(pair[0], names, feed), run(pair[1], names, feed), feed_samples(feed)

    acc = {n: OutputAgreement(name=n) for n in names}
    samples = 0
    for a, b, count in side_by_side(both, batches(calib, inputs), pairs):
        for n in names:
            acc[n].add(a[n], b[n])
        samples += count
        if on_batch:
            on_batch(count)
    used = describe(calib)
    return Comparison([Agreement(n, acc[n].sqnr_db(), acc[n].cosine, acc[n].top1) for n in names], samples, used,
                      _warnings(q, used))


def _warnings(q: onnx.ModelProto, used: dict) -> list[str]:
    """A warning where the data is the calibration data that the quantized model records."""
    recorded = next((p.value for p in q.metadata_props if p.key == CALIBRATION_KEY), None)
    if recorded is None or used["source"] == "in memory":
        return []
    try:
        quantized_on = json.loads(recorded)
    except ValueError:
        return []
    same = {k: v for k, v in quantized_on.items() if k != "batch_size"} == {
        k: v for k, v in used.items() if k != "batch_size"}
    if not same and not (used["kind"] != "random" and used["source"] == quantized_on.get("source")):
        return []
    again = f"another {option('seed')}" if used["kind"] == "random" else "held-out data"
    return [f"{option('calibration', _shown(used))}: this is the data the model was quantized on, so the figures "
            f"measure the calibration set, not how the model does on other data; give {again}"]


def _shown(described: dict) -> str:
    if described["kind"] == "random":
        return f"random {option('seed', described.get('seed'))}"
    return described["source"]


def _described(inputs) -> str:
    return ", ".join(f"{i.name} {fmt_shape(i.shape)} {i.dtype}" for i in inputs)


def _np_type(value_info) -> np.dtype:
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(value_info.type.tensor_type.elem_type))
