"""QDQ and fake writers agree for every weight layout, and store the right integer types."""
import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxobq.config import QuantizeConfig, SolveConfig
from onnxobq.export import build_model, prepare_opset, storage_type
from onnxobq.errors import UserError
from onnxobq.graph import scan_layers
from onnxobq.pipeline import Progress
from onnxobq.solve import solve_all
from onnxobq.types import Captured
from onnxobq.quant import GridSpec

import builders


def linear_model(dtype=np.float32, opset=13):
    """x(2,5,6) -> MatMul(6x4) -> Gemm-ready reshape -> Gemm(transB=0, 4x3) -> y(10,3)."""
    r = np.random.default_rng(0)
    wm = r.standard_normal((6, 4)).astype(dtype)
    wg = r.standard_normal((4, 3)).astype(dtype)
    bg = r.standard_normal(3).astype(dtype)
    t = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    nodes = [helper.make_node("MatMul", ["x", "wm"], ["m"], name="mm"),
             helper.make_node("Reshape", ["m", "shape"], ["m2"], name="flat"),
             helper.make_node("Gemm", ["m2", "wg", "bg"], ["y"], name="gemm", transB=0)]
    inits = [numpy_helper.from_array(wm, "wm"), numpy_helper.from_array(wg, "wg"),
             numpy_helper.from_array(bg, "bg"), numpy_helper.from_array(np.array([-1, 4], np.int64), "shape")]
    return builders.make_model(nodes, [helper.make_tensor_value_info("x", t, [2, 5, 6])],
                               [helper.make_tensor_value_info("y", t, [10, 3])], inits, opset)


def quantized(model, bits=4, symmetric=True):
    scan = scan_layers(gs.import_onnx(model))
    cfg = QuantizeConfig(model="", output="", solve=SolveConfig(
        method="rtn", grid=GridSpec(bits=bits, symmetric=symmetric)))
    return solve_all(scan, Captured({}, {}, 0), cfg, builders.cpu(), Progress())[0]


@pytest.mark.parametrize("symmetric", [True, False])
def test_matmul_and_gemm_transb0_use_the_output_axis(symmetric):
    model = linear_model()
    q = quantized(model, symmetric=symmetric)
    fake = build_model(model, q, "fake", 13, symmetric)
    qdq = build_model(model, q, "qdq", 13, symmetric)
    onnx.checker.check_model(qdq)
    axes = [a.i for n in qdq.graph.node if n.op_type == "DequantizeLinear" for a in n.attribute if a.name == "axis"]
    assert axes == [1, 1]
    x = np.random.default_rng(1).standard_normal((2, 5, 6)).astype(np.float32)
    np.testing.assert_allclose(builders.run(qdq, {"x": x})[0], builders.run(fake, {"x": x})[0], rtol=1e-6, atol=1e-6)
    # the fake weights are the dequantized codes, on a per-output-column grid
    wm = numpy_helper.to_array(next(t for t in fake.graph.initializer if t.name == "wm"))
    np.testing.assert_array_equal(wm, q[0].weight())
    assert q[0].scale.shape == (4,)


def test_float16_weights_are_cast_after_dequantize_before_opset_19():
    model = linear_model(np.float16, opset=13)
    q = quantized(model, bits=8)
    qdq = build_model(model, q, "qdq", 13, True)
    onnx.checker.check_model(qdq)
    assert [n.op_type for n in qdq.graph.node].count("Cast") == 2
    fake = build_model(model, q, "fake", 13, True)
    probe = onnx.ModelProto()
    probe.CopyFrom(qdq)
    probe.graph.output.append(helper.make_tensor_value_info("wm_dequantized_cast", TensorProto.FLOAT16, None))
    x = np.random.default_rng(2).standard_normal((2, 5, 6)).astype(np.float16)
    y_qdq, w_qdq = builders.run(probe, {"x": x})
    w_fake = numpy_helper.to_array(next(t for t in fake.graph.initializer if t.name == "wm"))
    np.testing.assert_array_equal(w_qdq, w_fake)           # the same float16 weights, bit for bit
    # the outputs differ only by float16 arithmetic (onnxruntime treats constant weights differently)
    np.testing.assert_allclose(y_qdq.astype(np.float32), builders.run(fake, {"x": x})[0].astype(np.float32),
                               rtol=1e-2, atol=1e-2)


def test_storage_types():
    assert storage_type(8, True, 13) == "INT8"
    assert storage_type(6, True, 21) == "INT8"
    assert storage_type(4, True, 13) == "INT8"
    assert storage_type(4, True, 21) == "INT4"
    assert storage_type(3, False, 21) == "UINT4"
    assert storage_type(5, False, 21) == "UINT8"


def test_opset_conversion_rules(flags):
    m = builders.conv_stack(opset=11)
    assert prepare_opset(m, "fake", None)[0] is m
    up = prepare_opset(m, "qdq", None)[0]
    assert [o.version for o in up.opset_import if o.domain == ""] == [13]
    assert [o.version for o in prepare_opset(m, "fake", 21)[0].opset_import if o.domain == ""] == [21]
    with pytest.raises(UserError, match="--opset 9: the model already uses opset 11"):
        prepare_opset(m, "qdq", 9)[0]
    newest = onnx.defs.onnx_opset_version()
    with pytest.raises(UserError, match=rf"--opset {newest + 1}: the installed onnx .* knows opsets up to "
                                        rf"{newest}; give {newest} or less$"):
        prepare_opset(m, "qdq", newest + 1)[0]


def test_a_model_that_imports_a_non_standard_domain_is_exported():
    """onnx.helper knows no IR version for com.microsoft (onnxruntime's fused ops) or custom
    domains: the IR version comes from the standard domains and the other imports stay."""
    m = builders.conv_stack()
    m.opset_import.extend([helper.make_opsetid("com.microsoft", 1), helper.make_opsetid("my.ops", 3)])
    with pytest.raises(ValueError):
        helper.find_min_ir_version_for(list(m.opset_import))
    scan = scan_layers(gs.import_onnx(m))
    cfg = QuantizeConfig(model="", output="", solve=SolveConfig(method="rtn"))
    qlayers, _ = solve_all(scan, Captured({}, {}, 0), cfg, builders.cpu(), Progress())
    out = build_model(m, qlayers, "qdq", 13, True)
    assert {(o.domain, o.version) for o in out.opset_import} >= {("com.microsoft", 1), ("my.ops", 3), ("", 13)}
    assert out.ir_version == max(m.ir_version, helper.find_min_ir_version_for([helper.make_opsetid("", 13)]))


@pytest.mark.parametrize("opset", [13, 19])
def test_float16_activations_are_quantized_in_float32_before_opset_19(opset):
    model = linear_model(np.float16, opset=opset)
    q = quantized(model, bits=8)
    out = build_model(model, q, "fake", opset, True, act_scales={"x": 0.02, "m2": 0.05})
    onnx.checker.check_model(out)
    ops = [n.op_type for n in out.graph.node]
    assert ops.count("QuantizeLinear") == ops.count("DequantizeLinear") == 2
    assert ops.count("Cast") == (4 if opset < 19 else 0)       # to float32 and back, per tensor
    scales = [numpy_helper.to_array(t) for t in out.graph.initializer if t.name.endswith("_act_scale")]
    assert [s.dtype for s in scales] == [np.dtype(np.float32 if opset < 19 else np.float16)] * 2
    x = np.random.default_rng(3).standard_normal((2, 5, 6)).astype(np.float16)
    xq = np.clip(np.rint(x.astype(np.float32) / np.float32(scales[0])), -128, 127) * np.float32(scales[0])
    probe = onnx.ModelProto()
    probe.CopyFrom(out)
    fed = next(n for n in out.graph.node if n.name == "mm").input[0]
    probe.graph.output.append(helper.make_tensor_value_info(fed, TensorProto.FLOAT16, None))
    np.testing.assert_array_equal(builders.run(probe, {"x": x})[1], xq.astype(np.float16))


def test_activations_need_opset_13(flags):
    m = builders.conv_stack(opset=11)
    assert [o.version for o in prepare_opset(m, "fake", None, activations=True)[0].opset_import if o.domain == ""] == [13]
    with pytest.raises(UserError, match="^--opset 12: --act-bits needs opset 13 or later"):
        prepare_opset(m, "fake", 12, activations=True)[0]


def grouped(model, group_size, bits=4, symmetric=True):
    scan = scan_layers(gs.import_onnx(model))
    cfg = QuantizeConfig(model="", output="", solve=SolveConfig(
        method="rtn", grid=GridSpec(bits=bits, symmetric=symmetric, group_size=group_size)))
    return scan, solve_all(scan, Captured({}, {}, 0), cfg, builders.cpu(), Progress())[0]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("make", [builders.conv_stack, linear_model])
def test_grouped_weights_are_blocked_dequantize_in_every_layout(make, symmetric, bits):
    from onnxobq.types import from_matrix, to_matrix
    from onnxobq.quant import fit_grid
    from onnxobq.solvers import METHODS
    # groups of 4 columns: a 3x3 conv's 27 (the last group of 3), a depthwise conv's 9, Gemm
    # transB=1's 8, MatMul's 6 (two groups, the last of 2); a grouped 1x1 conv's 2 and Gemm
    # transB=0's 4 make one group, which is the per-channel grid and stored as one
    model = prepare_opset(make(), "qdq", None, grouped="--group-size")[0]
    assert [o.version for o in model.opset_import if o.domain == ""] == [21]
    scan, q = grouped(model, 4, bits, symmetric)
    for layer, ql in zip(scan.layers, q):         # the dequantized weight is the solver's, laid out back
        W = to_matrix(layer, scan.weights[layer.name]).astype(np.float64)
        Q = METHODS["rtn"].solve(W, None, fit_grid(W, GridSpec(bits=bits, symmetric=symmetric, group_size=4))).Q
        np.testing.assert_allclose(ql.weight(), from_matrix(layer, Q).astype(np.float32), rtol=1e-6)
        O = layer.groups * layer.rows
        assert ql.scale.shape == ((O, -(-layer.cols // 4)) if layer.cols > 4 else (O,))
    fake = build_model(model, q, "fake", 21, symmetric)
    qdq = build_model(model, q, "qdq", 21, symmetric)
    onnx.checker.check_model(qdq, full_check=True)
    dq = [n for n in qdq.graph.node if n.op_type == "DequantizeLinear"]
    assert [{a.name: a.i for a in n.attribute}.get("block_size") for n in dq] == [
        4 if layer.cols > 4 else None for layer in scan.layers]
    x = np.random.default_rng(1).standard_normal([d.dim_value or 2 for d in model.graph.input[0].type
                                                 .tensor_type.shape.dim]).astype(np.float32)
    np.testing.assert_allclose(builders.run(qdq, {"x": x})[0], builders.run(fake, {"x": x})[0], rtol=1e-5, atol=1e-5)


def test_grouped_qdq_needs_opset_21(flags):
    m = builders.conv_stack(opset=13)
    assert prepare_opset(m, "fake", None, grouped="--group-size")[0] is m
    assert [o.version for o in prepare_opset(m, "qdq", 21, grouped="--group-size")[0].opset_import if o.domain == ""] == [21]
    with pytest.raises(UserError, match=r"^--opset 17: --group-size needs opset 21 or later in QDQ "
                                        r"\(DequantizeLinear's block_size\); give --opset 21 or later, or --format fake$"):
        prepare_opset(m, "qdq", 17, grouped="--group-size")[0]


def test_the_opset_converter_sees_large_weights_as_placeholders_and_they_come_back(monkeypatch):
    """The weights (over 1 KB) pass the converter as placeholders and are put back byte for
    byte; a model past 2 GB (here: past a lowered limit) is converted for INT4 storage too
    (was: kept at its opset with INT8 codes, as the converter cannot take it)."""
    from onnxobq.export import opset as opset_module
    from onnxobq.graph import io
    m = builders.conv_stack()
    monkeypatch.setattr(io, "EXTERNAL_DATA_THRESHOLD", 100)
    monkeypatch.setattr(opset_module, "EXTERNAL_DATA_THRESHOLD", 100)
    monkeypatch.setattr(opset_module, "PLACEHOLDER_BYTES", 50)
    converted, note = prepare_opset(m, "qdq", None, int4=True)
    assert note is None and [o.version for o in converted.opset_import if o.domain == ""] == [21]
    before = {t.name: t.SerializeToString() for t in m.graph.initializer}
    after = {t.name: t.SerializeToString() for t in converted.graph.initializer}
    assert after == before and any(t.ByteSize() > 50 for t in m.graph.initializer)
    x = builders.rng(0).standard_normal((2, 3, 12, 12)).astype(np.float32)
    np.testing.assert_array_equal(builders.run(converted, {"x": x})[0], builders.run(m, {"x": x})[0])
