"""Weights that constants compute are folded into initializers before the layer scan."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxobq.graph import scan_folded

import builders


def _model(nodes, inits, inputs, outputs, opset=13):
    return builders.make_model(nodes, inputs, outputs, [numpy_helper.from_array(v, k) for k, v in inits.items()], opset)


def _run(model, feed):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)


def computed_weights_model():
    """MatMul on Transpose(wt), Gemm on Reshape(wr, shape), a weight-normalised Conv
    (g * v / ||v||) with a float16 bias Cast to float32, and MatMul on a float16 weight Cast
    to float32."""
    r = builders.rng(3)
    inits = {"wt": r.standard_normal((3, 4)).astype(np.float32),
             "wr": r.standard_normal((24,)).astype(np.float32), "shape": np.array([8, 3], np.int64),
             "v": r.standard_normal((5, 2, 3, 3)).astype(np.float32),
             "g": (r.random((5, 1, 1, 1)) + 0.5).astype(np.float32), "axes": np.array([1, 2, 3], np.int64),
             "w16": r.standard_normal((4, 6)).astype(np.float16), "b16": r.standard_normal(5).astype(np.float16)}
    nodes = [helper.make_node("Transpose", ["wt"], ["w"], perm=[1, 0], name="t"),
             helper.make_node("MatMul", ["x", "w"], ["a"], name="mm"),
             helper.make_node("Reshape", ["wr", "shape"], ["gw"], name="r"),
             helper.make_node("Gemm", ["a", "gw"], ["y"], name="gemm", transB=1),
             helper.make_node("Cast", ["w16"], ["wc"], to=TensorProto.FLOAT, name="cast"),
             helper.make_node("MatMul", ["x", "wc"], ["y16"], name="mm16"),
             helper.make_node("ReduceL2", ["v", "axes"], ["n"], keepdims=1, name="l2"),
             helper.make_node("Div", ["v", "n"], ["vn"], name="div"),
             helper.make_node("Mul", ["vn", "g"], ["cw"], name="mul"),
             helper.make_node("Cast", ["b16"], ["cb"], to=TensorProto.FLOAT, name="bcast"),
             helper.make_node("Conv", ["img", "cw", "cb"], ["z"], pads=[1, 1, 1, 1], name="conv")]
    return _model(nodes, inits, [builders.fvi("x", [2, 4]), builders.fvi("img", [1, 2, 6, 6])],
                  [builders.fvi("y", [2, 8]), builders.fvi("y16", [2, 6]), builders.fvi("z", [1, 5, 6, 6])], 18), inits


def test_weights_that_constants_compute_are_folded_to_their_values():
    model, inits = computed_weights_model()
    before = model.SerializeToString()
    folded, scan, notes = scan_folded(model)
    assert model.SerializeToString() == before                   # the input is not modified
    assert {l.name: l.source for l in scan.layers} == {
        "mm": "folded Transpose", "gemm": "folded Reshape", "mm16": "folded Cast",
        "conv": "folded ReduceL2+Div+Mul"}
    assert not scan.skipped
    v = inits["v"]
    expect = {"mm": inits["wt"].T, "gemm": inits["wr"].reshape(8, 3), "mm16": inits["w16"].astype(np.float32),
              "conv": inits["g"] * v / np.sqrt((v.astype(np.float64) ** 2).sum(axis=(1, 2, 3), keepdims=True))}
    for name, w in expect.items():
        np.testing.assert_allclose(scan.weights[name], w, rtol=1e-6, atol=0)
    assert sorted(n.op_type for n in folded.graph.node) == ["Conv", "Gemm", "MatMul", "MatMul"]
    assert notes == ["folded the constant subgraphs that compute 4 weights into initializers "
                     "(Cast 1, ReduceL2+Div+Mul 1, Reshape 1, Transpose 1), and 1 of their biases"]
    bias = next(t for t in folded.graph.initializer if t.name == "cb")
    np.testing.assert_array_equal(numpy_helper.to_array(bias), inits["b16"].astype(np.float32))
    onnx.checker.check_model(folded)
    assert folded.ir_version == model.ir_version
    r = builders.rng(4)
    feed = {"x": r.standard_normal((2, 4)).astype(np.float32), "img": r.standard_normal((1, 2, 6, 6)).astype(np.float32)}
    for a, b in zip(_run(model, feed), _run(folded, feed)):
        np.testing.assert_array_equal(a, b)


def test_a_model_with_nothing_to_fold_is_returned_as_it_is():
    model = builders.conv_stack(constant_nodes=True)
    folded, scan, notes = scan_folded(model)
    assert folded is model and notes == []
    assert [l.source for l in scan.layers] == ["Constant node"] * 4


def _matmul_on(nodes, inits, extra_inputs=(), extra_outputs=()):
    nodes = nodes + [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    return _model(nodes, inits, [builders.fvi("x", [2, 4]), *extra_inputs],
                  [builders.fvi("y", [2, 3]), *extra_outputs], 18)


W = builders.rng(5).standard_normal((3, 4)).astype(np.float32)


@pytest.mark.parametrize("case,reason", [
    ("graph input", "the weight is computed at run time (by a Transpose node)"),
    ("dequantized", "the weight is already quantized (DequantizeLinear)"),
    ("random", "the weight is computed at run time (by a Add node)"),
    ("tied", "the weight is computed at run time (by a Transpose node)"),
    ("also an output", "the weight is computed at run time (by a Relu node)"),
])
def test_weights_that_are_not_folded_keep_their_reason(case, reason):
    t = helper.make_node("Transpose", ["wt"], ["w"], perm=[1, 0], name="t")
    if case == "graph input":
        model = _matmul_on([t], {}, [builders.fvi("wt", [3, 4])])
    elif case == "dequantized":
        dq = helper.make_node("DequantizeLinear", ["q", "s"], ["w"], name="dq", axis=1)
        model = _matmul_on([dq], {"q": np.ones((4, 3), np.int8), "s": np.ones(3, np.float32)})
    elif case == "random":
        rnd = helper.make_node("RandomNormal", [], ["noise"], shape=[4, 3], name="rnd")
        add = helper.make_node("Add", ["w0", "noise"], ["w"], name="add")
        model = _matmul_on([rnd, add], {"w0": W.T.copy()})
    elif case == "tied":        # wt also feeds a Gather (a tied embedding): folding would store it twice
        big = np.zeros((64, 128), np.float32)
        gather = helper.make_node("Gather", ["wt", "ids"], ["emb"], name="gather")
        t = helper.make_node("Transpose", ["wt"], ["w"], perm=[1, 0], name="t")
        nodes = [gather, t, helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
        model = _model(nodes, {"wt": big, "ids": np.array([0, 2], np.int64)}, [builders.fvi("x", [2, 128])],
                       [builders.fvi("y", [2, 64]), builders.fvi("emb", [2, 128])], 18)
    else:                       # a tensor inside the subgraph is read outside it
        relu = helper.make_node("Relu", ["wt2"], ["w"], name="relu")
        t2 = helper.make_node("Transpose", ["wt"], ["wt2"], perm=[1, 0], name="t2")
        model = _matmul_on([t2, relu], {"wt": W}, extra_outputs=[builders.fvi("wt2", [4, 3])])
    folded, scan, notes = scan_folded(model)
    assert folded is model and notes == [] and not scan.layers
    assert [s.reason for s in scan.skipped] == [reason]


def test_small_constants_shared_with_other_nodes_are_folded_in():
    """A shape constant that another Reshape reads too, and a scalar Constant node (value_float)
    that an Add outside reads too, do not keep the weight from folding."""
    nodes = [helper.make_node("Constant", [], ["half"], value_float=0.5, name="c"),
             helper.make_node("Reshape", ["wr", "shape"], ["w2"], name="r"),
             helper.make_node("Mul", ["w2", "half"], ["w"], name="m"),
             helper.make_node("MatMul", ["x", "w"], ["a"], name="mm"),
             helper.make_node("Reshape", ["a", "shape"], ["a2"], name="r2"),
             helper.make_node("Add", ["a2", "half"], ["y"], name="add")]
    model = _model(nodes, {"wr": W.T.reshape(-1).copy(), "shape": np.array([4, 3], np.int64)},
                   [builders.fvi("x", [4, 4])], [builders.fvi("y", [4, 3])], 18)
    folded, scan, notes = scan_folded(model)
    assert [l.source for l in scan.layers] == ["folded Reshape+Mul"]
    np.testing.assert_array_equal(scan.weights["mm"], W.T * np.float32(0.5))
    assert sorted(n.op_type for n in folded.graph.node) == ["Add", "MatMul", "Reshape"]
    onnx.checker.check_model(folded)
    x = builders.rng(6).standard_normal((4, 4)).astype(np.float32)
    np.testing.assert_array_equal(_run(folded, {"x": x})[0], _run(model, {"x": x})[0])


def test_a_shape_from_a_value_ints_constant_node_shared_with_another_reshape_is_folded_in():
    nodes = [helper.make_node("Constant", [], ["shape"], value_ints=[4, 3], name="c"),
             helper.make_node("Reshape", ["wr", "shape"], ["w"], name="r"),
             helper.make_node("MatMul", ["x", "w"], ["a"], name="mm"),
             helper.make_node("Reshape", ["a", "shape"], ["y"], name="r2")]
    model = _model(nodes, {"wr": W.T.reshape(-1).copy()}, [builders.fvi("x", [4, 4])], [builders.fvi("y", [4, 3])], 18)
    folded, scan, notes = scan_folded(model)
    assert [l.source for l in scan.layers] == ["folded Reshape"]
    np.testing.assert_array_equal(scan.weights["mm"], W.T)
    assert [n.op_type for n in folded.graph.node] == ["MatMul", "Reshape"]      # the Constant is one too
    shape = next(i for i in folded.graph.initializer if i.name == "shape")
    assert shape.data_type == onnx.TensorProto.INT64 and list(numpy_helper.to_array(shape)) == [4, 3]
    onnx.checker.check_model(folded)
    x = builders.rng(8).standard_normal((4, 4)).astype(np.float32)
    np.testing.assert_array_equal(_run(folded, {"x": x})[0], _run(model, {"x": x})[0])


def test_a_subgraph_onnxruntime_cannot_run_leaves_the_layer_in_float_with_a_note(capfd):
    node = helper.make_node("Frobnicate", ["wt"], ["w"], domain="com.example", name="f")
    nodes = [node, helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    graph = helper.make_graph(nodes, "test", [builders.fvi("x", [2, 4])], [builders.fvi("y", [2, 3])],
                              [numpy_helper.from_array(W.T.copy(), "wt")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.example", 1)])
    folded, scan, notes = scan_folded(model)
    assert folded is model and not scan.layers
    assert [s.reason for s in scan.skipped] == ["the weight is computed at run time (by a Frobnicate node)"]
    assert len(notes) == 1 and notes[0].startswith("weights computed from constants were left in float: "
                                                   "folding them failed (")
    assert "\n" not in notes[0]
    assert capfd.readouterr() == ("", "")          # onnx-graphsurgeon's warnings are kept quiet


def test_folding_leaves_the_rest_of_the_graph_as_it_was():
    """An If on a constant condition elsewhere keeps its branches (no flattening), and the
    model still runs the same."""
    then = helper.make_graph([helper.make_node("Relu", ["y"], ["t"])], "then", [], [builders.fvi("t", [2, 3])])
    other = helper.make_graph([helper.make_node("Neg", ["y"], ["e"])], "else", [], [builders.fvi("e", [2, 3])])
    nodes = [helper.make_node("Transpose", ["wt"], ["w"], perm=[1, 0], name="t"),
             helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
             helper.make_node("If", ["cond"], ["z"], then_branch=then, else_branch=other, name="if")]
    model = _model(nodes, {"wt": W, "cond": np.array(True)}, [builders.fvi("x", [2, 4])],
                   [builders.fvi("z", [2, 3])], 18)
    folded, scan, notes = scan_folded(model)
    assert [l.source for l in scan.layers] == ["folded Transpose"]
    assert [n.op_type for n in folded.graph.node] == ["MatMul", "If"]
    x = builders.rng(7).standard_normal((2, 4)).astype(np.float32)
    np.testing.assert_array_equal(_run(folded, {"x": x})[0], _run(model, {"x": x})[0])
