"""Find the quantizable layers of a graph: every Conv, Gemm and MatMul with a constant weight.

A layer's weight may be an initializer or the output of a ``Constant`` node (the
PP-OCR exports keep all their weights that way). Layers that cannot be quantized
are returned too, each with the reason.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx_graphsurgeon as gs

from ..types import QUANTIZABLE_OPS, ConvGeometry, Layer, LayerScan, Skipped

# Ops that hold weights but that onnxobq leaves alone; listed so the user sees why.
UNSUPPORTED_OPS = {"ConvTranspose": "ConvTranspose is not supported (TensorRT has no per-channel "
                                    "ConvTranspose weights)",
                   "ConvInteger": "already an integer op", "QLinearConv": "already an integer op",
                   "MatMulInteger": "already an integer op", "QLinearMatMul": "already an integer op"}
FLOAT_TYPES = (np.float32, np.float16, np.float64)


# A weight whose magnitude passes this fraction of its dtype's largest value is left in float: an
# asymmetric grid's range is up to twice it, and a solver may pick any code on the grid, so a
# dequantized value can reach twice it and overflow to Inf (weights of +-3.4e38 in float32 did).
HUGE_WEIGHT = 0.25

def constant_holder(tensor) -> gs.Constant | None:
    """The gs.Constant that holds a weight or bias value: the initializer itself, or the
    ``value`` attribute of the Constant node that produces it."""
    if isinstance(tensor, gs.Constant):
        return tensor
    if tensor.inputs and tensor.inputs[0].op == "Constant":
        value = tensor.inputs[0].attrs.get("value")
        return value if isinstance(value, gs.Constant) else None
    return None


def weight_values(tensor) -> tuple[np.ndarray | None, str]:
    """The constant value behind a weight tensor and where it lives.

    Returns:
        (values, source) with source "initializer" or "Constant node"; (None, why) when
        the tensor is not a constant.
    """
    holder = constant_holder(tensor)
    if holder is not None:
        return np.asarray(holder.values), "initializer" if holder is tensor else "Constant node"
    producers = tensor.inputs
    if not producers:
        return None, "the weight is a graph input"
    node = producers[0]
    if node.op == "DequantizeLinear":
        return None, "the weight is already quantized (DequantizeLinear)"
    return None, f"the weight is computed at run time (by a {node.op} node)"


def _conv_geometry(node, wshape) -> ConvGeometry:
    nsp = len(wshape) - 2
    a = node.attrs
    kernel = tuple(int(k) for k in a.get("kernel_shape", wshape[2:]))
    return ConvGeometry(kernel=kernel,
                        strides=tuple(int(s) for s in a.get("strides", [1] * nsp)),
                        pads=tuple(int(p) for p in a.get("pads", [0] * (2 * nsp))),
                        dilations=tuple(int(d) for d in a.get("dilations", [1] * nsp)),
                        auto_pad=str(a.get("auto_pad", "NOTSET")))


def _describe(node, name, w, source):
    """Build the Layer for a node whose constant weight ``w`` is known, or return a skip reason."""
    op = node.op
    bias = node.inputs[2].name if len(node.inputs) > 2 and node.inputs[2].name else None
    common = dict(name=name, op=op, weight=node.inputs[1].name, source=source,
                  input=node.inputs[0].name, output=node.outputs[0].name,
                  shape=tuple(int(s) for s in w.shape), dtype=str(w.dtype))
    if op == "Conv":
        if w.ndim not in (3, 4, 5):
            return f"a Conv weight of rank {w.ndim} (only 1-D, 2-D and 3-D convs)"
        g = int(node.attrs.get("group", 1))
        if g < 1 or w.shape[0] % g:
            return f"group={g} does not divide the {w.shape[0]} output channels"
        return Layer(**common, groups=g, rows=w.shape[0] // g, cols=int(np.prod(w.shape[1:])),
                     conv=_conv_geometry(node, w.shape), bias=bias)
    if w.ndim != 2:
        return f"a {w.ndim}-D constant {op} weight (only 2-D weights)"
    if op == "Gemm":
        trans_b = bool(node.attrs.get("transB", 0))
        rows, cols = (w.shape[0], w.shape[1]) if trans_b else (w.shape[1], w.shape[0])
        return Layer(**common, groups=1, rows=rows, cols=cols, transposed=not trans_b,
                     trans_a=bool(node.attrs.get("transA", 0)), bias=bias)
    return Layer(**common, groups=1, rows=w.shape[1], cols=w.shape[0], transposed=True)


def _unique_name(node, index, seen):
    base = node.name or f"{node.op}_{index}"
    name, k = base, 1
    while name in seen:
        k += 1
        name = f"{base}_{k}"
    seen.add(name)
    return name


def scan_layers(graph: gs.Graph) -> LayerScan:
    """Find every Conv, Gemm and MatMul of ``graph`` and decide whether it can be quantized.

    A weight that several such nodes share (same op and attributes) makes one layer, at its
    first node, with the others as its ``uses``.

    Args:
        graph: an onnx-graphsurgeon graph (not modified).

    Returns:
        LayerScan with the quantizable layers in graph order and the skipped ones with reasons.
    """
    scan, seen, claimed = LayerScan(constants=float_constants(graph)), set(), set()
    index_of = {id(n): i for i, n in enumerate(graph.nodes)}   # users in an If or Loop body are not here
    for index, node in enumerate(graph.nodes):
        if node.op not in QUANTIZABLE_OPS and node.op not in UNSUPPORTED_OPS:
            continue
        wname = node.inputs[1].name if len(node.inputs) > 1 else ""
        if node.op in QUANTIZABLE_OPS and wname in claimed:
            continue                                   # a later use of a shared weight's layer
        name = _unique_name(node, index, seen)
        if node.op in UNSUPPORTED_OPS:
            scan.skipped.append(Skipped(name, node.op, wname, UNSUPPORTED_OPS[node.op]))
            continue
        reason = _skip_reason(node, index_of)
        if reason is None:
            w, source = weight_values(node.inputs[1])
            if w is None:
                reason = source
            elif w.dtype not in FLOAT_TYPES:
                reason = f"the weight has dtype {w.dtype} (only float weights)"
            elif not np.isfinite(w).all():
                reason = "the weight has NaN or Inf values"
            elif (top := float(np.abs(w).max(initial=0.0))) > HUGE_WEIGHT * np.finfo(w.dtype).max:
                reason = (f"the weight has values up to {top:.3g}, which leave no room below {w.dtype}'s largest "
                          "value for a scale and its rounding")
            else:
                found = _describe(node, name, w, source)
                if isinstance(found, Layer):
                    others = [u for u in node.inputs[1].outputs if u is not node]
                    if others:
                        uses = tuple((_unique_name(u, index_of[id(u)], seen), u.inputs[0].name, u.outputs[0].name)
                                     for u in others)
                        found = replace(found, uses=uses,
                                        source=f"{source}, shared by {len(others) + 1} nodes")
                        claimed.add(wname)
                    scan.layers.append(found)
                    scan.weights[found.name] = w
                    continue
                reason = found
        scan.skipped.append(Skipped(name, node.op, wname, reason))
    scan.skipped.extend(_in_subgraphs(graph, seen))
    return scan


def _in_subgraphs(graph: gs.Graph, seen: set) -> list[Skipped]:
    """The Conv, Gemm and MatMul nodes inside If, Loop and Scan bodies, at any depth: onnxruntime
    cannot return their inputs, so no Hessian can be captured for them."""
    found = []
    for node in graph.nodes:
        for body in (v for v in node.attrs.values() if isinstance(v, gs.Graph)):
            for i, inner in enumerate(body.nodes):
                if inner.op in QUANTIZABLE_OPS:
                    weight = inner.inputs[1].name if len(inner.inputs) > 1 else ""
                    found.append(Skipped(_unique_name(inner, i, seen), inner.op, weight,
                                         f"inside the body of {node.op} node '{node.name or node.op}' (onnxobq "
                                         "quantizes the main graph's layers)"))
            found.extend(_in_subgraphs(body, seen))
    return found


def float_constants(graph: gs.Graph) -> dict[str, tuple[str, int]]:
    """Every floating-point constant that a main-graph node reads: name -> (the op of its first
    reader, its element count)."""
    found = {}
    for node in graph.nodes:
        for tensor in node.inputs:
            holder = constant_holder(tensor) if tensor.name and tensor.name not in found else None
            if holder is not None and np.issubdtype(np.dtype(holder.dtype), np.floating):
                found[tensor.name] = (node.op, int(np.prod(holder.shape, dtype=np.int64)))
    return found


def _skip_reason(node, main: dict) -> str | None:
    """Reasons that need no weight values: structure and sharing (``main``: the main graph's
    nodes, by id)."""
    if len(node.inputs) < 2 or not node.inputs[1].name:
        return "no weight input"
    x, w = node.inputs[0], node.inputs[1]
    if node.op == "MatMul" and not _is_constant(w) and _is_constant(x):
        return "the constant is the first MatMul input (weight x activation)"
    users = list(w.outputs)
    if len(users) > 1 and not _shareable(node, users, main):
        return f"the weight is shared by {len(users)} nodes of other ops, attributes, inputs or graphs"
    if any(_is_constant(u.inputs[0]) for u in users):
        return "the activation input is a constant"
    return None


def _shareable(node, users, main: dict) -> bool:
    """Whether nodes that share node's weight can be one layer: the same op with the same
    attributes, each in the main graph, with the weight as its second input only, and one output."""
    w = node.inputs[1]
    return all(id(u) in main and u.op == node.op and u.attrs == node.attrs and len(u.outputs) == 1
               and [i for i, t in enumerate(u.inputs) if t is w] == [1] for u in users)


def _is_constant(tensor) -> bool:
    if isinstance(tensor, gs.Constant):
        return True
    return bool(tensor.inputs) and tensor.inputs[0].op == "Constant"
