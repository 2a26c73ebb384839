"""BatchNorm's graph surgery: the BN nodes, and the train-mode model that measures them in one pass.

Built with onnx-graphsurgeon; the pass itself runs in bn.passes.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..export import build_model
from ..export.graph_edit import node_of
from ..graph.layers import constant_holder
from ..types import QuantizedLayer
from .stats import VAR_FLOOR, Moments


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
    params: tuple[str, ...] = ()   # the names of its scale, bias, mean and variance tensors


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
    """Every BatchNormalization whose parameters are constants and whose input a node computes,
    with the quantized Conv it follows (none of the ``fixed`` ones: layer name -> why, see
    fixed_conv)."""
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
        if not x.inputs:    # a graph input: quantization leaves its statistics as they are
            continue
        follows = x.name in convs and len(x.outputs) == 1 and x.name not in outputs
        values = [np.asarray(h.values, np.float64).reshape(-1) for h in holders]
        found.append(BNNode(x.name, node.outputs[0].name, float(node.attrs.get("epsilon", 1e-5)),
                            *values, np.dtype(holders[0].values.dtype), x.name if follows else None,
                            tuple(t.name for t in node.inputs[1:5])))
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


def train_mode_model(model: onnx.ModelProto, qlayers: list[QuantizedLayer], bns: list[BNNode], targets: dict,
                     mode: str, opset: int, symmetric: bool) -> tuple[onnx.ModelProto, dict, dict]:
    """The fake-quantized model (of the float ``model`` and ``qlayers``), rewired by
    train_mode_edit as it is built: (model, captures, feeds), as train_mode_edit returns them."""
    found = {}

    def edit(graph):
        found["captures"], found["feeds"] = train_mode_edit(graph, bns, targets, mode, opset)

    stats_model = build_model(model, qlayers, "fake", opset, symmetric, edit=edit)
    return stats_model, found["captures"], found["feeds"]


def train_mode_edit(graph: gs.Graph, bns: list[BNNode], targets: dict, mode: str, opset: int) -> tuple[dict, dict]:
    """Rewire a quantized model's graph (in place) so that one pass measures every statistic in order.

    Each tensor to correct -- every corrected Conv's output, and in "match" mode every BN's
    input -- is renamed to a raw tensor and then normalised, per channel, to the mean and
    std that the float model has on the same batch (fed as extra inputs). Later layers
    therefore see what they would see with every earlier correction in place. In
    "reestimate" mode each BN instead normalises with its batch's own statistics, as a
    PyTorch train-mode pass does. The pass reads each normalisation's own batch mean,
    variance and shape (batch_statistics), not the tensor it normalises.

    Args:
        graph: the quantized (fake) model's graph.
        bns: its BatchNormalization nodes.
        targets: Conv output tensor -> dtype, for the Convs to correct.
        mode: "reestimate" or "match".
        opset: the model's opset.

    Returns:
        (captures, feeds): for each tensor measured, the tag of its normalisation subgraph and
        its ONNX type; tensor -> (mean input, std input) to feed.
    """
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
    return captures, feeds


def conv_bias(graph: gs.Graph, q: QuantizedLayer) -> np.ndarray | None:
    """A Conv's current bias (zeros where it has none); None where the bias is not a constant."""
    if q.bias is not None:
        return q.bias
    if q.layer.bias is None:
        return np.zeros(len(q.scale))
    holder = constant_holder(node_of(graph, q.layer).inputs[2])
    return None if holder is None else np.asarray(holder.values, np.float64).reshape(-1)
