"""Activation quantization (--act-bits): the |x| histograms, the scales, and the QDQ pairs written."""
import json
import math

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from onnxobq.capturing import capture_hessians
from onnxobq.cli import main
from onnxobq.config import CalibConfig
from onnxobq.graph.layers import scan_layers
from onnxobq.quant.activations import HISTOGRAM_BINS, AbsHistogram, activation_scales, clip_point

import builders


def brute_histogram(x, top):
    return np.bincount(np.minimum((np.abs(x.ravel()) * np.float32(HISTOGRAM_BINS / top)).astype(np.int64),
                                  HISTOGRAM_BINS - 1), minlength=HISTOGRAM_BINS)


def test_a_histogram_counts_every_value_and_keeps_the_largest():
    x = builders.rng(0).standard_normal((4, 3, 5, 5)).astype(np.float32)
    hist = AbsHistogram()
    hist.add(x)
    assert hist.amax == float(np.abs(x).max()) == hist.top
    np.testing.assert_array_equal(hist.counts, brute_histogram(x, hist.top))


def test_a_larger_batch_doubles_the_range_by_merging_bins_in_pairs():
    r = builders.rng(1)
    small, large = r.uniform(-1, 1, 5000).astype(np.float32), r.uniform(-3.5, 3.5, 5000).astype(np.float32)
    hist = AbsHistogram()
    hist.add(small)
    first = hist.top
    hist.add(large)
    assert hist.top == 4 * first and hist.amax == float(np.abs(np.concatenate([small, large])).max())
    assert hist.counts.sum() == 10000
    # the first batch's counts, merged twice, sit where a histogram of the new range puts them
    merged = brute_histogram(small, first).reshape(-1, 4).sum(axis=1)
    np.testing.assert_array_equal(hist.counts[:HISTOGRAM_BINS // 4] - merged,
                                  brute_histogram(large, hist.top)[:HISTOGRAM_BINS // 4])


def test_zeros_then_values_and_nan():
    hist = AbsHistogram()
    hist.add(np.zeros(10, np.float32))
    assert hist.top == 0 and hist.counts[0] == 10
    hist.add(np.array([0.5, -2.0], np.float32))
    assert hist.top == 2.0 and hist.counts[0] == 10 and hist.counts.sum() == 12
    hist.add(np.array([np.nan, 1.0], np.float32))
    assert math.isnan(hist.amax)
    scales, notes = activation_scales({"t": hist, "z": AbsHistogram()}, 8)
    assert scales == {"z": 1.0} and notes == ["activation t held nan on the calibration data: left in float"]


def test_clip_points_against_brute_force_over_the_histogram():
    x = np.concatenate([builders.rng(2).standard_normal(20000), [40.0]]).astype(np.float32)   # one outlier
    hist = AbsHistogram()
    hist.add(x)
    width = hist.top / HISTOGRAM_BINS
    assert clip_point(hist, "max", 127) == hist.amax
    cum = np.cumsum(hist.counts)
    k = next(i for i in range(HISTOGRAM_BINS) if cum[i] >= cum[-1] * 0.9999)
    assert clip_point(hist, "percentile", 127) == pytest.approx((k + 1) * width)
    centres = (np.arange(HISTOGRAM_BINS) + 0.5) * width

    def error(clip):        # rounding inside (step^2 / 12 a value), clipping beyond, bin by bin
        inside = centres < clip
        return ((hist.counts * inside).sum() * (clip / 127) ** 2 / 12
                + (hist.counts * ~inside * (centres - clip) ** 2).sum())
    used = int(np.flatnonzero(hist.counts)[-1]) + 1
    best = min(range(1, used + 1), key=lambda j: error(j * width))
    assert clip_point(hist, "mse", 127) == pytest.approx(best * width)


def test_the_capture_counts_every_layer_input_once(tmp_path):
    model = builders.shared_head()
    layers = scan_layers(gs.import_onnx(model)).layers
    x = builders.rng(5).standard_normal((4, 3, 12, 12)).astype(np.float32)
    np.savez(tmp_path / "c.npz", x=x)
    got = capture_hessians(model, layers, CalibConfig(source=str(tmp_path / "c.npz"), batch_size=3), builders.cpu(), ranges=True)
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend([builders.fvi("p3", None), builders.fvi("p4", None)])
    p3, p4 = builders.run(probe, {"x": x})[3:]
    assert list(got.ranges) == ["x", "p3", "p4"]
    for name, value in (("x", x), ("p3", p3), ("p4", p4)):
        assert got.ranges[name].amax == pytest.approx(float(np.abs(value).max()), rel=1e-6)
        assert got.ranges[name].counts.sum() == value.size


def _gemm_model():
    r = builders.rng(3)
    w = (r.standard_normal((5, 6)) * 0.5).astype(np.float32)
    b = (r.standard_normal(5) * 0.1).astype(np.float32)
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["h"], name="fc1", transB=1),
             helper.make_node("Relu", ["h"], ["a"], name="relu"),
             helper.make_node("MatMul", ["a", "w2"], ["y"], name="fc2"),
             helper.make_node("Add", ["a", "a"], ["z"], name="other")]
    w2 = (r.standard_normal((5, 3)) * 0.5).astype(np.float32)
    return builders.make_model(nodes, [builders.fvi("x", [None, 6])],
                               [builders.fvi("y", [None, 3]), builders.fvi("z", [None, 5])],
                               [numpy_helper.from_array(v, k) for k, v in (("w", w), ("b", b), ("w2", w2))])


def test_quantize_writes_int8_qdq_on_each_layer_input_and_runs_as_the_numpy_reference(tmp_path, capsys):
    model = _gemm_model()
    onnx.save(model, tmp_path / "m.onnx")
    x = builders.rng(4).standard_normal((32, 6)).astype(np.float32)
    np.savez(tmp_path / "c.npz", x=x)
    code = main(["quantize", str(tmp_path / "m.onnx"), "--bits", "8", "--act-bits", "8", "--act-calib", "max",
                 "--calib", str(tmp_path / "c.npz"), "--no-bn-reestimate", "--format", "fake"])
    out = capsys.readouterr().out
    assert code == 0 and "m.w8a8.fastobq.fake.onnx" in out
    q = onnx.load(tmp_path / "m.w8a8.fastobq.fake.onnx")
    onnx.checker.check_model(q)
    nodes = {n.name: n for n in q.graph.node}
    inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    a = np.maximum(x @ numpy_helper.to_array(model.graph.initializer[0]).T
                   + numpy_helper.to_array(model.graph.initializer[1]), 0)
    expect = {"x": np.abs(x).max() / 127, "a": np.abs(a).max() / 127}
    for layer, tensor in (("fc1", "x"), ("fc2", "a")):
        dq = next(n for n in q.graph.node if n.output[0] == nodes[layer].input[0])
        quant = next(n for n in q.graph.node if n.output[0] == dq.input[0])
        assert (dq.op_type, quant.op_type, quant.input[0]) == ("DequantizeLinear", "QuantizeLinear", tensor)
        assert inits[quant.input[1]].shape == () and inits[quant.input[1]] == pytest.approx(expect[tensor], rel=1e-6)
        assert inits[quant.input[2]].dtype == np.int8 and inits[quant.input[2]] == 0
    assert list(nodes["other"].input) == ["a", "a"]              # not a layer: reads the float tensor
    # the reference: fake-quantized inputs through the written (fake-quantized) weights
    def fq(v, s):
        return (np.clip(np.rint(v / s), -128, 127) * s).astype(np.float32)
    W1, B1 = inits[nodes["fc1"].input[1]], inits[nodes["fc1"].input[2]]
    W2 = inits[nodes["fc2"].input[1]]
    s_x, s_a = (inits[next(n for n in q.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == t).input[1]]
                for t in ("x", "a"))
    h = np.maximum(fq(x, s_x) @ W1.T + B1, 0)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    y, z = ort.InferenceSession(q.SerializeToString(), opts).run(None, {"x": x})
    np.testing.assert_allclose(y, fq(h, s_a) @ W2, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(z, 2 * h, rtol=1e-5, atol=1e-6)


def _shared_head(tmp_path):
    """The shared-head pyramid and 8 calibration images for it, in tmp_path."""
    onnx.save(builders.shared_head(), tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", x=builders.rng(6).standard_normal((8, 3, 12, 12)).astype(np.float32))


def _pairs(q):
    """The tensors a model quantizes (sorted), each one's dequantized tensor, and each Conv's input."""
    quantized = {n.input[0]: n.output[0] for n in q.graph.node if n.op_type == "QuantizeLinear"}
    dq_of = {n.input[0]: n.output[0] for n in q.graph.node if n.op_type == "DequantizeLinear"}
    fed = {n.name: n.input[0] for n in q.graph.node if n.op_type == "Conv"}
    return sorted(quantized), {t: dq_of[codes] for t, codes in quantized.items()}, fed


def test_a_tensor_read_by_several_layers_gets_one_pair(tmp_path, capsys):
    _shared_head(tmp_path)
    code = main(["quantize", str(tmp_path / "m.onnx"), "--act-bits", "8", "--act-calib", "max",
                 "--calib", str(tmp_path / "c.npz"), "-o", str(tmp_path / "q.onnx"), "-q", "--no-bn-reestimate"])
    assert code == 0
    tensors, paired, fed = _pairs(onnx.load(tmp_path / "q.onnx"))
    assert tensors == ["p3", "p4", "x"]
    assert fed["down"] == fed["head_p3"] == fed["other"] == paired["p3"]
    capsys.readouterr()
    main(["quantize", str(tmp_path / "m.onnx"), "--act-bits", "8", "--calib", str(tmp_path / "c.npz"),
          "-o", str(tmp_path / "q2.onnx"), "--no-bn-reestimate"])
    assert ("activations: INT8 QuantizeLinear/DequantizeLinear on 5 layer inputs (3 tensors), one scale per "
            "tensor (mse calibration over the 8 calibration samples)") in capsys.readouterr().out


def test_saved_hessians_carry_the_ranges(tmp_path, capsys):
    onnx.save(builders.conv_stack(), tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", x=builders.rng(7).standard_normal((8, 3, 12, 12)).astype(np.float32))
    common = ["--calib", str(tmp_path / "c.npz"), "--no-bn-reestimate", "-q"]
    args = ["quantize", str(tmp_path / "m.onnx"), "--act-bits", "8", *common]
    assert main(args + ["-o", str(tmp_path / "a.onnx"), "--save-hessians", str(tmp_path / "h.npz")]) == 0
    assert main(args + ["-o", str(tmp_path / "b.onnx"), "--hessians", str(tmp_path / "h.npz")]) == 0
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    assert main(["quantize", str(tmp_path / "m.onnx"), *common, "-o", str(tmp_path / "c.onnx"),
                 "--save-hessians", str(tmp_path / "plain.npz")]) == 0
    capsys.readouterr()
    assert main(args + ["-o", str(tmp_path / "d.onnx"), "--hessians", str(tmp_path / "plain.npz")]) == 2
    assert capsys.readouterr().err == (f"onnxobq: error: --hessians {tmp_path / 'plain.npz'}: saved without the "
                                       "activation ranges that --act-bits needs; capture them again with "
                                       "--act-bits and --save-hessians\n")
    assert not (tmp_path / "d.onnx").exists()


def test_act_bits_without_data_and_act_calib_without_act_bits_are_errors(tmp_path, capsys):
    onnx.save(builders.conv_stack(), tmp_path / "m.onnx")
    assert main(["quantize", str(tmp_path / "m.onnx"), "--method", "rtn", "--act-bits", "8", "--no-bn-reestimate"]) == 2
    assert capsys.readouterr().err == ("onnxobq: error: --act-bits 8 needs calibration data for the activations' "
                                       "ranges: give --calib FOLDER|FILE, or --calib random for a smoke run\n")
    assert main(["quantize", str(tmp_path / "m.onnx"), "--act-calib", "mse", "--calib", "random"]) == 2
    err = capsys.readouterr().err
    assert "--act-calib mse sets the scales of --act-bits; give --act-bits 8 or drop --act-calib" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_act_exclude_keeps_those_layers_inputs_in_float(tmp_path, capsys):
    # p3 is read by three convs: the excluded node of the shared head gets the float tensor, the
    # other two the pair; the head's other node (on p4) keeps its pair
    _shared_head(tmp_path)
    code = main(["quantize", str(tmp_path / "m.onnx"), "--act-bits", "8", "--calib", str(tmp_path / "c.npz"),
                 "--act-exclude", "head_p3", "--act-exclude", "nothing*", "-o", str(tmp_path / "q.onnx"),
                 "--no-bn-reestimate", "--report", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    assert code == 0
    q = onnx.load(tmp_path / "q.onnx")
    tensors, paired, fed = _pairs(q)
    assert tensors == ["p3", "p4", "x"]
    assert fed["down"] == fed["other"] == paired["p3"] and (fed["head_p3"], fed["head_p4"]) == ("p3", paired["p4"])
    assert sum(n.op_type == "DequantizeLinear" and n.input[0].endswith("_quantized") and "act" not in n.input[0]
               for n in q.graph.node) == 4                       # every weight is still quantized
    assert "on 4 layer inputs (3 tensors), one scale per tensor (mse calibration over the 8 calibration " \
           "samples); 1 layer input kept in float by --act-exclude" in out
    assert "note: --act-exclude nothing* matched no layer (onnxobq inspect lists their names)" in out
    assert json.loads((tmp_path / "r.json").read_text())["settings"]["act_exclude"] == ["head_p3", "nothing*"]


def test_act_exclude_without_act_bits_is_an_error(tmp_path, capsys):
    onnx.save(builders.conv_stack(), tmp_path / "m.onnx")
    assert main(["quantize", str(tmp_path / "m.onnx"), "--act-exclude", "fc", "--calib", "random"]) == 2
    err = capsys.readouterr().err
    assert err == ("onnxobq: error: --act-exclude fc keeps some layer inputs out "
                   "of --act-bits; give --act-bits 8 or drop --act-exclude\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_act_exclude_is_counted_and_noted_where_it_reaches_only_skipped_layers(tmp_path, capsys):
    onnx.save(builders.conv_stack(), tmp_path / "m.onnx")
    code = main(["quantize", str(tmp_path / "m.onnx"), "--act-bits", "8", "--calib", "random", "--exclude", "fc",
                 "--act-exclude", "fc", "--act-exclude", "dw", "-o", str(tmp_path / "q.onnx"), "--no-bn-reestimate",
                 "--report", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    assert code == 0
    assert "note: --act-exclude fc matched only layers left in float" in out
    assert ("activations: INT8 QuantizeLinear/DequantizeLinear on 2 layer inputs (2 tensors), one scale per tensor "
            "(mse calibration over the 8 calibration samples); 1 layer input kept in float by --act-exclude") in out
    assert json.loads((tmp_path / "r.json").read_text())["activations"]["excluded"] == ["dw"]


@pytest.mark.parametrize("option,value", [("--act-exclude", " "), ("--exclude", ""), ("--layer-group-size", " =4"),
                                          ("--layer-bits", "=8")])
def test_a_blank_pattern_is_one_line(tmp_path, capsys, option, value):
    onnx.save(builders.conv_stack(), tmp_path / "m.onnx")
    assert main(["quantize", str(tmp_path / "m.onnx"), "--act-bits", "8", "--calib", "random", option, value,
                 "-o", str(tmp_path / "q.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"onnxobq: error: Invalid value for '{option}': {value!r}: give ") and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
