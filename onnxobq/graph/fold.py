"""Fold the constant subgraphs that compute layer weights into initializers.

Some exports compute a weight at run time from constants alone: a Transpose or Reshape of an
initializer, a Cast of float16 storage, or a weight-normalised conv (g * v / ||v||). The
layer scan sees only the node's output, so those layers would stay in float. Here each such
subgraph is evaluated once by onnx-graphsurgeon's constant folding (which runs onnxruntime)
and replaced by the initializer it computes, before the scan.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field, replace

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.logger import G_LOGGER

from .layers import QUANTIZABLE_OPS, LayerScan, constant_holder, scan_layers

# Never folded: the weight is already quantized, or its value is drawn at random.
NOT_FOLDED = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear",
              "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike",
              "Multinomial", "Bernoulli"}
# A constant read by the subgraph and by other nodes too is still folded when it has at most
# this many elements (shapes, axes, an epsilon); a larger one (a tied embedding) would then be
# stored twice, so that weight is left as it is.
SHARED_ELEMENTS = 4096


@dataclass
class Folded:
    """What fold_weights did.

    Attributes:
        model: the model with the subgraphs folded (the input itself when nothing was).
        graph: its onnx-graphsurgeon graph.
        ops: per weight folded, the ops of its subgraph, e.g. "Transpose" or "Cast+Transpose".
        biases: how many Conv and Gemm biases were folded too (so that BatchNorm
            correction can write them).
        failed: a one-line reason where onnxruntime could not evaluate the subgraphs.
    """

    model: onnx.ModelProto
    graph: gs.Graph
    ops: dict[str, str] = field(default_factory=dict)
    biases: int = 0
    failed: str | None = None

    def notes(self) -> list[str]:
        """One line for the report: how many weights were folded, by subgraph ops."""
        if self.failed:
            return [f"weights computed from constants were left in float: folding them failed ({self.failed})"]
        if not self.ops:
            return []
        counts = ", ".join(f"{ops} {n}" for ops, n in sorted(Counter(self.ops.values()).items()))
        n = len(self.ops)
        also = f", and {self.biases} of their biases" if self.biases else ""
        return [f"folded the constant subgraph{'s' * (n > 1)} that compute{'s' * (n == 1)} {n} "
                f"weight{'s' * (n > 1)} into initializers ({counts}){also}"]


def weight_subgraph(tensor: gs.Tensor, graph_outputs: set[str]) -> list[gs.Node] | None:
    """The nodes that compute ``tensor`` from constants alone, producers first; None when the
    tensor is a constant already, depends on a graph input, passes through a node of NOT_FOLDED
    or a node with subgraphs, or when a tensor inside it (other than a small constant) is also
    read outside it or is one of ``graph_outputs`` (names)."""
    if _constant_size(tensor) is not None:
        return None
    nodes: list[gs.Node] = []
    seen: set[int] = set()
    stack = [tensor]
    while stack:
        t = stack.pop()
        if isinstance(t, gs.Constant) or not t.inputs:
            if not isinstance(t, gs.Constant):
                return None                                   # a graph input
            continue
        node = t.inputs[0]
        if node.op == "Constant":
            continue
        if node.op in NOT_FOLDED or any(isinstance(v, gs.Graph) for v in node.attrs.values()):
            return None
        if id(node) in seen:
            continue
        seen.add(id(node))
        nodes.append(node)
        stack.extend(i for i in node.inputs if i.name)
    if not nodes:
        return None
    inside = {id(n) for n in nodes}
    for node in nodes:
        for t in node.inputs:
            if not t.name or all(id(user) in inside for user in t.outputs):
                continue
            size = _constant_size(t)
            if size is None or size > SHARED_ELEMENTS:
                return None
    for node in nodes:                                       # only the weight leaves the subgraph
        for t in node.outputs:
            if t.name in graph_outputs or (t is not tensor and any(id(user) not in inside for user in t.outputs)):
                return None
    return nodes[::-1]


def _constant_size(tensor: gs.Tensor) -> int | None:
    """The element count of an initializer or a Constant node's ``value`` (without loading its
    values); None for any other tensor."""
    holder = constant_holder(tensor)
    return None if holder is None else math.prod(holder.shape)


def _typed_constants(graph: gs.Graph) -> None:
    """Give every Constant node with a value_float(s) or value_int(s) attribute the same values
    as a ``value`` tensor (float32, int64), in place, so that each constant has one holder.
    fold_constants would otherwise make those floats float64 (onnx-graphsurgeon 0.6.1), which
    would leave nodes with inputs of two float types."""
    kinds = {"value_float": np.float32, "value_floats": np.float32, "value_int": np.int64, "value_ints": np.int64}
    for node in graph.nodes:
        kind = next((k for k in kinds if k in node.attrs), None)
        if node.op == "Constant" and node.outputs and kind is not None:
            values = np.array(node.attrs[kind], kinds[kind])
            node.attrs = {"value": gs.Constant(node.outputs[0].name + "_value", values)}


def fold_weights(model: onnx.ModelProto, graph: gs.Graph) -> Folded:
    """Fold every Conv, Gemm and MatMul weight that constants alone compute (see weight_subgraph),
    and the Conv and Gemm biases beside the weights folded.

    Args:
        model: the loaded model; graph: gs.import_onnx(model), folded in place (or, where
            folding fails, left to be dropped).

    Returns:
        Folded; its model is a new ModelProto where something was folded, with the input's IR
        version, producer and metadata, and the input itself (with ``graph``) otherwise.
    """
    _typed_constants(graph)
    subgraphs, biases, outputs = {}, {}, {t.name for t in graph.outputs}
    for node in graph.nodes:
        if node.op in QUANTIZABLE_OPS and len(node.inputs) > 1 and node.inputs[1].name:
            nodes = weight_subgraph(node.inputs[1], outputs)
            if nodes is not None:
                subgraphs[node.inputs[1].name] = nodes
                bias = node.inputs[2] if node.op != "MatMul" and len(node.inputs) > 2 else None
                nodes = None if bias is None or not bias.name else weight_subgraph(bias, outputs)
                if nodes is not None:
                    biases[bias.name] = nodes
    if not subgraphs:
        return Folded(model, graph)
    # fold_constants decides on a copy of the graph: its nodes are known by their output names
    foldable = {t.name for nodes in [*subgraphs.values(), *biases.values()] for n in nodes for t in n.outputs}
    try:
        with G_LOGGER.suppress():        # its warnings would go to stdout; a failure is noted instead
            graph.toposort()
            graph.fold_constants(fold_shapes=False, recurse_subgraphs=False, flatten_subgraphs=False,
                                 recurse_functions=False, error_ok=False,
                                 should_exclude_node=lambda n: not all(t.name in foldable for t in n.outputs))
    except Exception as exc:  # onnxruntime could not run a subgraph: the layers stay in float
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return Folded(model, gs.import_onnx(model), failed=f"{type(exc).__name__}: {first}"[:300])
    graph.cleanup()
    tensors = graph.tensors()
    ops = {name: "+".join(dict.fromkeys(n.op for n in nodes)) for name, nodes in subgraphs.items()
           if isinstance(tensors.get(name), gs.Constant)}
    out = gs.export_onnx(graph, do_type_check=False)
    out.ir_version = model.ir_version
    out.producer_name, out.producer_version = model.producer_name, model.producer_version
    del out.metadata_props[:]
    out.metadata_props.extend(model.metadata_props)
    return Folded(out, graph, ops, sum(isinstance(tensors.get(name), gs.Constant) for name in biases))


def scan_folded(model: onnx.ModelProto) -> tuple[onnx.ModelProto, LayerScan, list[str]]:
    """Fold the weights that constants compute (fold_weights), then scan the layers.

    Returns:
        (model, scan, notes): the model to quantize, its layers (a folded weight's source names
        what computed it, e.g. "folded Transpose"), and the fold's note for the report.
    """
    folded = fold_weights(model, gs.import_onnx(model))
    scan = scan_layers(folded.graph)
    scan.layers = [replace(layer, source=layer.source.replace("initializer", f"folded {folded.ops[layer.weight]}", 1))
                   if layer.weight in folded.ops else layer for layer in scan.layers]
    return folded.model, scan, folded.notes()
