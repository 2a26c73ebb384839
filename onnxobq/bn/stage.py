"""The BatchNorm stage: re-estimate BN statistics after quantization (the seed paper's section 6.1).

- An explicit BatchNormalization node gets new running statistics measured on the
  quantized model. Where it directly follows a quantized Conv it is then folded
  into that Conv: the integer codes stay, the channel's scale and bias absorb it.
- A quantized Conv with no BatchNormalization after it (the exporter folded it) is
  corrected per output channel so that its output mean and std on the calibration
  data match the float model's: scale and bias by a = sigma_fp / sigma_q, then the
  bias shifted by mu_fp - a * mu_q.

Every correction changes what later layers see, so the statistics must be gathered with the
earlier corrections in place. The paper gets that from a PyTorch train-mode pass, where each
BN normalises with its batch's statistics. Here the same pass is built in ONNX (bn.graph):
every BN (and every corrected Conv) is replaced by a subgraph that normalises with the batch's
statistics, and the population statistics of the tensors before them are accumulated over the
calibration data (bn.passes, bn.stats). That takes one pass whatever the depth.

The output error against the float model is measured before and after, and the result is
kept only where it lowers that error by at least 1%.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..backend import Device, choose_device
from ..calibration import CalibConfig, Replay, spread
from ..config import BNConfig
from ..errors import option
from ..export import build_model
from ..runtime import model_inputs
from ..types import BNEdit, QuantizedLayer
from .graph import conv_bias, find_bn_nodes, fixed_conv, train_mode_model
from .passes import float_reference, output_error, train_mode_moments
from .stats import MEASURED_STD, bn_statistics, conv_measured, fold_affine, std_factor, trained_std_shift

# Keep the result only if it lowers the output error on the calibration data by 1% or more:
# a change within noise there is no evidence that it helps on other data.
KEEP_RATIO = 0.99
# The BN passes need samples that differ: where the float inputs' elements vary over the samples
# by less than this fraction of their RMS, they measure no statistics (4 constant images: 0;
# with noise of 1e-3 added: 8.7e-4; the classifier's 32 calibration lines: 0.57).
MIN_SPREAD = 0.01
# Nor where the BNs' inputs have stds on the calibration data unlike the trained ones: where the
# median over their channels of |log(std / trained std)| is over this. The classifier's 32
# calibration lines: 0.096, its 64 evaluation lines 0.10; 4 noise images around -1 (std 0.1): 0.49,
# where the corrections kept on them took its SQNR on the evaluation lines from 21.0 to 8.9 dB.
MAX_TRAINED_SHIFT = 0.3
# The passes over the BN samples: the float reference, the output error before, the train-mode
# model's moments, the output error after (for the progress bar's total).
PASSES = 4


@dataclass
class BNOutcome:
    """What re-estimation found: the re-estimated layers and BN edits, the output error
    before and after, and whether they are worth keeping (the error went down)."""

    qlayers: list[QuantizedLayer]
    edits: tuple = ()
    error_before: float | None = None
    error_after: float | None = None
    kept: bool = False
    reestimated: int = 0
    folded: int = 0
    corrected: int = 0
    samples: int = 0          # the calibration samples its passes ran on
    notes: list[str] = field(default_factory=list)


def reestimate(model: onnx.ModelProto, qlayers: list[QuantizedLayer], cfg: BNConfig,
               calib: CalibConfig | Replay, opset: int, symmetric: bool, device: Device | None = None,
               on_batch=None) -> BNOutcome:
    """Re-estimate BatchNorm statistics of the quantized model and keep them if they help.

    Args:
        model: the float model.
        qlayers: the solved layers.
        cfg: what to re-estimate, fold and correct.
        calib: calibration data (the same the Hessians came from), or a Replay of it; the
            passes run on ``cfg.samples`` of its samples, spread over it, where that is set.
        opset, symmetric: as for the export.
        device: the onnxruntime choice, cores and tuning (default: the CPU's).
        on_batch: called with the batch size after every batch of every pass (progress bars).

    Returns:
        BNOutcome with the re-estimated layers and BN edits; ``kept`` says whether they
        lowered the output error (the caller exports the input layers otherwise).
    """
    device = device or choose_device("cpu")
    graph = gs.import_onnx(model)
    tensors = graph.tensors()
    fixed = {q.layer.name: why for q in qlayers if q.layer.op == "Conv" and (why := fixed_conv(tensors, q.layer))}
    bns = find_bn_nodes(graph, qlayers, fixed)
    after_bn = {bn.input for bn in bns}
    targets = {q.layer.output: np.dtype(q.layer.dtype) for q in qlayers
               if cfg.correct_folded and q.layer.op == "Conv" and q.layer.output not in after_bn
               and q.layer.name not in fixed}
    outcome = BNOutcome(qlayers=qlayers)
    if cfg.fold or cfg.correct_folded:
        outcome.notes = [f"{name}: neither corrected nor given a BN fold ({why})" for name, why in fixed.items()]
    if not bns and not targets:
        outcome.notes.append("no BatchNormalization nodes and no Convs to correct")
        return outcome
    fp_names = {t: onnx.helper.np_dtype_to_tensor_dtype(d) for t, d in targets.items()}
    fp_names.update({bn.input: onnx.helper.np_dtype_to_tensor_dtype(bn.dtype) for bn in bns})
    calib = spread(calib, cfg.samples, model_inputs(model))
    ref = float_reference(model, fp_names, calib, device, on_batch)
    outcome.samples = ref.samples
    if ref.samples == 0:
        outcome.notes.append("skipped: the BN samples make no whole batch of the model's fixed batch; "
                             f"give {option('bn_samples', 'None')}")
        return outcome
    if (diversity := ref.input_spread()) < MIN_SPREAD:
        same = "all the same" if diversity == 0 else f"nearly the same (they differ by {diversity:.2g} of their RMS)"
        outcome.notes.append(f"skipped: the calibration samples are {same}, which measures no statistics; "
                             "give samples like those the model sees in use")
        return outcome
    if bns and (shift := trained_std_shift(bns, ref.moments)) > MAX_TRAINED_SHIFT:
        factor = np.exp(min(shift, 700.0))
        outcome.notes.append("skipped: the calibration data does not look like the data the model was trained on "
                             f"(its BatchNorm inputs' std differs from the trained one by a factor of {factor:.3g}, "
                             "the median over their channels); check its pre-processing")
        return outcome
    q_model = build_model(model, qlayers, "fake", opset, symmetric)
    outcome.error_before = output_error(ref, model, q_model, calib, device, on_batch)
    if not np.isfinite(outcome.error_before):
        outcome.notes.append("skipped: the model's outputs are not finite on the calibration data")
        outcome.error_before = None
        return outcome
    del q_model         # each model is a copy of the weights: the float model and one other are held at once
    stats_model, captures, feeds = train_mode_model(model, qlayers, bns, targets, cfg.mode, opset, symmetric)
    q_m = train_mode_moments(stats_model, captures, feeds, ref, calib, device, on_batch)
    del stats_model
    current, edits, folded, notes = _updates(graph, bns, targets, ref.moments, q_m, cfg, qlayers)
    q_model = build_model(model, current, "fake", opset, symmetric, edits)
    outcome.error_after = output_error(ref, model, q_model, calib, device, on_batch)
    outcome.kept = outcome.error_after < KEEP_RATIO * outcome.error_before
    corrected = sum(c is not q for c, q in zip(current, qlayers) if q.layer.output in targets)
    outcome.reestimated, outcome.folded, outcome.corrected = len(bns), folded, corrected
    outcome.notes, outcome.qlayers, outcome.edits = outcome.notes + notes, current, edits
    return outcome


def _updates(graph, bns, targets, fp_m, q_m, cfg: BNConfig, qlayers):
    """BN edits and corrected layers from the float and train-mode passes' moments."""
    new = {q.layer.output: q for q in qlayers}
    edits, folded, notes, kept = [], 0, [], 0
    for name in targets:
        q = new[name]
        bias = conv_bias(graph, q)
        if bias is None:
            notes.append(f"{q.layer.name}: not corrected (its bias is computed at run time)")
            continue
        moments = (fp_m[name].mean(), fp_m[name].var(), q_m[name].mean(), q_m[name].var())
        if not all(np.isfinite(m).all() for m in moments):
            notes.append(f"{q.layer.name}: not corrected (its outputs are not finite on the calibration data)")
            continue
        sd_fp, sd_q = np.sqrt(fp_m[name].var()), np.sqrt(q_m[name].var())
        a = np.where(conv_measured(fp_m[name]), std_factor(sd_fp, sd_q), 1.0)
        new[name] = fold_affine(q, bias, a, fp_m[name].mean() - a * q_m[name].mean())
    for bn in bns:
        mean, var, unmeasured = bn_statistics(bn, fp_m.get(bn.input), q_m[bn.input], cfg.mode)
        kept += unmeasured
        fold_into = None
        if cfg.fold and bn.conv is not None:
            q = new[bn.conv]
            bias = conv_bias(graph, q)
            a = bn.gamma / np.sqrt(var + bn.epsilon)
            done = None if bias is None else fold_affine(q, bias, a, bn.beta - mean * a)
            if done is None:
                notes.append(f"{bn.output}: kept as a node (its Conv cannot absorb a negative scale)")
            else:
                new[bn.conv], fold_into = done, bn.conv
                folded += 1
        edits.append(BNEdit(bn.output, mean, var, fold_into, bn.params))
    if kept:
        notes.append(f"{kept} BN channel{'s' * (kept > 1)} kept their trained statistics: their std on the "
                     f"calibration data is under {MEASURED_STD} of the trained one")
    return [new[q.layer.output] for q in qlayers], tuple(edits), folded, notes
