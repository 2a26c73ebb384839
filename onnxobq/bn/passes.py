"""BatchNorm's passes over the calibration data on onnxruntime.

The float reference (its moments and outputs), the output error of a quantized model, and the
train-mode model's moments.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..backend import Device
from ..calibration import CalibConfig, Replay, batch_size_for, batches, feed_samples
from ..metrics import SignalNoise
from ..runtime import model_inputs, run, side_by_side, side_sessions
from .graph import batch_statistics, statistics_outputs
from .stats import VAR_FLOOR, Moments


def _batch_moments(m: Moments, dtype):
    """A batch's per-channel mean and std, shaped (1, C, 1) for the train-mode model."""
    return (m.mean().reshape(1, -1, 1).astype(dtype),
            np.sqrt(m.var() + VAR_FLOOR).reshape(1, -1, 1).astype(dtype))


@dataclass
class FloatReference:
    """The float model on the calibration data, gathered in one pass.

    Attributes:
        moments: population moments of the measured tensors.
        batch_moments: per batch, tensor -> (mean, std) shaped (1, C, 1), to feed the
            train-mode model.
        outputs: per batch, the model's float outputs; None when they did not fit in
            Tuning.output_cache_bytes (the later passes then run the float model again).
        inputs: by float input, the moments of each of its elements over the samples.
    """

    moments: dict
    batch_moments: list
    outputs: list | None
    samples: int = 0
    inputs: dict = field(default_factory=dict)

    def input_spread(self) -> float:
        """How much the samples differ: the RMS over the float inputs' elements of their std over
        the samples, against the RMS of the elements (0 where every sample is the same)."""
        var = sum(float(m.var().sum()) for m in self.inputs.values())
        power = sum(float((m.var() + m.mean() ** 2).sum()) for m in self.inputs.values())
        return float(np.sqrt(var / power)) if power > 0 and np.isfinite(power) else 0.0


def float_reference(model, names: dict, calib: CalibConfig | Replay, device: Device, on_batch=None) -> FloatReference:
    """Run the float model once, measuring ``names`` (tensor -> ONNX type) and keeping its outputs."""
    outs = [o.name for o in model.graph.output]
    inputs = model_inputs(model)

    def measure(sess, feed):
        got = run(sess, outs + list(names), feed)
        batch = {n: Moments.of(got[n], device.tuning.squares_run) for n in names}
        return batch, {n: _batch_moments(batch[n], got[n].dtype) for n in names}, {n: got[n] for n in outs}, feed

    ref = FloatReference({n: Moments() for n in names}, [], [])
    kept = 0
    sessions = side_sessions(model, names, device, batch_size_for(calib, inputs))
    for batch, batch_moments, outputs, feed in side_by_side(measure, batches(calib, inputs), sessions):
        for n in names:
            ref.moments[n].add(batch[n])
        ref.batch_moments.append(batch_moments)
        if ref.outputs is not None:
            kept += sum(a.nbytes for a in outputs.values())
            if kept <= device.tuning.output_cache_bytes:
                ref.outputs.append(outputs)
            else:
                ref.outputs = None   # too big to keep: output_error runs the float model again
        n = feed_samples(feed)
        ref.samples += n
        for name, a in feed.items():
            if np.issubdtype(a.dtype, np.floating) and a.ndim:
                ref.inputs.setdefault(name, Moments()).add(Moments.of(a.reshape(a.shape[0], -1, 1)))
        if on_batch:
            on_batch(n)
    return ref


def output_error(ref: FloatReference, model, q_model, calib: CalibConfig | Replay, device: Device,
                 on_batch=None) -> float:
    """Relative squared error of the quantized model's outputs against the float model's over
    the samples of ``ref`` (NaN when either is not finite)."""
    outs = [o.name for o in model.graph.output]
    inputs = model_inputs(model)

    def compare(pair, item):
        (q_sess, fp_sess), (i, feed) = pair, item
        fo = run(fp_sess, outs, feed) if fp_sess is not None else ref.outputs[i]
        qo = run(q_sess, outs, feed)
        batch = SignalNoise()
        for n in outs:
            if np.issubdtype(fo[n].dtype, np.floating):
                batch.add(fo[n], qo[n])
        return batch, feed_samples(feed)

    batch = batch_size_for(calib, inputs)
    q_sessions = side_sessions(q_model, {}, device, batch)
    fp_sessions = side_sessions(model, {}, device, batch) if ref.outputs is None else [None] * len(q_sessions)
    total = SignalNoise()
    for part, n in side_by_side(compare, enumerate(batches(calib, inputs)), list(zip(q_sessions, fp_sessions))):
        total.merge(part)
        if on_batch:
            on_batch(n)
    return total.relative()


def train_mode_moments(stats_model, captures: dict, feeds: dict, ref: FloatReference, calib: CalibConfig | Replay,
                       device: Device, on_batch=None) -> dict:
    """Population moments of the captured tensors in the train-mode model, fed the float
    model's per-batch moments, by the tensor they stand for."""
    names = statistics_outputs(captures)
    inputs = [spec for spec in model_inputs(stats_model) if not spec.name.startswith("_obq_")]

    def measure(sess, item):
        i, feed = item
        q_feed = dict(feed)
        for n, (mean_in, std_in) in feeds.items():
            q_feed[mean_in], q_feed[std_in] = ref.batch_moments[i][n]
        got = run(sess, list(names), q_feed)
        return {n: batch_statistics(got, tag) for n, (tag, _) in captures.items()}, feed_samples(feed)

    moments = {n: Moments() for n in captures}
    sessions = side_sessions(stats_model, names, device, batch_size_for(calib, inputs))
    for batch, n in side_by_side(measure, enumerate(batches(calib, inputs)), sessions):
        for name in captures:
            moments[name].add(batch[name])
        if on_batch:
            on_batch(n)
    return moments
