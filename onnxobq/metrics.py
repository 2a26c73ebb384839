"""How far a quantized model's outputs are from the float model's: written once, NumPy only.

SQNR is 10 log10(sum y^2 / sum (y - y_q)^2) over everything; the relative error is its
inverse before the log. BatchNorm's keep rule, ``compare`` and the report all use these.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


def sqnr_db(rel_error: float) -> float:
    """Signal-to-quantization-noise ratio in dB from a relative squared error (inf for none)."""
    return math.inf if rel_error <= 0 else -10.0 * math.log10(rel_error)


@dataclass
class SignalNoise:
    """Running sums of y^2 (signal) and (y - y_q)^2 (noise), in float64."""

    signal: float = 0.0
    noise: float = 0.0

    def add(self, y: np.ndarray, yq: np.ndarray) -> None:
        """Add one batch of a float output ``y`` and its quantized ``yq`` (NaN or Inf make the
        sums non-finite, which the callers report)."""
        with np.errstate(invalid="ignore", over="ignore"):
            f = np.asarray(y, np.float64)       # no copy where the caller converted already
            d = f - np.asarray(yq, np.float64)
            self.noise += float((d * d).sum())
            self.signal += float((f * f).sum())

    def merge(self, other: "SignalNoise") -> None:
        self.signal += other.signal
        self.noise += other.noise

    def relative(self) -> float:
        """noise / signal (0 for a zero signal; NaN where either sum is not finite)."""
        if not (math.isfinite(self.noise) and math.isfinite(self.signal)):
            return float("nan")
        return self.noise / self.signal if self.signal > 0 else 0.0

    def sqnr_db(self) -> float:
        if self.noise == 0:
            return math.inf
        with np.errstate(divide="ignore", invalid="ignore"):
            return float(10 * np.log10(self.signal / self.noise))


@dataclass
class OutputAgreement(SignalNoise):
    """SQNR, cosine and top-1 agreement of one output tensor over the samples.

    The cosine is the mean over samples of the cosine of the flattened sample; top-1 is the rate
    at which the argmax over the last axis agrees, for classifier-like outputs only (see
    classifier_like).
    """

    name: str = ""
    cosines: list = field(default_factory=list)
    agree: int = 0
    positions: int = 0
    classifier: bool = True

    def add(self, y: np.ndarray, yq: np.ndarray) -> None:
        y, yq = y.astype(np.float64), yq.astype(np.float64)
        super().add(y, yq)
        a, b = y.reshape(len(y), -1), yq.reshape(len(yq), -1)
        denom = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
        self.cosines.extend(np.where(denom > 0, (a * b).sum(axis=1) / np.maximum(denom, 1e-300), 1.0))
        self.classifier &= classifier_like(y)
        if self.classifier:
            self.agree += int((y.argmax(axis=-1) == yq.argmax(axis=-1)).sum())
            self.positions += int(np.prod(y.shape[:-1]))

    @property
    def cosine(self) -> float | None:
        return float(np.mean(self.cosines)) if self.cosines else None

    @property
    def top1(self) -> float | None:
        return (self.agree / self.positions) if self.classifier and self.positions else None


def classifier_like(y: np.ndarray) -> bool:
    """(N, K) scores, or (N, ..., K) probabilities (each last-axis row sums to 1)."""
    if y.ndim < 2 or y.shape[-1] < 2:
        return False
    if y.ndim == 2:
        return True
    sums = y.sum(axis=-1)
    return bool((y >= 0).all() and np.allclose(sums, 1.0, atol=1e-3))
