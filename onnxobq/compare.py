"""Output agreement between a float model and its quantized version on the same data."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from .calibration import CalibConfig, batches, feed_samples
from .capture import model_inputs, run, side_by_side, side_sessions
from .errors import UserError
from .graph import load_model


@dataclass
class OutputAgreement:
    """Running sums for one output tensor.

    SQNR is 10 log10(sum y^2 / sum (y - y_q)^2) over everything; cosine is the mean
    over samples of the cosine of the flattened sample; top-1 is the rate at which the
    argmax over the last axis agrees, for classifier-like outputs only.
    """

    name: str
    signal: float = 0.0
    noise: float = 0.0
    cosines: list = field(default_factory=list)
    agree: int = 0
    positions: int = 0
    classifier: bool = True

    def add(self, y: np.ndarray, yq: np.ndarray) -> None:
        y, yq = y.astype(np.float64), yq.astype(np.float64)
        self.signal += float((y * y).sum())
        self.noise += float(((y - yq) ** 2).sum())
        a, b = y.reshape(len(y), -1), yq.reshape(len(yq), -1)
        denom = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
        self.cosines.extend(np.where(denom > 0, (a * b).sum(axis=1) / np.maximum(denom, 1e-300), 1.0))
        self.classifier &= classifier_like(y)
        if self.classifier:
            self.agree += int((y.argmax(axis=-1) == yq.argmax(axis=-1)).sum())
            self.positions += int(np.prod(y.shape[:-1]))

    def result(self) -> dict:
        sqnr = float("inf") if self.noise == 0 else 10 * np.log10(self.signal / self.noise)
        return {"output": self.name, "sqnr_db": float(sqnr),
                "cosine": float(np.mean(self.cosines)) if self.cosines else None,
                "top1_agreement": (self.agree / self.positions) if self.classifier and self.positions else None}


def classifier_like(y: np.ndarray) -> bool:
    """(N, K) scores, or (N, ..., K) probabilities (each last-axis row sums to 1)."""
    if y.ndim < 2 or y.shape[-1] < 2:
        return False
    if y.ndim == 2:
        return True
    sums = y.sum(axis=-1)
    return bool((y >= 0).all() and np.allclose(sums, 1.0, atol=1e-3))


def compare_models(float_path: str, quant_path: str, calib: CalibConfig, device: str = "cpu",
                   on_batch=None) -> list[dict]:
    """Run both models on the same batches and measure, per output, how far apart they are.

    Returns:
        One dict per float output: output, sqnr_db, cosine, top1_agreement (None where
        the output is not classifier-like).
    """
    fp, q = load_model(float_path), load_model(quant_path)
    names = [o.name for o in fp.graph.output if np.issubdtype(_np_type(o), np.floating)]
    q_names = {o.name for o in q.graph.output}
    missing = [n for n in names if n not in q_names]
    if missing:
        raise UserError(f"{quant_path}: has no output {missing[0]!r} of {float_path}; "
                        "compare a model with its own quantized version")
    inputs = model_inputs(fp)
    if model_inputs(q) != inputs:
        raise UserError(f"{quant_path}: its inputs ({_described(model_inputs(q))}) are not those of {float_path} "
                        f"({_described(inputs)}); compare a model with its own quantized version")
    pairs = list(zip(side_sessions(fp, {}, device, calib, inputs), side_sessions(q, {}, device, calib, inputs)))

    def both(pair, feed):
        return run(pair[0], names, feed), run(pair[1], names, feed), feed_samples(feed)

    acc = {n: OutputAgreement(n) for n in names}
    for a, b, count in side_by_side(both, batches(calib, inputs), pairs):
        for n in names:
            acc[n].add(a[n], b[n])
        if on_batch:
            on_batch(count)
    return [acc[n].result() for n in names]


def _described(inputs) -> str:
    return ", ".join(f"{i.name} [{', '.join('?' if d is None else str(d) for d in i.shape)}] {i.dtype}" for i in inputs)


def _np_type(value_info) -> np.dtype:
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(value_info.type.tensor_type.elem_type))
