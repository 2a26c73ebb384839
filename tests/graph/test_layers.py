import numpy as np
import onnx_graphsurgeon as gs
from onnx import helper, numpy_helper

from onnxobq.graph import scan_layers
from onnxobq.types import from_matrix, to_matrix

import builders


def scan(model):
    return scan_layers(gs.import_onnx(model))


def test_conv_stack_layers_and_geometry():
    s = scan(builders.conv_stack())
    assert [(l.name, l.op, l.groups, l.rows, l.cols, l.source) for l in s.layers] == [
        ("conv1", "Conv", 1, 8, 27, "initializer"),
        ("dw", "Conv", 8, 1, 9, "initializer"),
        ("grouped", "Conv", 2, 4, 4, "initializer"),
        ("fc", "Gemm", 1, 5, 8, "initializer"),
    ]
    dw = s.layers[1]
    assert dw.conv.strides == (2, 2) and dw.conv.pads == (1, 1, 1, 1) and dw.bias is None
    assert s.layers[0].bias == "b1" and s.layers[3].bias == "bg"
    assert not s.skipped


def test_constant_node_weights_are_found():
    s = scan(builders.conv_stack(constant_nodes=True))
    assert len(s.layers) == 4
    assert all(l.source == "Constant node" for l in s.layers)
    np.testing.assert_array_equal(s.weights["conv1"].shape, (8, 3, 3, 3))


def _model(nodes, inits, x_shape, y_rank=None, opset=13):
    y_shape = [f"d{i}" for i in range(y_rank or len(x_shape))]
    return builders.make_model(nodes, [builders.fvi("x", x_shape)], [builders.fvi("y", y_shape)],
                               [numpy_helper.from_array(v, k) for k, v in inits.items()], opset)


def test_conv1d_conv3d_gemm_and_matmul_layouts():
    r = np.random.default_rng(0)
    w1 = r.standard_normal((4, 3, 5)).astype(np.float32)
    w3 = r.standard_normal((2, 4, 1, 2, 2)).astype(np.float32)
    m1 = _model([helper.make_node("Conv", ["x", "w"], ["y"], name="c1d")], {"w": w1}, [1, 3, 9])
    m3 = _model([helper.make_node("Conv", ["x", "w"], ["y"], name="c3d", auto_pad="SAME_UPPER")],
                {"w": w3}, [1, 4, 3, 4, 4])
    wg = r.standard_normal((6, 4)).astype(np.float32)
    gemm0 = _model([helper.make_node("Gemm", ["x", "w"], ["y"], name="g0")], {"w": wg}, [2, 6])
    wm = r.standard_normal((6, 3)).astype(np.float32)
    mm = _model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], {"w": wm}, [2, 5, 6])
    (c1,), (c3,), (g0,), (m,) = (scan(m).layers for m in (m1, m3, gemm0, mm))
    assert (c1.rows, c1.cols, c1.conv.kernel) == (4, 15, (5,))
    assert (c3.rows, c3.cols, c3.conv.auto_pad) == (2, 16, "SAME_UPPER")
    assert (g0.rows, g0.cols, g0.transposed, g0.channel_axis) == (4, 6, True, 1)
    assert (m.rows, m.cols, m.transposed) == (3, 6, True)
    np.testing.assert_array_equal(to_matrix(g0, wg)[0], wg.T)
    for layer, w in ((c1, w1), (c3, w3), (g0, wg), (m, wm)):
        np.testing.assert_array_equal(from_matrix(layer, to_matrix(layer, w)), w)


def test_grouped_conv_matrix_has_one_block_per_group():
    w = np.arange(8 * 2 * 3 * 3, dtype=np.float32).reshape(8, 2, 3, 3)
    m = _model([helper.make_node("Conv", ["x", "w"], ["y"], name="g", group=4)], {"w": w}, [1, 8, 5, 5])
    (layer,) = scan(m).layers
    M = to_matrix(layer, w)
    assert M.shape == (4, 2, 18)
    np.testing.assert_array_equal(M[1, 0], w[2].reshape(-1))


def test_skipped_layers_say_why():
    r = np.random.default_rng(1)
    w = r.standard_normal((4, 4)).astype(np.float32)
    bad = w.copy()
    bad[0, 0] = np.nan
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["a"], name="shared1"),
        helper.make_node("Gemm", ["a", "w"], ["b"], name="shared2"),     # another op: not one layer
        helper.make_node("Transpose", ["b"], ["bt"], name="t"),
        helper.make_node("MatMul", ["b", "bt"], ["c"], name="runtime"),
        helper.make_node("MatMul", ["c", "nanw"], ["d"], name="nan"),
        helper.make_node("Unsqueeze", ["d", "axes"], ["d4"], name="u"),
        helper.make_node("ConvTranspose", ["d4", "ctw"], ["y"], name="deconv"),
    ]
    inits = {"w": w, "nanw": bad, "ctw": r.standard_normal((4, 2, 1, 1)).astype(np.float32),
             "axes": np.array([0, 3], np.int64)}
    m = _model(nodes, inits, [4, 4], y_rank=4)
    s = scan(m)
    reasons = {k.name: k.reason for k in s.skipped}
    assert not s.layers
    assert reasons["shared1"] == reasons["shared2"] == "the weight is shared by 2 nodes of other ops, attributes, inputs or graphs"
    assert reasons["runtime"] == "the weight is computed at run time (by a Transpose node)"
    assert reasons["nan"] == "the weight has NaN or Inf values"
    assert reasons["deconv"].startswith("ConvTranspose is not supported")


def test_a_weight_also_used_inside_an_if_body_is_not_one_layer():
    """Only main-graph nodes can share a layer (the export edits the main graph)."""
    w = builders.rng(2).standard_normal((4, 4)).astype(np.float32)
    body = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["t"], name="inner")], "then", [],
                             [builders.fvi("t", [4, 4])])
    other = helper.make_graph([helper.make_node("Neg", ["x"], ["e"], name="neg")], "else", [],
                              [builders.fvi("e", [4, 4])])
    nodes = [helper.make_node("MatMul", ["x", "w"], ["a"], name="outer"),
             helper.make_node("If", ["cond"], ["b"], then_branch=body, else_branch=other, name="if"),
             helper.make_node("Add", ["a", "b"], ["y"], name="add")]
    m = builders.make_model(nodes, [builders.fvi("x", [4, 4])], [builders.fvi("y", [4, 4])],
                            [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array(True), "cond")], 13)
    s = scan(m)
    assert not s.layers
    assert [(k.name, k.reason) for k in s.skipped] == [
        ("outer", "the weight is shared by 2 nodes of other ops, attributes, inputs or graphs"),
        ("inner", "inside the body of If node 'if' (onnxobq quantizes the main graph's layers)")]


def test_a_conv_inside_an_if_branch_is_listed_as_left_in_float():
    """(was: neither quantized nor listed by inspect)"""
    from onnx import TensorProto
    w = numpy_helper.from_array(np.ones((3, 3, 1, 1), np.float32), "wb")
    then = helper.make_graph([helper.make_node("Conv", ["x", "wb"], ["t"], name="branch_conv")], "then", [],
                             [builders.fvi("t", [None, 3, 12, 12])], [w])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["e"])], "else", [],
                              [builders.fvi("e", [None, 3, 12, 12])])
    model = builders.make_model([helper.make_node("If", ["cond"], ["y"], name="gate", then_branch=then,
                                                  else_branch=other)],
                                [builders.fvi("x", [None, 3, 12, 12]), helper.make_tensor_value_info("cond",
                                                                                                     TensorProto.BOOL, [])],
                                [builders.fvi("y", [None, 3, 12, 12])])
    found = scan(model)
    assert found.layers == []
    assert [(s.name, s.op, s.weight, s.reason) for s in found.skipped] == [
        ("branch_conv", "Conv", "wb", "inside the body of If node 'gate' (onnxobq quantizes the main graph's layers)")]
