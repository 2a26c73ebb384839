"""Small ONNX models built by hand with onnx.helper, for the tests."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def make_model(nodes, inputs, outputs, initializers=(), opset: int = 13) -> onnx.ModelProto:
    graph = helper.make_graph(list(nodes), "test", list(inputs), list(outputs), list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def fvi(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def const_node(name: str, values: np.ndarray) -> onnx.NodeProto:
    """A Constant node producing ``name`` (the way the PP-OCR exports store weights)."""
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(values, name + "_value"),
                            name=name + "_const")


def conv_stack(seed=0, constant_nodes=False, opset=13, batch=None) -> onnx.ModelProto:
    """x(N,3,12,12) -> Conv3x3 s1 p1 (+bias) -> Relu -> depthwise Conv3x3 s2 -> grouped Conv1x1 g2
    -> GlobalAveragePool -> Flatten -> Gemm(transB=1) -> y(N,5)."""
    r = rng(seed)
    w1 = (r.standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float32)
    b1 = (r.standard_normal(8) * 0.1).astype(np.float32)
    w2 = (r.standard_normal((8, 1, 3, 3)) * 0.3).astype(np.float32)
    w3 = (r.standard_normal((8, 4, 1, 1)) * 0.3).astype(np.float32)
    wg = (r.standard_normal((5, 8)) * 0.3).astype(np.float32)
    bg = (r.standard_normal(5) * 0.1).astype(np.float32)
    weights = {"w1": w1, "b1": b1, "w2": w2, "w3": w3, "wg": wg, "bg": bg}
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="dw", group=8, strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Conv", ["r2", "w3"], ["c3"], name="grouped", group=2),
        helper.make_node("GlobalAveragePool", ["c3"], ["p"], name="gap"),
        helper.make_node("Flatten", ["p"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "wg", "bg"], ["y"], name="fc", transB=1),
    ]
    inits = []
    if constant_nodes:
        nodes = [const_node(k, v) for k, v in weights.items()] + nodes
    else:
        inits = [numpy_helper.from_array(v, k) for k, v in weights.items()]
    return make_model(nodes, [fvi("x", [batch, 3, 12, 12])], [fvi("y", [batch, 5])], inits, opset)


def bn_net(seed=0, calib=None, opset=13) -> onnx.ModelProto:
    """x(N,4,10,10) -> Conv -> BN -> Relu -> Conv -> BN -> Relu -> Conv(1x1) -> y.

    With ``calib`` given, each BN's running statistics are set to the float model's own
    statistics on that data, as if it had been trained on it.
    """
    r = rng(seed)
    w1 = (r.standard_normal((16, 4, 3, 3)) * 0.3).astype(np.float32)
    w2 = (r.standard_normal((16, 16, 3, 3)) * 0.1).astype(np.float32)
    w3 = (r.standard_normal((6, 16, 1, 1)) * 0.3).astype(np.float32)
    stats = {}
    for i in (1, 2):
        stats[f"g{i}"] = (1.0 + 0.3 * r.standard_normal(16)).astype(np.float32)
        stats[f"be{i}"] = (0.2 * r.standard_normal(16)).astype(np.float32)
        stats[f"m{i}"] = np.zeros(16, np.float32)
        stats[f"v{i}"] = np.ones(16, np.float32)

    def build():
        inits = [numpy_helper.from_array(v, k) for k, v in
                 {"w1": w1, "w2": w2, "w3": w3, **stats}.items()]
        nodes = [
            helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
            helper.make_node("BatchNormalization", ["c1", "g1", "be1", "m1", "v1"], ["n1"], name="bn1"),
            helper.make_node("Relu", ["n1"], ["r1"], name="relu1"),
            helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
            helper.make_node("BatchNormalization", ["c2", "g2", "be2", "m2", "v2"], ["n2"], name="bn2"),
            helper.make_node("Relu", ["n2"], ["r2"], name="relu2"),
            helper.make_node("Conv", ["r2", "w3"], ["y"], name="head"),
        ]
        return make_model(nodes, [fvi("x", [None, 4, 10, 10])], [fvi("y", [None, 6, 10, 10])], inits, opset)

    if calib is not None:
        import onnxruntime as ort
        for i in (1, 2):  # in order: bn2's statistics depend on bn1's
            m = build()
            m.graph.output.append(fvi(f"c{i}", None))
            c = ort.InferenceSession(m.SerializeToString()).run([f"c{i}"], {"x": calib})[0]
            stats[f"m{i}"] = c.mean(axis=(0, 2, 3)).astype(np.float32)
            stats[f"v{i}"] = c.var(axis=(0, 2, 3)).astype(np.float32)
    return build()


def shared_head(seed=0) -> onnx.ModelProto:
    """A two-level pyramid with one head conv shared by both levels (RetinaNet-style):
    x(N,3,12,12) -> Conv (w0) -> p3 (N,4,12,12) -> Conv s2 (w1) -> p4 (N,4,6,6); the head
    Conv (wh, bias bh) on p3 -> BN -> y3 and on p4 -> y4; and a Conv of the head's geometry with
    its own weight (wo) on p3 -> z."""
    r = rng(seed)
    weights = {"w0": (r.standard_normal((4, 3, 3, 3)) * 0.3).astype(np.float32),
               "w1": (r.standard_normal((4, 4, 3, 3)) * 0.3).astype(np.float32),
               "wh": (r.standard_normal((5, 4, 3, 3)) * 0.3).astype(np.float32),
               "bh": (r.standard_normal(5) * 0.1).astype(np.float32),
               "wo": (r.standard_normal((5, 4, 3, 3)) * 0.3).astype(np.float32),
               "bn_s": (1 + 0.2 * r.standard_normal(5)).astype(np.float32),
               "bn_b": (0.1 * r.standard_normal(5)).astype(np.float32),
               "bn_m": (0.1 * r.standard_normal(5)).astype(np.float32),
               "bn_v": (1 + 0.2 * r.random(5)).astype(np.float32)}
    pad = dict(pads=[1, 1, 1, 1])
    nodes = [helper.make_node("Conv", ["x", "w0"], ["p3"], name="stem", **pad),
             helper.make_node("Conv", ["p3", "w1"], ["p4"], name="down", strides=[2, 2], **pad),
             helper.make_node("Conv", ["p3", "wh", "bh"], ["h3"], name="head_p3", **pad),
             helper.make_node("BatchNormalization", ["h3", "bn_s", "bn_b", "bn_m", "bn_v"], ["y3"], name="bn"),
             helper.make_node("Conv", ["p4", "wh", "bh"], ["y4"], name="head_p4", **pad),
             helper.make_node("Conv", ["p3", "wo"], ["z"], name="other", **pad)]
    return make_model(nodes, [fvi("x", [None, 3, 12, 12])],
                      [fvi("y3", [None, 5, 12, 12]), fvi("y4", [None, 5, 6, 6]), fvi("z", [None, 5, 12, 12])],
                      [numpy_helper.from_array(v, k) for k, v in weights.items()])


def run(model: onnx.ModelProto, feed: dict) -> list[np.ndarray]:
    import onnxruntime as ort
    from onnxobq.runtime import session_options
    return ort.InferenceSession(model.SerializeToString(), session_options()).run(None, feed)


def cpu(cores: int | None = None, **tuning):
    """The NumPy Device a run on this machine gets (device "cpu"), with ``tuning`` replacing
    Tuning's sizes and costs, and ``cores`` its usable CPUs."""
    from onnxobq.backend import Tuning, choose_device
    return choose_device("cpu", tuning=Tuning(**tuning), cores=cores)


def counted_reads(monkeypatch) -> list:
    """Count the passes that read the calibration source (calls of calibration.batching._read_batches);
    the list grows by one per pass."""
    from onnxobq.calibration import batching
    reads, read = [], batching._read_batches

    def counting(cfg, inputs):
        reads.append(1)
        return read(cfg, inputs)
    monkeypatch.setattr(batching, "_read_batches", counting)
    return reads
