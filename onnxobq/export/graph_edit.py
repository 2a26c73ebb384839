"""Edit an onnx-graphsurgeon graph in place: new weights, biases and DequantizeLinear nodes."""
from __future__ import annotations

import gc

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from ..graph.layers import constant_holder
from ..types import BNEdit, QuantizedLayer
from .opset import FP16_SCALE_OPSET, INT4_MIN_OPSET


def storage_type(bits: int, symmetric: bool, opset: int) -> str:
    """The ONNX integer type that stores the codes: INT4/UINT4 at 4 bits and below where the
    opset has them (21+), else INT8/UINT8."""
    small = bits <= 4 and opset >= INT4_MIN_OPSET
    return ("INT4" if small else "INT8") if symmetric else ("UINT4" if small else "UINT8")


def node_of(graph: gs.Graph, layer) -> gs.Node:
    """The graph node of a layer (found by its output tensor, which is unique)."""
    for node in graph.nodes:
        if node.outputs and node.outputs[0].name == layer.output:
            return node
    raise KeyError(f"layer {layer.name} is not in the graph")


def fresh_name(graph: gs.Graph, base: str, taken: set) -> str:
    """A tensor or node name not used anywhere in the graph."""
    if not taken:
        taken.update(graph.tensors().keys())
        taken.update(n.name for n in graph.nodes)
    name, k = base, 1
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    taken.add(name)
    return name


def set_bias(graph: gs.Graph, node: gs.Node, q: QuantizedLayer, taken: set) -> None:
    """Write ``q.bias`` into the node's bias input, adding one where it has none."""
    values = q.bias.astype(q.layer.dtype)
    if len(node.inputs) > 2 and node.inputs[2].name:
        holder = constant_holder(node.inputs[2])
        if holder is None:
            raise ValueError(f"layer {q.layer.name}: its bias is computed at run time")
        holder.values = values.reshape(holder.shape) if holder.values.size == values.size else values
        return
    node.inputs.append(gs.Constant(fresh_name(graph, q.layer.weight + "_bias", taken), values))


def _int_constant(name: str, values: np.ndarray, kind: str) -> gs.Constant:
    """An integer initializer; INT4/UINT4 are packed by onnx (graphsurgeon cannot pack them)."""
    if kind in ("INT8", "UINT8"):
        return gs.Constant(name, values.astype(np.int8 if kind == "INT8" else np.uint8))
    import ml_dtypes

    dtype = ml_dtypes.int4 if kind == "INT4" else ml_dtypes.uint4
    return gs.Constant(name, LazyValues(onnx.numpy_helper.from_array(values.astype(dtype), name)))


def dequantize_layout(q: QuantizedLayer) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """The codes, scale and zero-point as DequantizeLinear takes them, and its attributes.

    One scale per output channel: the stored weight, per-channel on its output axis. One per
    group of columns (opset 21's ``block_size``): blocks along the weight's input axis, a
    MatMul's (K, N) weight with scales (ceil(K / B), N); a Conv's codes flattened to the
    solver's (O, C) matrix, for a Reshape to follow.
    """
    layer, scale, zero = q.layer, q.stored_scale(), q.zero
    if not q.group_size:
        return q.codes, scale, zero, {"axis": layer.channel_axis}
    attrs = {"block_size": q.group_size}
    if layer.op == "Conv":
        return q.codes.reshape(layer.shape[0], -1), scale, zero, {**attrs, "axis": 1}
    if layer.transposed:       # stored inputs x outputs
        return q.codes, scale.T, zero.T, {**attrs, "axis": 0}
    return q.codes, scale, zero, {**attrs, "axis": 1}


def insert_dequantize(graph: gs.Graph, nodes: list[gs.Node], q: QuantizedLayer, kind: str,
                      opset: int, taken: set) -> None:
    """Feed the layer's nodes (all that share its weight) from one DequantizeLinear(codes,
    scale, zero) instead of its float weight (and a Reshape for a Conv's grouped codes)."""
    w = q.layer.weight
    values, scales, zeros, attrs = dequantize_layout(q)
    codes = _int_constant(fresh_name(graph, w + "_quantized", taken), values, kind)
    zero = _int_constant(fresh_name(graph, w + "_zero_point", taken), zeros, kind)
    dtype = np.dtype(q.layer.dtype)
    direct = dtype == np.float32 or opset >= FP16_SCALE_OPSET
    scale = gs.Constant(fresh_name(graph, w + "_scale", taken), scales if direct else scales.astype(np.float32))
    out = gs.Variable(fresh_name(graph, w + "_dequantized", taken),
                      dtype=dtype if direct else np.float32, shape=list(values.shape))
    graph.nodes.append(gs.Node("DequantizeLinear", name=fresh_name(graph, w + "_DequantizeLinear", taken),
                               inputs=[codes, scale, zero], outputs=[out], attrs=attrs))
    if values.shape != tuple(q.layer.shape):      # a Conv's grouped codes: back to the weight's shape
        shape = gs.Constant(fresh_name(graph, w + "_shape", taken), np.array(q.layer.shape, np.int64))
        shaped = gs.Variable(fresh_name(graph, w + "_dequantized_reshaped", taken), dtype=out.dtype,
                             shape=list(q.layer.shape))
        graph.nodes.append(gs.Node("Reshape", name=fresh_name(graph, w + "_Reshape", taken),
                                   inputs=[out, shape], outputs=[shaped]))
        out = shaped
    if not direct:  # DequantizeLinear gives float32 before opset 19: cast to the weight's type
        out = _cast(graph, out, dtype, fresh_name(graph, w + "_dequantized_cast", taken),
                    fresh_name(graph, w + "_Cast", taken))
    for node in nodes:
        node.inputs[1] = out


def apply_quantized(graph: gs.Graph, qlayers: list[QuantizedLayer], fmt: str, opset: int,
                    symmetric: bool, pending: dict) -> None:
    """Write every quantized layer into ``graph`` (in place; call ``graph.cleanup()`` after).

    Args:
        graph: the graph of the model being written.
        qlayers: the quantized layers.
        fmt: "fake" (float weights on the grid, same graph) or "qdq".
        opset: the graph's opset (decides INT4 storage and the float16 path).
        symmetric: the grid has zero-point 0 (signed storage) or not (unsigned).
        pending: "fake" weights are written into the exported model by fill_weights (a
            one-element placeholder here, and the layer by its tensor's name in ``pending``), so
            that no graph holds every layer's dequantized weight at once.
    """
    taken: set = set()
    for q in qlayers:
        node = node_of(graph, q.layer)
        if q.bias is not None:
            set_bias(graph, node, q, taken)
        if fmt == "fake":
            holder = constant_holder(node.inputs[1])
            holder.values = np.zeros((1,) * len(q.layer.shape), np.dtype(q.layer.dtype))
            pending[holder.name] = q
        else:
            nodes = [node] + [node_of(graph, use) for use in q.layer.each_use()[1:]]
            insert_dequantize(graph, nodes, q, storage_type(q.bits, symmetric, opset), opset, taken)


def insert_activation_qdq(graph: gs.Graph, qlayers: list[QuantizedLayer], scales: dict[str, float],
                          opset: int, taken: set, skip: frozenset = frozenset()) -> None:
    """Feed each quantized layer (every node sharing its weight, but the nodes named in ``skip``)
    its input through one QuantizeLinear -> DequantizeLinear pair per tensor: INT8, the tensor's
    scale, zero-point 0. Other nodes reading the tensor keep the float one."""
    readers: dict[str, list] = {}
    dtypes: dict[str, np.dtype] = {}     # where the graph does not know a tensor's type: the layer's
    for q in qlayers:
        for use in q.layer.each_use():
            if use.input in scales and use.name not in skip:
                readers.setdefault(use.input, []).append(node_of(graph, use))
                dtypes.setdefault(use.input, np.dtype(use.dtype))
    tensors = graph.tensors()
    for name, nodes in readers.items():
        x = tensors[name]
        dtype = np.dtype(x.dtype) if x.dtype is not None else dtypes[name]
        direct = dtype == np.float32 or opset >= FP16_SCALE_OPSET
        if not direct:     # QuantizeLinear takes float32 only before opset 19
            x = _cast(graph, x, np.float32, fresh_name(graph, name + "_act_float", taken),
                      fresh_name(graph, name + "_act_Cast", taken))
        scale = gs.Constant(fresh_name(graph, name + "_act_scale", taken),
                            np.array(scales[name], dtype if direct else np.float32))
        zero = gs.Constant(fresh_name(graph, name + "_act_zero_point", taken), np.array(0, np.int8))
        codes = gs.Variable(fresh_name(graph, name + "_act_quantized", taken), dtype=np.int8, shape=x.shape)
        out = gs.Variable(fresh_name(graph, name + "_act_dequantized", taken),
                          dtype=dtype if direct else np.float32, shape=x.shape)
        graph.nodes.append(gs.Node("QuantizeLinear", name=fresh_name(graph, name + "_QuantizeLinear", taken),
                                   inputs=[x, scale, zero], outputs=[codes]))
        graph.nodes.append(gs.Node("DequantizeLinear", name=fresh_name(graph, name + "_DequantizeLinear", taken),
                                   inputs=[codes, scale, zero], outputs=[out]))
        if not direct:
            out = _cast(graph, out, dtype, fresh_name(graph, name + "_act_dequantized_cast", taken),
                        fresh_name(graph, name + "_act_dequantized_Cast", taken))
        for node in nodes:
            node.inputs[0] = out


def _cast(graph: gs.Graph, x, dtype, name: str, node_name: str) -> gs.Variable:
    """Append Cast(x) to ``dtype`` as tensor ``name``, by node ``node_name``; returns the tensor."""
    out = gs.Variable(name, dtype=dtype, shape=x.shape)
    graph.nodes.append(gs.Node("Cast", name=node_name, inputs=[x], outputs=[out],
                               attrs={"to": onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))}))
    return out


def apply_bn_edit(graph: gs.Graph, edit: BNEdit) -> None:
    """Write new BN statistics; fold the node away by letting the Conv produce its output."""
    bn = next(n for n in graph.nodes if n.op == "BatchNormalization" and n.outputs and n.outputs[0].name == edit.output)
    for index, values in ((3, edit.mean), (4, edit.var)):
        holder = constant_holder(bn.inputs[index])
        holder.values = values.astype(holder.values.dtype).reshape(holder.shape)
    if edit.fold_into is not None:
        conv = next(n for n in graph.nodes if n.outputs and n.outputs[0].name == edit.fold_into)
        conv.outputs = list(bn.outputs)
        bn.outputs.clear()


def _min_ir_version(model: onnx.ModelProto) -> int:
    """The IR version the model's opsets need, counting only the domains onnx knows (a
    com.microsoft or custom domain makes onnx.helper raise)."""
    known = [o for o in model.opset_import if o.domain in ("", "ai.onnx", "ai.onnx.ml")]
    return onnx.helper.find_min_ir_version_for(known) if known else model.ir_version


def fill_weights(model: onnx.ModelProto, pending: dict) -> None:
    """Write each pending layer's dequantized weight into its tensor (an initializer, or a Constant
    node's value) of ``model``, one layer at a time (see apply_quantized)."""
    if not pending:
        return
    tensors = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        for attr in node.attribute:
            if node.op_type == "Constant" and attr.name == "value":
                tensors.setdefault(attr.t.name, attr.t)
    for name, q in pending.items():
        tensor, w = tensors[name], q.weight()
        del tensor.dims[:]
        tensor.dims.extend(w.shape)
        tensor.raw_data = w.tobytes()


def build_model(model: onnx.ModelProto, qlayers: list[QuantizedLayer], fmt: str, opset: int,
                symmetric: bool = True, bn_edits: tuple = (), act_scales: dict | None = None,
                act_skip: frozenset = frozenset(), edit=None) -> onnx.ModelProto:
    """The float model with quantized weights (and BN edits) written in.

    Args:
        model: the float model (not modified).
        qlayers: quantized layers; their scale and bias already include any BN fold.
        fmt: "fake" or "qdq".
        opset: the model's opset.
        symmetric: signed (True) or unsigned integer storage.
        bn_edits: BNEdit values to apply after the weights.
        act_scales: INT8 scales of the layers' input activations by tensor name, quantized
            with QuantizeLinear/DequantizeLinear before the layers (None: weights only).
        act_skip: names of the layers' nodes whose inputs stay in float even so (--act-exclude).
        edit: a function that rewires the graph last, in place (the BN stage's train-mode pass).

    Returns:
        A new ModelProto.
    """
    graph = gs.import_onnx(model)
    pending: dict = {}
    apply_quantized(graph, qlayers, fmt, opset, symmetric, pending)
    if act_scales:
        insert_activation_qdq(graph, qlayers, act_scales, opset, set(), act_skip)
    for bn_edit in bn_edits:
        apply_bn_edit(graph, bn_edit)
    if edit is not None:
        edit(graph)
    graph.cleanup().toposort()
    out = gs.export_onnx(graph, do_type_check=False)
    del graph
    gc.collect()    # the graph's nodes and tensors refer to each other: free its arrays now, not later
    fill_weights(out, pending)
    # Keep the input's IR version (older runtimes read it) unless the opset needs a newer one.
    out.ir_version = max(model.ir_version, _min_ir_version(out))
    del out.metadata_props[:]
    out.metadata_props.extend(model.metadata_props)
    out.producer_name, out.producer_version = "onnxobq", "0.1.0"
    return out
