"""BatchNorm's numbers: per-channel moments, new BN statistics, and folds into a quantized Conv.

Moments combine over batches; a per-channel affine map folds into a Conv's scales and bias.
NumPy only.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from ..backend import Tuning
from ..types import QuantizedLayer

VAR_FLOOR = 1e-10  # keeps a dead channel's batch normalisation finite
# A BN channel whose std on the calibration data is under this fraction of its trained std is
# not measured by that data: it keeps its trained statistics. On the bundled classifier's 32
# calibration lines the smallest fraction over its 35 BNs was 0.50; on 4 constant images 0.0098,
# where the quantized std came out 9.4 times the float one.
MEASURED_STD = 0.1
# No correction scales a channel's std by more than this factor, or less than its inverse: on
# real data quantization at 4 bits moved the classifier's BN input std by 0.88 to 1.09.
MAX_STD_FACTOR = 2.0
# A Conv output channel (with no BN to compare with) is measured where its std on the calibration
# data is at least this fraction of the layer's median channel RMS: on the classifier's real lines
# the smallest fraction over its 18 such Convs was 0.042; on 4 constant images with noise of
# 1e-3 added, 1.8e-5 to 8.1e-4.
MEASURED_CONV_STD = 0.01


@dataclass
class Moments:
    """Per-channel statistics of a tensor whose channels are on axis 1: the count of values
    per channel, their mean and their sum of squared deviations from it (M2), in float64.

    Batches combine by Chan, Golub and LeVeque's update (the deviations of the batch means
    from the running mean carry the between-batch part), so no E[x^2] - E[x]^2 over the
    whole data set cancels: a channel whose mean is thousands of times its std keeps its
    variance to the precision of each batch's own.
    """

    count: int = 0
    centre: np.ndarray | None = None
    m2: np.ndarray | None = None

    @classmethod
    def of(cls, a: np.ndarray, squares_run: int = Tuning.squares_run) -> "Moments":
        """The moments of one array in two passes, without a float64 copy of it: each sample's
        channel is summed in the array's dtype (NumPy sums a row pairwise), the sums added in
        float64, for a first mean; then the deviations from it and their squares are summed
        in runs of ``squares_run`` values (np.einsum sums a run in SIMD lanes, not pairwise), the
        runs' sums in float64 (the corrected two-pass algorithm). Squares of the values
        themselves would cancel where a channel's mean is large against its std."""
        r = a.reshape(a.shape[0], a.shape[1], -1)
        n = a.size // a.shape[1]
        with np.errstate(invalid="ignore", over="ignore"):  # non-finite outputs are reported instead
            first = r.sum(axis=2).sum(axis=0, dtype=np.float64) / max(n, 1)
            shift = first.astype(a.dtype).reshape(1, -1, 1)
            total, m2 = np.zeros(a.shape[1], np.float64), np.zeros(a.shape[1], np.float64)
            for i in range(0, r.shape[2], squares_run):
                d = r[:, :, i:i + squares_run] - shift
                total += d.sum(axis=2).sum(axis=0, dtype=np.float64)
                m2 += np.einsum("ncm,ncm->c", d, d)
            offset = total / max(n, 1)
            return cls(n, shift.reshape(-1).astype(np.float64) + offset, np.maximum(m2 - total * offset, 0.0))

    @classmethod
    def of_batch(cls, mean, var, count: int) -> "Moments":
        """The moments of a batch given as its per-channel mean and biased variance over
        ``count`` values a channel (a normalisation subgraph's, see _batch_normalise)."""
        return cls(count, np.asarray(mean, np.float64).reshape(-1), np.asarray(var, np.float64).reshape(-1) * count)

    def add(self, other: "Moments") -> None:
        """Add another batch's moments to these."""
        if other.count == 0:
            return
        if self.count == 0:
            self.count, self.centre, self.m2 = other.count, other.centre, other.m2
            return
        n = self.count + other.count
        with np.errstate(invalid="ignore", over="ignore"):
            delta = other.centre - self.centre
            self.centre = self.centre + delta * (other.count / n)
            self.m2 = self.m2 + other.m2 + delta * delta * (self.count * other.count / n)
        self.count = n

    def mean(self) -> np.ndarray:
        return self.centre

    def var(self) -> np.ndarray:
        with np.errstate(invalid="ignore", over="ignore"):
            return np.maximum(self.m2 / self.count, 0.0)


def bn_statistics(bn, fp: Moments | None, q: Moments, mode: str):
    """New running mean and variance for one BN, and how many of its channels keep their
    trained statistics because the calibration data does not measure them.

    "reestimate" (the paper): the quantized model's own statistics at the BN input.
    "match": statistics that give the BN output the same per-channel mean and std on the
    calibration data as the float model's BN output. The two agree when the calibration
    data has the statistics the BN was trained on; "match" stays right when it does not.

    A channel is measured where its std on the calibration data (the float model's, or the
    quantized one's without it) is at least MEASURED_STD of its trained std; in "match" the
    std's factor is held within MAX_STD_FACTOR.
    """
    trained = np.sqrt(np.asarray(bn.var, np.float64) + bn.epsilon)
    with np.errstate(invalid="ignore", over="ignore"):     # non-finite statistics are reported instead
        measured = np.sqrt((q if mode == "reestimate" or fp is None else fp).var()) >= MEASURED_STD * trained
        if mode == "reestimate" or fp is None:
            mean, var = q.mean(), q.var()
        else:
            ratio = std_factor(np.sqrt(q.var()), np.sqrt(fp.var()))
            mean, var = q.mean() - (fp.mean() - bn.mean) * ratio, (bn.var + bn.epsilon) * ratio ** 2 - bn.epsilon
    mean, var = np.where(measured, mean, bn.mean), np.where(measured, var, bn.var)
    return mean, np.maximum(var, 0.0), int((~measured).sum())


def trained_std_shift(bns, fp: dict) -> float:
    """The median over the channels of ``bns`` of |log(std on the calibration data / trained std)|:
    near 0 where the calibration data has the statistics the BNs were trained on."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        logs = [np.abs(np.log(np.sqrt(fp[bn.input].var()) / np.sqrt(np.asarray(bn.var, np.float64) + bn.epsilon)))
                for bn in bns]
    return float(np.nan_to_num(np.median(np.concatenate(logs)), nan=np.inf))


def conv_measured(fp: Moments) -> np.ndarray:
    """Which output channels of a Conv the calibration data measures (see MEASURED_CONV_STD)."""
    with np.errstate(invalid="ignore", over="ignore"):
        sd = np.sqrt(fp.var())
        return (sd > 0) & (sd >= MEASURED_CONV_STD * np.median(np.sqrt(fp.var() + fp.mean() ** 2)))


def std_factor(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den per channel, 1 where den is 0, held within [1 / MAX_STD_FACTOR, MAX_STD_FACTOR]."""
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        ratio = np.where(den > 0, num / np.where(den > 0, den, 1.0), 1.0)
    return np.clip(ratio, 1 / MAX_STD_FACTOR, MAX_STD_FACTOR)


def fold_affine(q: QuantizedLayer, bias: np.ndarray, a: np.ndarray, t: np.ndarray) -> QuantizedLayer | None:
    """Absorb y -> a*y + t (per output channel) into a quantized Conv with current ``bias``.

    Returns None when a negative factor would push codes off the grid (a symmetric
    full-range channel with a code at qmin cannot be negated).
    """
    rows = a.reshape(a.shape + (1,) * (q.scale.ndim - 1))     # (O, 1) against a scale per group
    codes, zero, scale = q.codes, q.zero, q.scale * rows
    neg = a < 0
    if neg.any():
        flip = neg.reshape(q.channel_shape())
        if -q.qmin > q.qmax and (np.where(flip, codes, q.qmax) == q.qmin).any():
            return None
        codes, zero, scale = np.where(flip, -codes, codes), np.where(rows < 0, -zero, zero), np.abs(scale)
    return dataclasses.replace(q, codes=codes, zero=zero, scale=scale, bias=bias * a + t)
