"""speed_bench's stripped models: a few kB to carry, and the same model again once filled."""
import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from speed_bench import STRIP_MIN_ELEMENTS, fill_stripped, strip_weights


def test_a_stripped_model_is_small_and_fills_back_to_the_same_shapes(tmp_path):
    big = np.ones((STRIP_MIN_ELEMENTS // 64, 64), np.float32)            # 1 MiB: left out
    small = np.arange(64, dtype=np.float32).reshape(64, 1)               # kept as it is
    ids = np.array([0, 2], np.int64)                                     # not float: kept
    nodes = [helper.make_node("Gather", ["big", "ids"], ["g"]), helper.make_node("MatMul", ["g", "small"], ["y"])]
    graph = helper.make_graph(nodes, "g", [], [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 1])],
                              [numpy_helper.from_array(a, n) for a, n in ((big, "big"), (small, "small"), (ids, "ids"))])
    src = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), src)
    assert strip_weights(src, tmp_path / "s.onnx") == 1
    assert (tmp_path / "s.onnx").stat().st_size < 4096 < src.stat().st_size
    assert fill_stripped(tmp_path / "s.onnx", tmp_path / "f.onnx", seed=0) == 1
    filled = onnx.load(tmp_path / "f.onnx")
    onnx.checker.check_model(filled)
    values = {t.name: numpy_helper.to_array(t) for t in filled.graph.initializer}
    assert values["big"].shape == big.shape and values["big"].std() > 0.01
    np.testing.assert_array_equal(values["small"], small)
    np.testing.assert_array_equal(values["ids"], ids)
    y, = ort.InferenceSession(str(tmp_path / "f.onnx")).run(None, {})
    np.testing.assert_allclose(y, values["big"][ids] @ small, rtol=1e-5)
