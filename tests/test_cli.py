"""End to end through the command line, on small models built by hand."""
import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnxobq.cli import main

import builders

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def outputs(path, x):
    from onnxobq.runtime import session_options
    return ort.InferenceSession(str(path), session_options()).run(None, {"x": x})


@pytest.fixture
def stack(tmp_path):
    """A conv stack with weights in Constant nodes, and calibration data for it."""
    path = tmp_path / "stack.onnx"
    onnx.save(builders.conv_stack(constant_nodes=True), path)
    x = np.random.default_rng(0).standard_normal((16, 3, 12, 12)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    return path, tmp_path / "calib.npz", x


def dq_initializers(model):
    names = {n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    return [t for t in model.graph.initializer if t.name in names]


@pytest.mark.parametrize("method", ["fastobq", "gptq", "rtn"])
def test_fake_and_qdq_outputs_agree(capsys, stack, method):
    model, calib, x = stack
    tmp = model.parent
    for fmt in ("fake", "qdq"):
        code, out, err = cli(capsys, "quantize", model, "--bits", 4, "--method", method, "--calib", calib,
                             "--format", fmt, "-o", tmp / f"{fmt}.onnx", "-q")
        assert code == 0, err
        onnx.checker.check_model(str(tmp / f"{fmt}.onnx"))
    fake, qdq = outputs(tmp / "fake.onnx", x), outputs(tmp / "qdq.onnx", x)
    np.testing.assert_allclose(fake[0], qdq[0], rtol=1e-5, atol=1e-5)
    q = onnx.load(tmp / "qdq.onnx")
    assert sum(n.op_type == "DequantizeLinear" for n in q.graph.node) == 4
    for t in dq_initializers(q):          # 4-bit codes in INT4 by default (weight-only QDQ: opset 21)
        codes = onnx.numpy_helper.to_array(t).astype(np.int8)
        assert t.data_type == onnx.TensorProto.INT4 and codes.min() >= -8 and codes.max() <= 7
    assert [o.version for o in q.opset_import if o.domain == ""] == [21]
    assert not any(n.op_type == "Constant" and n.output[0].startswith("w") for n in q.graph.node)


def test_int4_storage_at_opset_21(capsys, stack):
    model, calib, x = stack
    out = model.parent / "q4.onnx"
    code, _, err = cli(capsys, "quantize", model, "--bits", 3, "--calib", calib, "--opset", 21, "-o", out, "-q")
    assert code == 0, err
    q = onnx.load(out)
    assert max(o.version for o in q.opset_import if o.domain == "") == 21
    kinds = {t.data_type for t in dq_initializers(q)}
    assert kinds == {onnx.TensorProto.INT4}
    for t in dq_initializers(q):
        codes = onnx.numpy_helper.to_array(t).astype(np.int8)
        assert codes.min() >= -4 and codes.max() <= 3
    assert np.isfinite(outputs(out, x)[0]).all()


@pytest.mark.parametrize("method", ["fastobq", "gptq", "obq", "rtn"])
def test_group_size_writes_int4_blocks_and_its_name(capsys, stack, method):
    model, calib, x = stack
    report = model.parent / "r.json"
    code, out, err = cli(capsys, "quantize", model, "--bits", 4, "--method", method, "--calib", calib,
                         "--group-size", 4, "--no-bn-reestimate", "--report", report)
    assert code == 0, err
    written = model.parent / f"stack.w4g4.{method}.qdq.onnx"
    assert (f"wrote {written} (INT4 weights holding 4-bit codes, one scale per 4 inputs in 3 layers, one scale "
            "per channel in 1 layer)") in out
    q = onnx.load(written)
    assert [o.version for o in q.opset_import if o.domain == ""] == [21]
    dq = {n.input[0].rsplit("_quantized", 1)[0]: n for n in q.graph.node if n.op_type == "DequantizeLinear"}
    attrs = {w: {a.name: a.i for a in n.attribute} for w, n in dq.items()}
    assert attrs == {"w1": {"axis": 1, "block_size": 4}, "w2": {"axis": 1, "block_size": 4},
                     "w3": {"axis": 0}, "wg": {"axis": 1, "block_size": 4}}
    # the scales: conv1's 8 x 27 columns in 7 groups, the depthwise 8 x 9 in 3, the Gemm's 5 x 8
    # in 2; the grouped 1x1's 2 columns make one group: per channel
    shapes = {t.name: tuple(t.dims) for t in q.graph.initializer}
    assert {w: shapes[n.input[1]] for w, n in dq.items()} == {"w1": (8, 7), "w2": (8, 3), "w3": (8,), "wg": (5, 2)}
    assert {l["name"]: l["group_size"] for l in json.loads(report.read_text())["layers"]} == {
        "conv1": 4, "dw": 4, "grouped": 0, "fc": 4}
    cli(capsys, "quantize", model, "--bits", 4, "--method", method, "--calib", calib, "--group-size", 4,
        "--no-bn-reestimate", "--format", "fake", "-o", model.parent / "fake.onnx", "-q")
    np.testing.assert_allclose(outputs(written, x)[0], outputs(model.parent / "fake.onnx", x)[0],
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("args,blocked", [(["--layer-group-size", "fc=4"], {"wg"}),
                                          (["--group-size", "4", "--layer-group-size", "f*=0",
                                            "--layer-group-size", "fc=8"], {"w1", "w2"})])
def test_layer_group_size_gives_some_layers_groups(capsys, stack, args, blocked):
    # (the grouped 1x1 conv's 2 inputs make one group of 4: per channel)
    model, calib, x = stack
    tmp = model.parent
    for fmt in ("qdq", "fake"):
        code, out, err = cli(capsys, "quantize", model, "--bits", 4, "--calib", calib, "--no-bn-reestimate",
                             "--format", fmt, "-o", tmp / f"{fmt}.onnx", *args)
        assert code == 0, err
    n = len(blocked)
    assert f"one scale per 4 inputs in {n} layer{'s' * (n > 1)}, one scale per channel in {4 - n} layers)" in out
    q = onnx.load(tmp / "qdq.onnx")
    assert [o.version for o in q.opset_import if o.domain == ""] == [21]
    attrs = {n.input[0].rsplit("_quantized", 1)[0]: {a.name: a.i for a in n.attribute}
             for n in q.graph.node if n.op_type == "DequantizeLinear"}
    assert {w for w, a in attrs.items() if "block_size" in a} == blocked
    assert all(a["block_size"] == 4 for a in attrs.values() if "block_size" in a)
    np.testing.assert_allclose(outputs(tmp / "qdq.onnx", x)[0], outputs(tmp / "fake.onnx", x)[0],
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("value,why", [("fc", "give GLOB=N, e.g. '*MatMul*=128'"),
                                       ("fc=-1", "the group size must be a whole number (0: one scale per "
                                                 "output channel)")])
def test_a_bad_layer_group_size_is_one_line(capsys, stack, value, why):
    model, calib, _ = stack
    code, _, err = cli(capsys, "quantize", model, "--calib", calib, "--layer-group-size", value, "-o", model.parent / "b.onnx")
    assert code == 2 and not (model.parent / "b.onnx").exists()
    assert err == f"onnxobq: error: Invalid value for '--layer-group-size': {value!r}: {why}\n"


@pytest.mark.parametrize("args,option", [(["--group-size", 4], "--group-size"),
                                         (["--layer-group-size", "conv1=4"], "--layer-group-size")])
def test_group_size_below_opset_21_is_one_line_and_status_2(capsys, stack, args, option):
    model, calib, _ = stack
    out = model.parent / "g.onnx"
    code, _, err = cli(capsys, "quantize", model, "--calib", calib, *args, "--opset", 17, "-o", out)
    assert code == 2 and not out.exists()
    assert err == (f"onnxobq: error: --opset 17: {option} needs opset 21 or later in QDQ (DequantizeLinear's "
                   "block_size); give --opset 21 or later, or --format fake\n")


@pytest.mark.parametrize("args", [["--group-size", 32], ["--group-size", 4, "--layer-group-size", "*=0"],
                                  ["--layer-group-size", "nothing=4"], ["--op-types", "Gemm", "--layer-group-size", "conv1=4"]])
def test_groups_that_reach_no_layer_keep_the_opset(capsys, stack, args):
    # every layer has 27 inputs or fewer, or is set back to per channel, or is left in float
    model, calib, _ = stack
    out = model.parent / "g.onnx"
    code, _, err = cli(capsys, "quantize", model, "--calib", calib, *args, "-o", out, "-q")
    assert code == 0, err
    q = onnx.load(out)
    assert [o.version for o in q.opset_import if o.domain == ""] == [13]
    assert not any(a.name == "block_size" for n in q.graph.node for a in n.attribute)


def test_asymmetric_grid_uses_unsigned_zero_points(capsys, stack):
    model, calib, x = stack
    tmp = model.parent
    for fmt in ("fake", "qdq"):
        code, _, err = cli(capsys, "quantize", model, "--bits", 5, "--asymmetric", "--scale-search", "mse",
                           "--calib", calib, "--format", fmt, "-o", tmp / f"a{fmt}.onnx", "-q")
        assert code == 0, err
    q = onnx.load(tmp / "aqdq.onnx")
    zps = [onnx.numpy_helper.to_array(t) for t in q.graph.initializer if t.name.endswith("_zero_point")]
    assert zps and all(z.dtype == np.uint8 for z in zps) and any((z > 0).any() for z in zps)
    np.testing.assert_allclose(outputs(tmp / "afake.onnx", x)[0], outputs(tmp / "aqdq.onnx", x)[0],
                               rtol=1e-5, atol=1e-5)


def test_qdq_converts_an_old_opset(capsys, tmp_path):
    path = tmp_path / "old.onnx"
    onnx.save(builders.conv_stack(opset=11), path)
    code, _, err = cli(capsys, "quantize", path, "--method", "rtn", "-o", tmp_path / "q.onnx", "-q")
    assert code == 0, err
    q = onnx.load(tmp_path / "q.onnx")
    assert [o.version for o in q.opset_import if o.domain == ""] == [13]
    x = np.ones((1, 3, 12, 12), np.float32)
    f = outputs(path, x)[0]
    np.testing.assert_allclose(outputs(tmp_path / "q.onnx", x)[0], f, rtol=0.05, atol=0.05)


def test_external_data_in_and_out(capsys, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    onnx.save_model(builders.conv_stack(), src / "m.onnx", save_as_external_data=True,
                    all_tensors_to_one_file=True, location="m.onnx.data", size_threshold=0)
    assert (src / "m.onnx.data").exists()
    out = tmp_path / "q.onnx"
    code, _, err = cli(capsys, "quantize", src / "m.onnx", "--bits", 6, "--calib", "random", "-o", out, "-q")
    assert code == 0, err
    assert (tmp_path / "q.onnx.data").exists()
    m = onnx.load(out, load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in m.graph.initializer)
    onnx.checker.check_model(str(out))
    assert np.isfinite(outputs(out, np.ones((2, 3, 12, 12), np.float32))[0]).all()


def test_report_json_and_table(capsys, stack):
    model, calib, _ = stack
    report = model.parent / "r.json"
    code, out, err = cli(capsys, "quantize", model, "--bits", 4, "--calib", calib, "--format", "fake",
                         "-o", model.parent / "f.onnx", "--report", report)
    assert code == 0, err
    data = json.loads(report.read_text())
    assert set(data["stages_seconds"]) == {"load", "capture", "solve", "bn", "export"}
    assert [l["name"] for l in data["layers"]] == ["conv1", "dw", "grouped", "fc"]
    assert data["settings"]["solve"]["order"] == "sensi_des"
    assert data["calibration_samples"] == 16 and data["peak_rss_mb"] > 0
    for layer in data["layers"]:
        assert 0 <= layer["error"] <= layer["rtn_error"]
    assert "conv1" in out and "rtn error" in out and "wrote" in out


def test_rank_deficient_hessians_are_flagged(capsys, stack):
    """With 4 samples the Gemm (8 inputs) sees 4 rows: its error is optimistic and the report says so."""
    model, calib, _ = stack
    code, out, err = cli(capsys, "quantize", model, "--calib", calib, "--samples", 4, "-o", model.parent / "s.onnx",
                         "--report", model.parent / "s.json")
    assert code == 0, err
    assert ("note: 1 layer saw fewer rows of calibration input than they have inputs: fc (4 rows, 8 inputs). "
            "Their Hessians are rank-deficient") in out
    rows = {l["name"]: l["rows"] for l in json.loads((model.parent / "s.json").read_text())["layers"]}
    assert rows == {"conv1": 4 * 144, "dw": 4 * 36, "grouped": 4 * 36, "fc": 4}


def test_rtn_without_calibration(capsys, stack):
    model, _, x = stack
    code, out, err = cli(capsys, "quantize", model, "--method", "rtn", "--bits", 8, "--format", "fake",
                         "-o", model.parent / "r.onnx")
    assert code == 0, err
    assert "calibration" not in err
    np.testing.assert_allclose(outputs(model.parent / "r.onnx", x)[0], outputs(model, x)[0], atol=0.02)


def test_exclude_leaves_layers_in_float(capsys, stack):
    model, calib, _ = stack
    code, out, err = cli(capsys, "quantize", model, "--calib", calib, "--exclude", "fc", "--exclude", "d*",
                         "-o", model.parent / "e.onnx")
    assert code == 0, err
    q = onnx.load(model.parent / "e.onnx")
    assert sum(n.op_type == "DequantizeLinear" for n in q.graph.node) == 2
    assert "skipped: fc (Gemm): excluded by --exclude fc" in out


def test_op_types_quantize_only_those_ops(capsys, stack):
    model, calib, _ = stack
    report = model.parent / "r.json"
    code, out, err = cli(capsys, "quantize", model, "--calib", calib, "--op-types", "Gemm, Gemm",
                         "-o", model.parent / "g.onnx", "--report", report)
    assert code == 0, err
    q = onnx.load(model.parent / "g.onnx")
    assert [n.output[0] for n in q.graph.node if n.op_type == "DequantizeLinear"] == ["wg_dequantized"]
    assert "skipped: conv1 (Conv): not in --op-types Gemm" in out      # three: one line each
    r = json.loads(report.read_text())
    assert [(s["name"], s["reason"]) for s in r["skipped"]] == [
        (n, "not in --op-types Gemm") for n in ("conv1", "dw", "grouped")]
    assert r["settings"]["op_types"] == ["Gemm"]


def test_per_layer_settings_that_reach_only_skipped_layers_are_noted(capsys, stack):
    model, calib, _ = stack
    code, out, err = cli(capsys, "quantize", model, "--method", "rtn", "--op-types", "Gemm", "--layer-bits", "conv1=8",
                         "--layer-group-size", "dw=4", "--layer-bits", "fc=6", "-o", model.parent / "g.onnx",
                         "--no-bn-reestimate")
    assert code == 0, err
    assert [l for l in out.splitlines() if "matched" in l] == [
        "note: --layer-bits conv1 matched only layers left in float",
        "note: --layer-group-size dw matched only layers left in float"]


def test_inspect_names_each_weight_and_the_nodes_that_share_it(capsys, tmp_path):
    onnx.save(builders.shared_head(), tmp_path / "m.onnx")
    code, out, err = cli(capsys, "inspect", tmp_path / "m.onnx")
    assert code == 0, err
    rows = [line.split() for line in out.splitlines()[2:6]]
    assert [r[:4] for r in rows] == [["stem", "Conv", "w0", "4x3x3x3"], ["down", "Conv", "w1", "4x4x3x3"],
                                     ["head_p3", "Conv", "wh", "5x4x3x3"], ["other", "Conv", "wo", "5x4x3x3"]]
    assert " ".join(rows[2][7:]) == "shared by 2 nodes (also head_p4)"


def test_repeated_op_types_add_up(capsys, stack):
    model, calib, _ = stack
    code, out, err = cli(capsys, "quantize", model, "--method", "rtn", "--op-types", "Gemm", "--op-types",
                         "Conv,Gemm", "-o", model.parent / "g.onnx", "--no-bn-reestimate")
    assert code == 0, err
    assert "quantized 4 layers, left 0 in float" in out


def test_many_layers_skipped_for_one_reason_are_one_line(capsys, tmp_path):
    path = tmp_path / "cls.onnx"
    code, out, err = cli(capsys, "quantize", os.path.join(REPO, "models/ppocr_cls/ch_ppocr_mobile_v2.0_cls_infer.onnx"),
                         "--method", "rtn", "--op-types", "MatMul", "-o", path, "--no-bn-reestimate")
    assert code == 0, err
    assert [l for l in out.splitlines() if l.startswith("skipped")] == [
        "skipped: 53 layers (Conv): not in --op-types MatMul"]


def test_an_exclude_pattern_that_matches_nothing_is_noted(capsys, stack):
    """A typo in --exclude would otherwise leave the layer quantized without a word; a pattern
    that matches only a weight's name, or a layer also matched by another pattern, is used."""
    model, calib, _ = stack
    report = model.parent / "r.json"
    code, out, err = cli(capsys, "quantize", model, "--calib", calib, "--exclude", "fc", "--exclude", "f*",
                         "--exclude", "conv_1", "--exclude", "w1", "-o", model.parent / "e.onnx", "--report", report)
    assert code == 0, err
    assert [l for l in out.splitlines() if "matched no layer" in l] == [
        "note: --exclude conv_1 matched no layer (onnxobq inspect lists their names)"]
    assert json.loads(report.read_text())["notes"] == ["--exclude conv_1 matched no layer (onnxobq inspect lists "
                                                        "their names)"]
    assert "skipped: conv1 (Conv): excluded by --exclude w1" in out


def fake_weights(path):
    """The float weights of a --format fake model, by tensor name (initializers and Constant nodes)."""
    g = onnx.load(path).graph
    return {**{t.name: onnx.numpy_helper.to_array(t) for t in g.initializer},
            **{n.output[0]: onnx.numpy_helper.to_array(n.attribute[0].t) for n in g.node if n.op_type == "Constant"}}


def test_layer_bits_give_matching_layers_their_own_width(capsys, stack):
    """Each layer's weights equal those of a run at its bit width for every layer (its Hessian
    does not depend on the other layers' widths): conv1 at 8, fc at 6, the rest at --bits 4."""
    model, calib, _ = stack
    tmp = model.parent
    common = ["--calib", calib, "--format", "fake", "--no-bn-reestimate"]
    for bits in (4, 6, 8):
        code, _, err = cli(capsys, "quantize", model, "--bits", bits, *common, "-o", tmp / f"u{bits}.onnx", "-q")
        assert code == 0, err
    code, out, err = cli(capsys, "quantize", model, "--bits", 4, "--layer-bits", "conv1=8", "--layer-bits", "f*=6",
                         "--layer-bits", "fc=3", "--layer-bits", "head*=8", *common, "-o", tmp / "mixed.onnx",
                         "--report", tmp / "r.json")
    assert code == 0, err
    report = json.loads((tmp / "r.json").read_text())
    assert [(l["name"], l["bits"]) for l in report["layers"]] == [("conv1", 8), ("dw", 4), ("grouped", 4), ("fc", 6)]
    assert report["settings"]["layer_bits"] == [["conv1", 8], ["f*", 6], ["fc", 3], ["head*", 8]]
    assert report["notes"] == ["--layer-bits head* matched no layer (onnxobq inspect lists their names)"]
    assert report["storage"] == ("float weights on a 4-bit grid (2 layers), float weights on a 6-bit grid (1 layer), "
                                 "float weights on an 8-bit grid (1 layer)")
    mixed, uniform = fake_weights(tmp / "mixed.onnx"), {b: fake_weights(tmp / f"u{b}.onnx") for b in (4, 6, 8)}
    for name, bits in (("w1", 8), ("w2", 4), ("w3", 4), ("wg", 6)):
        np.testing.assert_array_equal(mixed[name], uniform[bits][name])
        assert not np.array_equal(mixed[name], uniform[4 if bits != 4 else 8][name])


def test_layer_bits_in_qdq_store_each_width_in_its_type(capsys, stack):
    model, calib, _ = stack
    code, out, err = cli(capsys, "quantize", model, "--bits", 4, "--layer-bits", "conv1=8", "--calib", calib,
                         "--opset", 21, "-o", model.parent / "q.onnx")
    assert code == 0, err
    q = onnx.load(model.parent / "q.onnx")
    types = {t.name: t.data_type for t in dq_initializers(q)}
    assert sorted(types.values()) == sorted([onnx.TensorProto.INT4] * 3 + [onnx.TensorProto.INT8])
    assert ("wrote " + str(model.parent / "q.onnx") + " (INT4 weights holding 4-bit codes (3 layers), "
            "INT8 weights holding 8-bit codes (1 layer))") in out.splitlines()


def test_a_head_shared_by_two_levels_is_one_layer_on_both_levels_hessians(capsys, tmp_path):
    """One solve on the merged Hessian (the capture's, checked against brute force in
    test_capture), written once and fed to both uses; the BN after one use is not folded."""
    import onnx_graphsurgeon as gs
    from onnxobq.calibration import CalibConfig
    from onnxobq.capturing import capture_hessians
    from onnxobq.config import SolveConfig
    from onnxobq.graph import scan_layers
    from onnxobq.quant import GridSpec
    from onnxobq.solve import solve_layer

    model = builders.shared_head()
    onnx.save(model, tmp_path / "m.onnx")
    x = np.random.default_rng(5).standard_normal((8, 3, 12, 12)).astype(np.float32)
    np.savez(tmp_path / "c.npz", x=x)
    code, out, err = cli(capsys, "quantize", tmp_path / "m.onnx", "--bits", 4, "--calib", tmp_path / "c.npz",
                         "--format", "fake", "-o", tmp_path / "fake.onnx", "--report", tmp_path / "r.json")
    assert code == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    assert [l["name"] for l in report["layers"]] == ["stem", "down", "head_p3", "other"]
    q = onnx.load(tmp_path / "fake.onnx")
    assert sum(n.op_type == "BatchNormalization" for n in q.graph.node) == 1
    assert report["bn"]["notes"][0] == "head_p3: neither corrected nor given a BN fold (its weight is shared by 2 nodes)"
    scan = scan_layers(gs.import_onnx(model))
    head = next(l for l in scan.layers if l.name == "head_p3")
    H = capture_hessians(model, scan.layers, CalibConfig(source=str(tmp_path / "c.npz")), builders.cpu()).hessians
    expect, _ = solve_layer(head, scan.weights["head_p3"], H[head.hessian_key],
                            SolveConfig(grid=GridSpec(bits=4)), builders.cpu())
    written = next(onnx.numpy_helper.to_array(t) for t in q.graph.initializer if t.name == "wh")
    np.testing.assert_array_equal(written, expect.weight())
    code, out, err = cli(capsys, "quantize", tmp_path / "m.onnx", "--bits", 4, "--calib", tmp_path / "c.npz",
                         "-o", tmp_path / "qdq.onnx")
    assert code == 0, err
    q = onnx.load(tmp_path / "qdq.onnx")
    convs = {n.name: n for n in q.graph.node if n.op_type == "Conv"}
    dq = {n.output[0] for n in q.graph.node if n.op_type == "DequantizeLinear"}
    assert len(dq) == 4 and convs["head_p3"].input[1] == convs["head_p4"].input[1] in dq
    np.testing.assert_allclose(outputs(tmp_path / "qdq.onnx", x)[1], outputs(tmp_path / "fake.onnx", x)[1],
                               rtol=1e-5, atol=1e-5)


def test_exclude_and_layer_bits_match_the_other_uses_of_a_shared_weight(capsys, tmp_path):
    onnx.save(builders.shared_head(), tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", x=np.random.default_rng(6).standard_normal((4, 3, 12, 12)).astype(np.float32))
    common = ["--bits", 4, "--calib", tmp_path / "c.npz", "--no-bn-reestimate", "-o", tmp_path / "q.onnx",
              "--report", tmp_path / "r.json", "-q"]
    assert cli(capsys, "quantize", tmp_path / "m.onnx", "--layer-bits", "head_p4=8", *common)[0] == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert [(l["name"], l["bits"]) for l in report["layers"]] == [("stem", 4), ("down", 4), ("head_p3", 8), ("other", 4)]
    assert report["notes"] == []
    assert cli(capsys, "quantize", tmp_path / "m.onnx", "--exclude", "head_p4", *common, "--overwrite")[0] == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert [l["name"] for l in report["layers"]] == ["stem", "down", "other"]
    assert report["skipped"][0]["name"] == "head_p3" and report["skipped"][0]["reason"] == "excluded by --exclude head_p4"


def test_convs_sharing_a_bias_are_neither_corrected_nor_folded(capsys, tmp_path):
    """Correcting one would change the other's bias too."""
    from onnx import helper, numpy_helper
    r = np.random.default_rng(9)
    inits = [numpy_helper.from_array((0.3 * r.standard_normal((4, 3, 3, 3))).astype(np.float32), "wa"),
             numpy_helper.from_array((0.3 * r.standard_normal((4, 3, 3, 3))).astype(np.float32), "wb"),
             numpy_helper.from_array(np.zeros(4, np.float32), "b")]
    nodes = [helper.make_node("Conv", ["x", "wa", "b"], ["ya"], name="ca", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["x", "wb", "b"], ["yb"], name="cb", pads=[1, 1, 1, 1])]
    model = builders.make_model(nodes, [builders.fvi("x", [None, 3, 8, 8])],
                                [builders.fvi("ya", [None, 4, 8, 8]), builders.fvi("yb", [None, 4, 8, 8])], inits)
    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", x=r.standard_normal((8, 3, 8, 8)).astype(np.float32))
    code, _, err = cli(capsys, "quantize", tmp_path / "m.onnx", "--bits", 3, "--calib", tmp_path / "c.npz",
                       "-o", tmp_path / "q.onnx", "--report", tmp_path / "r.json", "-q")
    assert code == 0, err
    bn = json.loads((tmp_path / "r.json").read_text())["bn"]
    assert bn["notes"] == ["ca: neither corrected nor given a BN fold (its bias is shared by 2 nodes)",
                           "cb: neither corrected nor given a BN fold (its bias is shared by 2 nodes)",
                           "no BatchNormalization nodes and no Convs to correct"]
    q = onnx.load(tmp_path / "q.onnx")
    assert numpy_helper.to_array(next(t for t in q.graph.initializer if t.name == "b")).tolist() == [0.0] * 4


def test_no_command_prints_the_help(capsys):
    code, out, err = cli(capsys)
    assert (code, err) == (0, "")
    assert out.startswith("Usage: onnxobq [OPTIONS] COMMAND [ARGS]...") and "quantize" in out and "compare" in out


def test_inspect_lists_layers_and_totals(capsys, stack):
    model, _, _ = stack
    code, out, _ = cli(capsys, "inspect", model)
    assert code == 0
    assert "dw" in out and "8x9" not in out and "1x9" in out and "Constant node" in out
    assert "4 quantizable layers (3 Conv, 1 Gemm), 360 weights; 0 left in float" in out
    code, out, _ = cli(capsys, "inspect", model, "--json")
    assert [l["name"] for l in json.loads(out)["layers"]] == ["conv1", "dw", "grouped", "fc"]


def computed_weights():
    """conv_stack with conv1's weight stored as float16 behind a Cast and fc's stored transposed
    behind a Transpose, the way some exports compute weights from constants; and the plain
    conv_stack holding the very values those compute."""
    from onnx import TensorProto, helper, numpy_helper
    plain, computed = builders.conv_stack(), builders.conv_stack()
    w1 = numpy_helper.to_array(next(t for t in plain.graph.initializer if t.name == "w1")).astype(np.float16)
    next(t for t in plain.graph.initializer if t.name == "w1").CopyFrom(numpy_helper.from_array(w1.astype(np.float32), "w1"))
    for t in list(computed.graph.initializer):
        if t.name == "w1":
            t.CopyFrom(numpy_helper.from_array(w1, "w1_16"))
        elif t.name == "wg":
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).T.copy(), "wg_t"))
    computed.graph.node.insert(0, helper.make_node("Cast", ["w1_16"], ["w1"], to=TensorProto.FLOAT, name="cast"))
    computed.graph.node.insert(1, helper.make_node("Transpose", ["wg_t"], ["wg"], perm=[1, 0], name="t"))
    return computed, plain


def test_weights_computed_from_constants_are_quantized_as_the_plain_weights(capsys, stack):
    """Folded into initializers first: the run and its model equal those of the same weights stored plainly."""
    _, calib, x = stack
    tmp = calib.parent
    computed, plain = computed_weights()
    onnx.save(computed, tmp / "computed.onnx")
    onnx.save(plain, tmp / "plain.onnx")
    code, out, _ = cli(capsys, "inspect", tmp / "computed.onnx")
    assert code == 0 and "folded Cast" in out and "folded Transpose" in out and "0 left in float" in out
    note = "folded the constant subgraphs that compute 2 weights into initializers (Cast 1, Transpose 1)"
    assert f"note: {note}" in out.splitlines()
    reports = {}
    for name in ("computed", "plain"):
        code, out, err = cli(capsys, "quantize", tmp / f"{name}.onnx", "--bits", 4, "--calib", calib,
                             "-o", tmp / f"q_{name}.onnx", "--report", tmp / f"{name}.json")
        assert code == 0, err
        assert (f"note: {note}" in out.splitlines()) == (name == "computed")
        reports[name] = json.loads((tmp / f"{name}.json").read_text())
    assert reports["computed"]["notes"] == [note] and reports["plain"]["notes"] == []
    errors = {name: [l["error"] for l in r["layers"]] for name, r in reports.items()}
    assert errors["computed"] == errors["plain"]
    q = onnx.load(tmp / "q_computed.onnx")
    assert sum(n.op_type == "DequantizeLinear" for n in q.graph.node) == 4
    assert not any(n.op_type in ("Cast", "Transpose") for n in q.graph.node)
    np.testing.assert_array_equal(outputs(tmp / "q_computed.onnx", x)[0], outputs(tmp / "q_plain.onnx", x)[0])


def test_compare_reports_agreement(capsys, stack):
    model, calib, _ = stack
    code, out, err = cli(capsys, "compare", model, model, "--calib", calib, "--json")
    assert code == 0, err
    (r,) = json.loads(out)
    assert r["output"] == "y" and r["sqnr_db"] == float("inf") and r["cosine"] == pytest.approx(1.0)
    assert r["top1_agreement"] == 1.0
    cli(capsys, "quantize", model, "--bits", 2, "--method", "rtn", "-o", model.parent / "q2.onnx", "-q")
    code, out, err = cli(capsys, "compare", model, model.parent / "q2.onnx", "--calib", calib)
    assert code == 0, err
    assert "SQNR dB" in out and "y " in out


def test_compare_of_a_batch_one_model_on_two_sessions_gives_the_one_session_figures(capsys, tmp_path, monkeypatch):
    from onnxobq import backend, runtime
    fixed = builders.conv_stack(batch=1)
    onnx.save(fixed, tmp_path / "one.onnx")
    np.savez(tmp_path / "c.npz", x=builders.rng(4).standard_normal((5, 3, 12, 12)).astype(np.float32))
    assert cli(capsys, "quantize", tmp_path / "one.onnx", "--bits", 3, "--method", "rtn",
               "-o", tmp_path / "q.onnx", "-q")[0] == 0
    monkeypatch.setattr(backend, "usable_cores", lambda: 2)
    made = []
    real = runtime.session
    monkeypatch.setattr(runtime, "session", lambda *a, **k: made.append(k.get("threads")) or real(*a, **k))
    runs = []
    for workers in (None, (1, 1)):
        if workers:
            monkeypatch.setattr(runtime, "session_workers", lambda device, batch, size=0: workers)
        code, out, err = cli(capsys, "compare", tmp_path / "one.onnx", tmp_path / "q.onnx", "--calib",
                             tmp_path / "c.npz", "--json")
        assert code == 0, err
        runs.append(json.loads(out))
    assert made == [1, 1, 1, 1, 1, 1]           # two sessions of each model, then one of each
    (side,), (alone,) = runs
    assert side["sqnr_db"] < 40
    for key in ("sqnr_db", "cosine", "top1_agreement"):
        assert side[key] == alone[key]


def test_bundled_model_fastobq_beats_rtn(capsys, tmp_path):
    """On the real PP-OCR classifier in models/, FastOBQ's outputs stay closer to FP32 than RTN's
    on the held-out lines."""
    model = os.path.join(REPO, "models", "ppocr_cls", "ch_ppocr_mobile_v2.0_cls_infer.onnx")
    calib = os.path.join(REPO, "models", "ppocr_cls", "calib.npz")
    held_out = os.path.join(REPO, "models", "ppocr_cls", "eval.npz")
    sqnr = {}
    for method in ("rtn", "fastobq"):
        out = tmp_path / f"{method}.onnx"
        code, _, err = cli(capsys, "quantize", model, "--bits", 4, "--method", method, "--calib", calib,
                           "--no-bn-reestimate", "-o", out, "-q")
        assert code == 0, err
        code, text, err = cli(capsys, "compare", model, out, "--calib", held_out, "--json")
        sqnr[method] = json.loads(text)[0]["sqnr_db"]
    assert sqnr["fastobq"] > sqnr["rtn"] + 3


@pytest.mark.parametrize("preset, expect", [(None, "20"), ("28", "28")])
def test_the_command_lets_idle_openblas_threads_sleep_unless_the_user_said_otherwise(preset, expect):
    """Set before NumPy loads, so it must come from the command's entry point (onnxobq.__main__),
    which runs before onnxobq imports NumPy; importing onnxobq changes nothing."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    if preset:
        env["OPENBLAS_THREAD_TIMEOUT"] = preset
    code = ("import os, sys, importlib.abc\n"
            "class Watch(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path, target=None):\n"
            "        if name == 'numpy' and 'numpy' not in sys.modules:\n"
            "            print('numpy loads with', os.environ.get('OPENBLAS_THREAD_TIMEOUT'))\n"
            "sys.meta_path.insert(0, Watch())\n"
            "import onnxobq\n"
            "print('after import', os.environ.get('OPENBLAS_THREAD_TIMEOUT'))\n"
            "from onnxobq.__main__ import main\n"
            "sys.argv = ['onnxobq', '--version']\n"
            "main()\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.splitlines()[:2] == [f"after import {preset}", f"numpy loads with {expect}"]
