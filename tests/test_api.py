"""The Python API: what it takes, what it returns, and that it does what the command line does."""
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest

import onnxobq
from onnxobq.cli import main
from onnxobq.report import summary_lines

import builders


@pytest.fixture
def stack(tmp_path):
    """conv_stack (with a BN-free dynamic batch), 16 calibration samples in an .npz."""
    path = tmp_path / "m.onnx"
    onnx.save(builders.conv_stack(), path)
    x = np.random.default_rng(0).standard_normal((16, 3, 12, 12)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    return path, tmp_path / "calib.npz", x


def weights(model) -> dict:
    """The initializers of a model (a path or a ModelProto) by name."""
    model = onnx.load(model) if not isinstance(model, onnx.ModelProto) else model
    return {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}


def same_weights(a, b) -> None:
    a, b = weights(a), weights(b)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_the_package_exposes_the_api_and_imports_nothing_else():
    code = ("import sys, onnxobq\n"
            "heavy = [m for m in ('numpy', 'onnx', 'onnxruntime', 'onnxobq.api') if m in sys.modules]\n"
            "from onnxobq import quantize, inspect, compare, capture\n"
            "print(heavy, [f.__name__ for f in (quantize, inspect, compare, capture)])")
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert out.strip() == "[] ['quantize', 'inspect', 'compare', 'capture']"
    assert {"quantize", "inspect", "compare", "capture", "Report", "Hessians"} <= set(dir(onnxobq))


def test_the_cli_and_the_api_write_the_same_model(stack, capsys):
    model, calib, _ = stack
    args = ["--bits", "3", "--method", "gptq", "--calib", str(calib), "--batch-size", "4", "--group-size", "4",
            "--act-bits", "8", "--act-calib", "max", "--exclude", "dw", "--layer-bits", "fc=6"]
    assert main(["quantize", str(model), *args, "-o", str(model.parent / "cli.onnx"), "-q"]) == 0, capsys.readouterr()
    report = onnxobq.quantize(model, model.parent / "api.onnx", bits=3, method="gptq", calibration=calib, batch_size=4,
                              group_size=4, act_bits=8, act_calib="max", exclude="dw", layer_bits={"fc": 6})
    assert (model.parent / "cli.onnx").read_bytes() == (model.parent / "api.onnx").read_bytes()
    assert report.outputs == [str(model.parent / "api.onnx")] and report.quantized_model is None
    assert [s.name for s in report.layers] == ["conv1", "grouped", "fc"]


def test_a_model_in_memory_comes_back_in_memory(stack):
    model, calib, _ = stack
    written = onnxobq.quantize(model, model.parent / "q.onnx", bits=4, calibration=calib)
    kept = onnxobq.quantize(onnx.load(model), bits=4, calibration=calib)
    assert isinstance(kept.quantized_model, onnx.ModelProto) and kept.outputs == []
    same_weights(model.parent / "q.onnx", kept.quantized_model)
    assert sorted(p.name for p in model.parent.iterdir()) == ["calib.npz", "m.onnx", "q.onnx"]
    assert kept.model == "model (in memory)" and written.model == str(model)
    assert written.model_sha256 == hashlib.sha256(model.read_bytes()).hexdigest()
    assert kept.model_sha256 == hashlib.sha256(onnx.load(model).SerializeToString(deterministic=True)).hexdigest()


class Reader:
    """onnxruntime's CalibrationDataReader protocol: get_next() gives a batch, then None."""

    def __init__(self, x, rewind=True):
        self.x, self.i = x, 0
        if rewind:
            self.rewind = self._rewind

    def get_next(self):
        if self.i >= len(self.x):
            return None
        self.i += 4
        return {"x": self.x[self.i - 4:self.i]}

    def _rewind(self):
        self.i = 0


@pytest.mark.parametrize("form", ["dict", "array", "list", "generator", "reader", "reader without rewind",
                                  "callable"])
def test_every_form_of_data_in_memory_gives_the_model_of_the_file(stack, form):
    """The same 16 samples given as a dict, an array, a list of four batches, a generator, a
    reader (with and without rewind()) or a callable: the same Hessians, BN statistics and model."""
    model, calib, x = stack
    want = onnxobq.quantize(model, bits=4, calibration=calib, batch_size=4).quantized_model
    batches = [{"x": x[i:i + 4]} for i in range(0, 16, 4)]
    data = {"dict": {"x": x}, "array": x, "list": batches, "generator": (b for b in batches),
            "reader": Reader(x), "reader without rewind": Reader(x, rewind=False),
            "callable": lambda: iter(batches)}[form]
    got = onnxobq.quantize(model, bits=4, calibration=data, batch_size=4)
    same_weights(got.quantized_model, want)
    assert got.samples == 16 and got.bn["kept"] and got.calibration["source"] == "in memory"


def test_a_one_shot_iterator_too_big_to_keep_is_a_clear_error(stack, monkeypatch):
    from onnxobq import pipeline
    model, _, x = stack
    monkeypatch.setattr(pipeline, "choose_device", lambda *a: builders.cpu(replay_bytes=0))
    with pytest.raises(onnxobq.UserError, match=r"^calibration \(in memory\): an iterator can be read only once, "
                       r"and the BatchNorm passes need the data again .*give a list or a callable that returns a "
                       r"new iterator, or bn_reestimate=False$"):
        onnxobq.quantize(model, bits=4, calibration=({"x": x[i:i + 4]} for i in range(0, 16, 4)))
    report = onnxobq.quantize(model, bits=4, calibration=({"x": x[i:i + 4]} for i in range(0, 16, 4)),
                              bn_reestimate=False)
    assert report.samples == 16


@pytest.mark.parametrize("kwargs, message", [
    (dict(bits=9), "bits=9: give a whole number from 2 to 8"),
    (dict(method="rtn", order="act"), "method=rtn has no column order; drop order"),
    (dict(act_calib="max"), "act_calib=max sets the scales of act_bits; give act_bits=8 or drop act_calib"),
    (dict(narrow_range=True, symmetric=False), "narrow_range needs a symmetric grid; drop symmetric=False"),
    (dict(calibration="random", preprocess="yolo"), "calibration=random: draws random tensors, and preset apply to "
                                                    "image folders only; drop preset"),
    (dict(calibration="random", preprocess={"meen": 1}), "preprocess: 'meen' is not an image option"),
    (dict(), "method=fastobq needs calibration data: give calibration=FOLDER|FILE, or calibration=random "
             "for a smoke run"),
    (dict(calibration=[1, 2]), "calibration (in memory): item 0 is a int, not a dict of arrays keyed by input name"),
    (dict(calibration=3.5), "calibration: a float is not calibration data"),
    (dict(damp=float("nan"), calibration="random"), "damp=nan: give a finite number above 0"),
    (dict(layer_bits={"conv1": 1}, calibration="random"), "layer_bits['conv1']=1: give a whole number from 2 to 8"),
])
def test_errors_name_the_python_parameter(stack, kwargs, message):
    model, _, _ = stack
    with pytest.raises(onnxobq.UserError) as err:
        onnxobq.quantize(model, model.parent / "q.onnx", **kwargs)
    assert str(err.value).startswith(message), str(err.value)
    assert not (model.parent / "q.onnx").exists()


def test_an_existing_output_is_kept_unless_overwrite(stack):
    model, calib, _ = stack
    out = model.parent / "q.onnx"
    out.write_bytes(b"keep me")
    with pytest.raises(onnxobq.UserError, match=f"^output={out}: the file exists; give another path, or overwrite "
                                                f"to replace it$"):
        onnxobq.quantize(model, out, method="rtn")
    assert out.read_bytes() == b"keep me"
    onnxobq.quantize(model, out, method="rtn", overwrite=True)
    assert onnx.load(out).graph.node


def test_one_capture_serves_a_sweep(stack, tmp_path):
    """capture once, then quantize with other bits and methods: the models of runs that capture
    themselves; saved and read back from a file, too."""
    model, calib, _ = stack
    h = onnxobq.capture(model, calib, batch_size=4, act_ranges=True)
    assert h.samples == 16 and "4 layers" in repr(h)
    h.save(tmp_path / "h.npz")
    for bits, method in ((3, "fastobq"), (6, "gptq")):
        fresh = onnxobq.quantize(model, bits=bits, method=method, calibration=calib, batch_size=4, act_bits=8)
        for given in (h, tmp_path / "h.npz"):
            reused = onnxobq.quantize(model, bits=bits, method=method, calibration=calib, batch_size=4, act_bits=8,
                                      hessians=given)
            same_weights(reused.quantized_model, fresh.quantized_model)
            assert [s.error for s in reused.layers] == [s.error for s in fresh.layers]


def test_hessians_of_another_model_are_refused(stack, tmp_path):
    model, calib, _ = stack
    h = onnxobq.capture(model, calib)
    onnx.save(builders.conv_stack(seed=1), tmp_path / "other.onnx")
    with pytest.raises(onnxobq.UserError, match=r"^hessians \(captured\): captured from another model \(m.onnx\), not "
                       r".*other.onnx; capture them again with onnxobq.capture$"):
        onnxobq.quantize(tmp_path / "other.onnx", calibration=calib, hessians=h)


def test_rtn_captures_only_what_it_uses(stack):
    model, calib, _ = stack
    plain = onnxobq.quantize(model, method="rtn", calibration=calib)
    assert "capture" not in plain.stages and plain.samples == 0 and plain.bn["samples"] == 16
    assert all(s.error is None for s in plain.layers)
    ranges = onnxobq.quantize(model, method="rtn", calibration=calib, act_bits=8)
    assert "capture" in ranges.stages and ranges.samples == 16 and ranges.activations["tensors"] == 4


def test_the_report_records_versions_the_model_and_the_data(stack, tmp_path):
    model, calib, _ = stack
    report = onnxobq.quantize(model, tmp_path / "q.onnx", bits=4, calibration=calib, report=tmp_path / "r.json")
    saved = json.loads((tmp_path / "r.json").read_text())
    import numpy
    import onnxruntime
    assert saved["versions"]["onnx"] == onnx.__version__ and saved["versions"]["numpy"] == numpy.__version__
    assert saved["versions"]["onnxruntime"] == onnxruntime.__version__ and saved["versions"]["onnxobq"]
    assert saved["model_sha256"] == hashlib.sha256(model.read_bytes()).hexdigest()
    assert saved["calibration"] == {"source": str(calib), "kind": "arrays", "samples": None, "batch_size": 8}
    # every parameter: the four layers' 360 weights quantized; the two biases (8 + 5) stay in float
    assert saved["weights"] == {"quantized": 360, "float": 13, "float_by_op": {"Conv": 8, "Gemm": 5}}
    assert json.loads(json.dumps(report.to_dict())) == saved
    assert json.loads(dict((p.key, p.value) for p in onnx.load(tmp_path / "q.onnx").metadata_props)
                      ["onnxobq.calibration"]) == saved["calibration"]


def test_inspect_returns_records(stack):
    model, _, _ = stack
    found = onnxobq.inspect(model)
    assert [(i.name, i.shape, i.dtype) for i in found.inputs] == [("x", (None, 3, 12, 12), "float32")]
    assert [l.name for l in found.quantizable] == ["conv1", "dw", "grouped", "fc"] and not found.skipped
    assert found.layers[1].to_dict() == {"name": "dw", "op": "Conv", "weight": "w2", "shape": (8, 1, 3, 3), "rows": 1,
                                         "cols": 9, "groups": 8, "source": "initializer", "shared_with": (),
                                         "quantizable": True, "reason": ""}
    assert found.weights == {"quantized": 360, "float": 13, "float_by_op": {"Conv": 8, "Gemm": 5}}
    assert json.loads(json.dumps(found.to_dict()))["inputs"] == [{"name": "x", "shape": [None, 3, 12, 12],
                                                                   "dtype": "float32"}]


def test_compare_says_what_it_ran_on_and_warns_on_the_calibration_data(stack, tmp_path):
    model, calib, x = stack
    onnxobq.quantize(model, tmp_path / "q.onnx", bits=4, calibration="random", samples=16)
    np.savez(tmp_path / "held.npz", x=x[:6] + 1)
    held = onnxobq.compare(model, tmp_path / "q.onnx", tmp_path / "held.npz")
    assert held.samples == 6 and held.warnings == [] and held.calibration["source"] == str(tmp_path / "held.npz")
    (y,) = held.outputs
    assert y.output == "y" and 0 < y.sqnr_db < 60 and 0.9 < y.cosine <= 1 and y.top1_agreement is not None
    same = onnxobq.compare(model, tmp_path / "q.onnx", "random", samples=16)
    assert same.warnings == ["calibration=random seed=0: this is the data the model was quantized on, so the "
                             "figures measure the calibration set, not how the model does on other data; give "
                             "another seed"]
    assert onnxobq.compare(model, tmp_path / "q.onnx", "random", samples=16, seed=1).warnings == []


def test_the_batchnorm_bar_has_a_total(tmp_path):
    calib = builders.rng(1).standard_normal((16, 4, 10, 10)).astype(np.float32)
    onnx.save(builders.bn_net(calib=calib), tmp_path / "bn.onnx")
    seen = {}

    class Bars(onnxobq.pipeline.Progress):
        def start(self, what, total):
            seen[what] = [total, 0]
            self.what = what

        def advance(self, n=1):
            seen[self.what][1] += n

    onnxobq.quantize(tmp_path / "bn.onnx", bits=4, calibration={"x": calib}, bn_samples=8, progress=Bars())
    assert seen["batchnorm"] == [32, 32] and seen["calibration"] == [16, 16] and seen["layers"] == [3, 3]


def test_what_stays_in_float_is_counted_by_op(tmp_path, capsys):
    """An LSTM's weights stay in float (as ddddocr's recognizer's do): the report and the summary
    count them, beside the MatMul that is quantized."""
    from onnx import TensorProto, helper, numpy_helper
    r = builders.rng(3)
    hidden, inputs = 6, 4
    W = r.standard_normal((1, 4 * hidden, inputs)).astype(np.float32)
    R = r.standard_normal((1, 4 * hidden, hidden)).astype(np.float32)
    B = r.standard_normal((1, 8 * hidden)).astype(np.float32)
    M = r.standard_normal((hidden, 3)).astype(np.float32)
    nodes = [helper.make_node("LSTM", ["x", "W", "R", "B"], ["y"], name="lstm", hidden_size=hidden),
             helper.make_node("Squeeze", ["y", "axes"], ["h"], name="sq"),
             helper.make_node("MatMul", ["h", "M"], ["out"], name="mm")]
    inits = [numpy_helper.from_array(a, n) for a, n in ((W, "W"), (R, "R"), (B, "B"), (M, "M"))]
    inits.append(numpy_helper.from_array(np.array([1], np.int64), "axes"))
    model = builders.make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, 2, inputs])],
                                [helper.make_tensor_value_info("out", TensorProto.FLOAT, [5, 2, 3])], inits)
    onnx.save(model, tmp_path / "lstm.onnx")
    report = onnxobq.quantize(tmp_path / "lstm.onnx", tmp_path / "q.onnx", method="rtn")
    assert report.weights == {"quantized": M.size, "float": W.size + R.size + B.size,
                              "float_by_op": {"LSTM": W.size + R.size + B.size}}
    assert main(["inspect", str(tmp_path / "lstm.onnx")]) == 0
    assert "parameters: 18 quantized, 288 left in float (94.1%): LSTM 288" in capsys.readouterr().out   # 96 + 144 + 48


def test_batchnorms_folded_into_their_convs_no_longer_count_as_float(tmp_path):
    calib = builders.rng(1).standard_normal((16, 4, 10, 10)).astype(np.float32)
    onnx.save(builders.bn_net(calib=calib), tmp_path / "bn.onnx")
    quantized = 16 * 4 * 9 + 16 * 16 * 9 + 6 * 16
    kept = onnxobq.quantize(tmp_path / "bn.onnx", bits=4, calibration={"x": calib})
    assert kept.bn["kept"] and kept.bn["folded"] == 2
    assert kept.weights == {"quantized": quantized, "float": 0, "float_by_op": {}}
    plain = onnxobq.quantize(tmp_path / "bn.onnx", bits=4, calibration={"x": calib}, bn_reestimate=False)
    assert plain.weights == {"quantized": quantized, "float": 2 * 4 * 16, "float_by_op": {"BatchNormalization": 128}}


def test_rtn_runs_batchnorm_on_bn_samples_of_data_in_memory(stack):
    """With no capture to read it first, the BatchNorm passes still spread bn_samples over an
    iterable of unknown length (one pass reads it, kept in memory)."""
    model, _, x = stack
    report = onnxobq.quantize(model, method="rtn", calibration=[{"x": x[i:i + 4]} for i in range(0, 16, 4)],
                              bn_samples=8)
    assert report.bn["samples"] == 8 and report.samples == 0
    assert "no Hessians captured" in summary_lines(report)[0]


@pytest.mark.parametrize("kwargs, message", [
    (dict(calibration="random", seed=-1), "seed=-1: give a whole number of 0 or more"),
    (dict(method="rtn", layer_bits="conv1=4"), "layer_bits: give a dict {glob: value} or (glob, value) pairs"),
    (dict(calibration="random", input_shapes={"x": 5}), "input_shapes['x']=5: input 'x' has rank 4"),
])
def test_odd_arguments_are_one_line_errors(stack, kwargs, message):
    model, _, _ = stack
    with pytest.raises(onnxobq.UserError) as err:
        onnxobq.quantize(model, **kwargs)
    assert str(err.value).startswith(message), str(err.value)
    with pytest.raises(onnxobq.UserError, match=r"^model: a int is not a model; give the path of an .onnx file"):
        onnxobq.quantize(5, method="rtn")
    assert onnxobq.quantize(model, method="rtn", bits=np.int64(4)).layers[0].bits == 4


def test_quantizing_an_onnxobq_output_again_keeps_one_calibration_record(stack, tmp_path):
    model, calib, _ = stack
    onnxobq.quantize(model, tmp_path / "fake.onnx", bits=6, calibration=calib, format="fake")
    again = onnxobq.quantize(tmp_path / "fake.onnx", tmp_path / "again.onnx", bits=6, calibration="random")
    keys = [p.key for p in onnx.load(tmp_path / "again.onnx").metadata_props]
    assert keys.count("onnxobq.calibration") == 1 and again.calibration["source"] == "random"
