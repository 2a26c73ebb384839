"""BatchNorm re-estimation after quantization (the seed paper's section 6.1, in ONNX terms).

- An explicit BatchNormalization node gets new running statistics measured on the
  quantized model. Where it directly follows a quantized Conv it is then folded
  into that Conv: the integer codes stay, the channel's scale and bias absorb it.
- A quantized Conv with no BatchNormalization after it (the exporter folded it) is
  corrected per output channel so that its output mean and std on the calibration
  data match the float model's: scale and bias by a = sigma_fp / sigma_q, then the
  bias shifted by mu_fp - a * mu_q.

Every correction changes what later layers see, so the statistics must be
gathered with the earlier corrections in place. The paper gets that from a
PyTorch train-mode pass, where each BN normalises with its batch's statistics.
Here the same pass is built in ONNX: every BN (and every corrected Conv) is
replaced by a subgraph that normalises with the batch's statistics, and the
population statistics of the tensors before them are accumulated over the
calibration data. That takes one pass whatever the depth.

The output error against the float model is measured before and after, and the
result is kept only where it lowers that error by at least 1%.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .calibration import CalibConfig, Replay, batches, feed_samples, spread
from .capture import model_inputs, run, side_by_side, side_sessions
from .config import BNConfig
from .export import BNEdit, build_model
from .graph.layers import constant_holder
from .solve import QuantizedLayer

VAR_FLOOR = 1e-10  # keeps a dead channel's batch normalisation finite
# Moments.of sums squares in float32 runs of this many values. On the 2-core machine, for a
# random (8, 64, 112, 112) array (a batch of ResNet-50's first conv outputs in shape), it took
# 3.8 ms where float64 sums took 8.3 ms, its sums of squares within 1.3e-7 of float64 ones.
SQUARES_RUN = 4096
# Keep the result only if it lowers the output error on the calibration data by 1% or more:
# a change within noise there is no evidence that it helps on other data.
KEEP_RATIO = 0.99


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
    def of(cls, a: np.ndarray) -> "Moments":
        """The moments of one array in two passes, without a float64 copy of it: each sample's
        channel is summed in the array's dtype (NumPy sums a row pairwise), the sums added in
        float64, for a first mean; then the deviations from it and their squares are summed
        in runs of SQUARES_RUN values (np.einsum sums a run in SIMD lanes, not pairwise), the
        runs' sums in float64 (the corrected two-pass algorithm). Squares of the values
        themselves would cancel where a channel's mean is large against its std."""
        r = a.reshape(a.shape[0], a.shape[1], -1)
        n = a.size // a.shape[1]
        with np.errstate(invalid="ignore", over="ignore"):  # non-finite outputs are reported instead
            first = r.sum(axis=2).sum(axis=0, dtype=np.float64) / max(n, 1)
            shift = first.astype(a.dtype).reshape(1, -1, 1)
            total, m2 = np.zeros(a.shape[1], np.float64), np.zeros(a.shape[1], np.float64)
            for i in range(0, r.shape[2], SQUARES_RUN):
                d = r[:, :, i:i + SQUARES_RUN] - shift
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


@dataclass(frozen=True)
class BNNode:
    """An inference-mode BatchNormalization with constant parameters."""

    input: str
    output: str
    epsilon: float
    gamma: np.ndarray
    beta: np.ndarray
    mean: np.ndarray
    var: np.ndarray
    dtype: np.dtype
    conv: str | None  # output tensor of the quantized Conv it directly follows, if any


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


def fixed_conv(tensors: dict, layer) -> str | None:
    """Why a Conv can take in neither a BN nor a correction, or None: a weight shared by several
    nodes, or a bias that other nodes read too (either edit would change them as well).
    ``tensors``: the graph's tensors by name."""
    if layer.uses:
        return f"its weight is shared by {len(layer.uses) + 1} nodes"
    bias = tensors.get(layer.bias) if layer.bias else None
    if bias is not None and len(bias.outputs) > 1:
        return f"its bias is shared by {len(bias.outputs)} nodes"
    return None


def find_bn_nodes(graph: gs.Graph, qlayers: list[QuantizedLayer], fixed: dict) -> list[BNNode]:
    """Every BatchNormalization whose parameters are constants, with the quantized Conv it follows
    (none of the ``fixed`` ones: layer name -> why, see fixed_conv)."""
    convs = {q.layer.output for q in qlayers if q.layer.op == "Conv" and q.layer.name not in fixed}
    outputs = {t.name for t in graph.outputs}
    found = []
    for node in graph.nodes:
        if node.op != "BatchNormalization" or int(node.attrs.get("training_mode", 0)):
            continue
        holders = [constant_holder(t) for t in node.inputs[1:5]]
        if len(holders) < 4 or any(h is None for h in holders):
            continue
        x = node.inputs[0]
        follows = x.name in convs and len(x.outputs) == 1 and x.name not in outputs
        values = [np.asarray(h.values, np.float64).reshape(-1) for h in holders]
        found.append(BNNode(x.name, node.outputs[0].name, float(node.attrs.get("epsilon", 1e-5)),
                            *values, np.dtype(holders[0].values.dtype), x.name if follows else None))
    return found


# ----------------------------------------------------------------------------- the train-mode pass

def _op(graph: gs.Graph, op: str, inputs: list, out, attrs: dict | None = None):
    """Append a node that writes ``out`` (a new tensor's name, or a Variable); NumPy inputs
    become constants. gs.Graph.layer does the same but lists every tensor of the graph on
    each call, which took 2.5 s of the train-mode model's build for the detector's 83 Convs."""
    y = out if isinstance(out, gs.Variable) else gs.Variable(out)
    ins = [gs.Constant(f"{y.name}_c{i}", v) if isinstance(v, np.ndarray) else v for i, v in enumerate(inputs)]
    graph.nodes.append(gs.Node(op, inputs=ins, outputs=[y], attrs=attrs or {}))
    return y


def _reduce_mean(graph: gs.Graph, x, opset: int, out: str):
    """Mean over axes 0 and 2 of an (N, C, L) tensor, kept as (1, C, 1)."""
    if opset >= 18:
        return _op(graph, "ReduceMean", [x, np.array([0, 2], np.int64)], out, {"keepdims": 1})
    return _op(graph, "ReduceMean", [x], out, {"axes": [0, 2], "keepdims": 1})


def _batch_normalise(graph: gs.Graph, x, y, scale, shift, opset: int, tag: str, dtype) -> None:
    """Make ``y`` = (x - batch mean) / batch std * scale + shift, per channel (axis 1), any rank.

    ``scale`` and ``shift`` are per-channel arrays or (1, C, 1) graph tensors. The batch's
    mean and biased variance, (1, C, 1), and x's shape are the tensors ``{tag}_mean``,
    ``{tag}_var`` and ``{tag}_shape`` (see batch_statistics). The variance is that of the
    centred values: onnxruntime's float32 reductions kept it within 1.5e-5 of float64 sums for a
    channel of mean 5 and std 0.001 over 43,264 values (a scratch check).
    """
    t = lambda s: f"{tag}_{s}"  # noqa: E731
    as_c = lambda v: v.reshape(1, -1, 1).astype(dtype) if isinstance(v, np.ndarray) else v  # noqa: E731
    shape = _op(graph, "Shape", [x], t("shape"))
    x3 = _op(graph, "Reshape", [x, np.array([0, 0, -1], np.int64)], t("x3"))
    mean = _reduce_mean(graph, x3, opset, t("mean"))
    d = _op(graph, "Sub", [x3, mean], t("d"))
    var = _reduce_mean(graph, _op(graph, "Mul", [d, d], t("sq")), opset, t("var"))
    veps = _op(graph, "Add", [var, np.array(VAR_FLOOR, dtype)], t("veps"))
    xn = _op(graph, "Div", [d, _op(graph, "Sqrt", [veps], t("std"))], t("xn"))
    y3 = _op(graph, "Add", [_op(graph, "Mul", [xn, as_c(scale)], t("ys")), as_c(shift)], t("y3"))
    _op(graph, "Reshape", [y3, shape], y)


def statistics_outputs(captures: dict) -> dict[str, int]:
    """The outputs that carry the batch statistics of train_mode_model's ``captures``."""
    out = {}
    for tag, elem in captures.values():
        out |= {f"{tag}_mean": elem, f"{tag}_var": elem, f"{tag}_shape": onnx.TensorProto.INT64}
    return out


def batch_statistics(got: dict, tag: str) -> Moments:
    """One batch's Moments from the outputs of the normalisation subgraph ``tag``."""
    shape = got[f"{tag}_shape"]
    return Moments.of_batch(got[f"{tag}_mean"], got[f"{tag}_var"], int(np.prod(shape)) // int(shape[1]))


def _detach(graph: gs.Graph, name: str, raw_name: str, dtype):
    """Let the producer of tensor ``name`` write ``raw_name`` instead; returns (raw, original)."""
    node = next(n for n in graph.nodes if any(o.name == name for o in n.outputs))
    index = next(i for i, o in enumerate(node.outputs) if o.name == name)
    y = node.outputs[index]
    raw = gs.Variable(raw_name, dtype=dtype)
    node.outputs[index] = raw
    return raw, y


def train_mode_model(q_model: onnx.ModelProto, bns: list[BNNode], targets: dict, mode: str,
                     opset: int) -> tuple[onnx.ModelProto, dict, dict]:
    """The quantized model, rewired so that one pass measures every statistic in order.

    Each tensor to correct -- every corrected Conv's output, and in "match" mode every BN's
    input -- is renamed to a raw tensor and then normalised, per channel, to the mean and
    std that the float model has on the same batch (fed as extra inputs). Later layers
    therefore see what they would see with every earlier correction in place. In
    "reestimate" mode each BN instead normalises with its batch's own statistics, as a
    PyTorch train-mode pass does. The pass reads each normalisation's own batch mean,
    variance and shape (batch_statistics), not the tensor it normalises.

    Args:
        q_model: the quantized (fake) model.
        bns: its BatchNormalization nodes.
        targets: Conv output tensor -> dtype, for the Convs to correct.
        mode: "reestimate" or "match".
        opset: the model's opset.

    Returns:
        (model, captures, feeds): the model; for each tensor measured, the tag of its
        normalisation subgraph and its ONNX type; tensor -> (mean input, std input) to feed.
    """
    graph = gs.import_onnx(q_model)
    matched = dict(targets)
    if mode == "match":
        matched.update({bn.input: bn.dtype for bn in bns})
    captures, feeds = {}, {}
    for i, (name, dtype) in enumerate(matched.items()):
        raw, y = _detach(graph, name, f"_obq_raw{i}", dtype)
        mean = gs.Variable(f"_obq_fpmean{i}", dtype=dtype, shape=[1, "C", 1])
        std = gs.Variable(f"_obq_fpstd{i}", dtype=dtype, shape=[1, "C", 1])
        graph.inputs.extend([mean, std])
        _batch_normalise(graph, raw, y, std, mean, opset, f"_obq_fix{i}", dtype)
        captures[name] = (f"_obq_fix{i}", onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype)))
        feeds[name] = (mean.name, std.name)
    if mode == "reestimate":
        tensors = graph.tensors()
        for i, bn in enumerate(bns):
            node = next(n for n in graph.nodes if n.op == "BatchNormalization" and n.outputs
                        and n.outputs[0].name == bn.output)
            y = node.outputs[0]
            node.outputs.clear()
            _batch_normalise(graph, tensors[bn.input], y, bn.gamma, bn.beta, opset, f"_obq_bn{i}", bn.dtype)
            captures[bn.input] = (f"_obq_bn{i}", onnx.helper.np_dtype_to_tensor_dtype(bn.dtype))
    graph.cleanup().toposort()
    return gs.export_onnx(graph, do_type_check=False), captures, feeds


# ----------------------------------------------------------------------------- passes

def _batch_moments(m: Moments, dtype):
    """A batch's per-channel mean and std, shaped (1, C, 1) for the train-mode model."""
    return (m.mean().reshape(1, -1, 1).astype(dtype),
            np.sqrt(m.var() + VAR_FLOOR).reshape(1, -1, 1).astype(dtype))


# Keep the float model's outputs in memory between passes up to this size; past it they are
# computed again.
OUTPUT_CACHE_BYTES = 512 * 2 ** 20


@dataclass
class FloatReference:
    """The float model on the calibration data, gathered in one pass.

    Attributes:
        moments: population moments of the measured tensors.
        batch_moments: per batch, tensor -> (mean, std) shaped (1, C, 1), to feed the
            train-mode model.
        outputs: per batch, the model's float outputs; None when they did not fit the cache.
    """

    moments: dict
    batch_moments: list
    outputs: list | None
    samples: int = 0


def float_reference(model, names: dict, calib: CalibConfig | Replay, device: str, on_batch=None) -> FloatReference:
    """Run the float model once, measuring ``names`` (tensor -> ONNX type) and keeping its outputs."""
    outs = [o.name for o in model.graph.output]
    inputs = model_inputs(model)

    def measure(sess, feed):
        got = run(sess, outs + list(names), feed)
        batch = {n: Moments.of(got[n]) for n in names}
        return batch, {n: _batch_moments(batch[n], got[n].dtype) for n in names}, {n: got[n] for n in outs}, feed

    ref = FloatReference({n: Moments() for n in names}, [], [])
    kept = 0
    sessions = side_sessions(model, names, device, calib, inputs)
    for batch, batch_moments, outputs, feed in side_by_side(measure, batches(calib, inputs), sessions):
        for n in names:
            ref.moments[n].add(batch[n])
        ref.batch_moments.append(batch_moments)
        if ref.outputs is not None:
            kept += sum(a.nbytes for a in outputs.values())
            if kept <= OUTPUT_CACHE_BYTES:
                ref.outputs.append(outputs)
            else:
                ref.outputs = None   # too big to keep: output_error runs the float model again
        n = feed_samples(feed)
        ref.samples += n
        if on_batch:
            on_batch(n)
    return ref


def output_error(ref: FloatReference, model, q_model, calib: CalibConfig | Replay, device: str, on_batch=None) -> float:
    """Relative squared error of the quantized model's outputs against the float model's over
    the samples of ``ref`` (NaN when either is not finite)."""
    outs = [o.name for o in model.graph.output]
    inputs = model_inputs(model)

    def compare(pair, item):
        (q_sess, fp_sess), (i, feed) = pair, item
        fo = run(fp_sess, outs, feed) if fp_sess is not None else ref.outputs[i]
        qo = run(q_sess, outs, feed)
        err = total = 0.0
        for n in outs:
            if np.issubdtype(fo[n].dtype, np.floating):
                with np.errstate(invalid="ignore", over="ignore"):
                    f = fo[n].astype(np.float64)
                    d = f - qo[n]
                    err += float((d * d).sum())
                    total += float((f * f).sum())
        return err, total, feed_samples(feed)

    q_sessions = side_sessions(q_model, {}, device, calib, inputs)
    fp_sessions = side_sessions(model, {}, device, calib, inputs) if ref.outputs is None else [None] * len(q_sessions)
    err = total = 0.0
    for e, t, n in side_by_side(compare, enumerate(batches(calib, inputs)), list(zip(q_sessions, fp_sessions))):
        err, total = err + e, total + t
        if on_batch:
            on_batch(n)
    if not (np.isfinite(err) and np.isfinite(total)):
        return float("nan")
    return err / total if total > 0 else 0.0


def train_mode_moments(stats_model, captures: dict, feeds: dict, ref: FloatReference, calib: CalibConfig | Replay,
                       device: str, on_batch=None) -> dict:
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
    sessions = side_sessions(stats_model, names, device, calib, inputs)
    for batch, n in side_by_side(measure, enumerate(batches(calib, inputs)), sessions):
        for name in captures:
            moments[name].add(batch[name])
        if on_batch:
            on_batch(n)
    return moments


def bn_statistics(bn: BNNode, fp: Moments | None, q: Moments, mode: str):
    """New running mean and variance for one BN.

    "reestimate" (the paper): the quantized model's own statistics at the BN input.
    "match": statistics that give the BN output the same per-channel mean and std on the
    calibration data as the float model's BN output. The two agree when the calibration
    data has the statistics the BN was trained on; "match" stays right when it does not.
    """
    if mode == "reestimate" or fp is None:
        return q.mean(), q.var()
    with np.errstate(invalid="ignore", over="ignore"):     # non-finite statistics are reported instead
        ratio = np.where(fp.var() > 1e-30, np.sqrt(q.var() / np.maximum(fp.var(), 1e-30)), 1.0)
        var = (bn.var + bn.epsilon) * ratio ** 2 - bn.epsilon
    return q.mean() - (fp.mean() - bn.mean) * ratio, np.maximum(var, 0.0)


def _fold(q: QuantizedLayer, bias: np.ndarray, a: np.ndarray, t: np.ndarray) -> QuantizedLayer | None:
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


def conv_bias(graph: gs.Graph, q: QuantizedLayer) -> np.ndarray | None:
    """A Conv's current bias (zeros where it has none); None where the bias is not a constant."""
    if q.bias is not None:
        return q.bias
    if q.layer.bias is None:
        return np.zeros(len(q.scale))
    node = next(n for n in graph.nodes if n.outputs and n.outputs[0].name == q.layer.output)
    holder = constant_holder(node.inputs[2])
    return None if holder is None else np.asarray(holder.values, np.float64).reshape(-1)


def _updates(graph, bns, targets, fp_m, q_m, cfg: BNConfig, qlayers):
    """BN edits and corrected layers from the float and train-mode passes' moments."""
    new = {q.layer.output: q for q in qlayers}
    edits, folded, notes = [], 0, []
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
        a = np.where(sd_q > 1e-12, sd_fp / np.maximum(sd_q, 1e-12), 1.0)
        new[name] = _fold(q, bias, a, fp_m[name].mean() - a * q_m[name].mean())
    for bn in bns:
        mean, var = bn_statistics(bn, fp_m.get(bn.input), q_m[bn.input], cfg.mode)
        fold_into = None
        if cfg.fold and bn.conv is not None:
            q = new[bn.conv]
            bias = conv_bias(graph, q)
            a = bn.gamma / np.sqrt(var + bn.epsilon)
            done = None if bias is None else _fold(q, bias, a, bn.beta - mean * a)
            if done is None:
                notes.append(f"{bn.output}: kept as a node (its Conv cannot absorb a negative scale)")
            else:
                new[bn.conv], fold_into = done, bn.conv
                folded += 1
        edits.append(BNEdit(bn.output, mean, var, fold_into))
    return [new[q.layer.output] for q in qlayers], tuple(edits), folded, notes


def reestimate(model: onnx.ModelProto, qlayers: list[QuantizedLayer], cfg: BNConfig,
               calib: CalibConfig | Replay, opset: int, symmetric: bool, device: str = "cpu",
               on_batch=None) -> BNOutcome:
    """Re-estimate BatchNorm statistics of the quantized model and keep them if they help.

    Args:
        model: the float model.
        qlayers: the solved layers.
        cfg: what to re-estimate, fold and correct.
        calib: calibration data (the same the Hessians came from), or a Replay of it; the
            passes run on ``cfg.samples`` of its samples, spread over it, where that is set.
        opset, symmetric: as for the export.
        device: onnxruntime device.
        on_batch: called with the batch size after every batch of every pass (progress bars).

    Returns:
        BNOutcome with the re-estimated layers and BN edits; ``kept`` says whether they
        lowered the output error (the caller exports the input layers otherwise).
    """
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
    if cfg.mode == "match":
        fp_names.update({bn.input: onnx.helper.np_dtype_to_tensor_dtype(bn.dtype) for bn in bns})
    calib = spread(calib, cfg.samples, model_inputs(model))
    ref = float_reference(model, fp_names, calib, device, on_batch)
    outcome.samples = ref.samples
    if ref.samples == 0:
        outcome.notes.append("skipped: the BN samples make no whole batch of the model's fixed batch; "
                             "give --bn-samples all")
        return outcome
    q_model = build_model(model, qlayers, "fake", opset, symmetric)
    outcome.error_before = output_error(ref, model, q_model, calib, device, on_batch)
    if not np.isfinite(outcome.error_before):
        outcome.notes.append("skipped: the model's outputs are not finite on the calibration data")
        outcome.error_before = None
        return outcome
    stats_model, captures, feeds = train_mode_model(q_model, bns, targets, cfg.mode, opset)
    q_m = train_mode_moments(stats_model, captures, feeds, ref, calib, device, on_batch)
    current, edits, folded, notes = _updates(graph, bns, targets, ref.moments, q_m, cfg, qlayers)
    q_model = build_model(model, current, "fake", opset, symmetric, edits)
    outcome.error_after = output_error(ref, model, q_model, calib, device, on_batch)
    outcome.kept = outcome.error_after < KEEP_RATIO * outcome.error_before
    corrected = sum(c is not q for c, q in zip(current, qlayers) if q.layer.output in targets)
    outcome.reestimated, outcome.folded, outcome.corrected = len(bns), folded, corrected
    outcome.notes, outcome.qlayers, outcome.edits = outcome.notes + notes, current, edits
    return outcome
