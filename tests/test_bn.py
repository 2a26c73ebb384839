"""BatchNorm re-estimation: the statistics it writes, the error it removes, and exact folding."""
import dataclasses
import json

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest

from onnxobq.bn.stage import reestimate
from onnxobq.calibration import CalibConfig
from onnxobq.cli import main
from onnxobq.config import BNConfig, QuantizeConfig, SolveConfig
from onnxobq.export import build_model
from onnxobq.graph import scan_layers
from onnxobq.types import Captured
from onnxobq.pipeline import Progress
from onnxobq.solve import solve_all
from onnxobq.quant import GridSpec

import builders

N = 32


@pytest.fixture
def data(tmp_path):
    x = np.random.default_rng(7).standard_normal((N, 4, 10, 10)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    model = builders.bn_net(calib=x)       # BN statistics are the float model's own on x
    return model, x, CalibConfig(source=str(tmp_path / "calib.npz"), batch_size=N)


def rtn_layers(model, bits=3):
    scan = scan_layers(gs.import_onnx(model))
    cfg = QuantizeConfig(model="", output="", solve=SolveConfig(method="rtn", grid=GridSpec(bits=bits)))
    return solve_all(scan, Captured({}, {}, 0), cfg, builders.cpu(), Progress())[0]


def moments(model, x, names):
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(builders.fvi(n, None) for n in names)
    got = builders.run(probe, {"x": x})[1:]
    return {n: (a.mean(axis=(0, 2, 3)), a.std(axis=(0, 2, 3))) for n, a in zip(names, got)}


def test_reestimated_statistics_are_those_of_the_final_model(data):
    """With the whole set in one batch, the train-mode pass is exact: every BN's new running
    statistics are the mean and variance of its input in the model that is written."""
    model, x, calib = data
    out = reestimate(model, rtn_layers(model), BNConfig(mode="reestimate", fold=False, correct_folded=False),
                     calib, opset=13, symmetric=True)
    final = build_model(model, out.qlayers, "fake", 13, True, out.edits)
    m = moments(final, x, ["c1", "c2"])
    for edit, name in zip(out.edits, ["c1", "c2"]):
        np.testing.assert_allclose(edit.mean, m[name][0], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(edit.var, m[name][1] ** 2, rtol=1e-3, atol=1e-4)


def test_match_mode_gives_every_bn_and_conv_output_the_float_statistics(data):
    model, x, calib = data
    out = reestimate(model, rtn_layers(model), BNConfig(mode="match", fold=True, correct_folded=True),
                     calib, opset=13, symmetric=True)
    assert out.reestimated == 2 and out.folded == 2 and out.corrected == 1
    final = build_model(model, out.qlayers, "fake", 13, True, out.edits)
    names = ["n1", "n2", "y"]
    want, got = moments(model, x, names), moments(final, x, names)
    for n in names:
        np.testing.assert_allclose(got[n][0], want[n][0], atol=2e-3)
        np.testing.assert_allclose(got[n][1], want[n][1], rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("mode", ["reestimate", "match"])
def test_reestimation_lowers_the_output_error(data, mode):
    model, _, calib = data
    out = reestimate(model, rtn_layers(model), BNConfig(mode=mode), calib, opset=13, symmetric=True)
    assert out.error_after < 0.9 * out.error_before
    assert out.kept


@pytest.mark.parametrize("groups", [[], ["--group-size", "5"]])
def test_folding_is_exact_and_qdq_matches(capsys, data, tmp_path, groups):
    model, x, _ = data
    onnx.save(model, tmp_path / "bn.onnx")
    runs = {}
    for name, args in {"fold": ["--format", "fake"], "nofold": ["--format", "fake", "--no-bn-fold"],
                       "qdq": ["--format", "qdq"]}.items():
        code = main(["quantize", str(tmp_path / "bn.onnx"), "--bits", "3", "--calib",
                     str(tmp_path / "calib.npz"), "--batch-size", str(N),
                     "-o", str(tmp_path / f"{name}.onnx"), "-q", *args, *groups])
        assert code == 0, capsys.readouterr().err
        runs[name] = onnx.load(tmp_path / f"{name}.onnx")
    bn_count = {k: sum(n.op_type == "BatchNormalization" for n in m.graph.node) for k, m in runs.items()}
    assert bn_count == {"fold": 0, "nofold": 2, "qdq": 0}
    y = {k: builders.run(m, {"x": x})[0] for k, m in runs.items()}
    np.testing.assert_allclose(y["fold"], y["nofold"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(y["qdq"], y["fold"], rtol=1e-5, atol=1e-5)


def test_the_summary_shows_the_error_before_and_after(capsys, data, tmp_path):
    model, _, _ = data
    onnx.save(model, tmp_path / "bn.onnx")
    code = main(["quantize", str(tmp_path / "bn.onnx"), "--bits", "3", "--calib", str(tmp_path / "calib.npz"),
                 "-o", str(tmp_path / "q.onnx")])
    out = capsys.readouterr().out
    assert code == 0
    line = next(l for l in out.splitlines() if l.startswith("BN re-estimation"))
    assert "2 BN nodes re-estimated, 2 folded, 1 Convs corrected" in line and line.endswith("kept")


@pytest.mark.parametrize("mode", ["reestimate", "match"])
def test_train_mode_statistics_over_several_batches_are_float64_moments_of_its_tensors(data, mode):
    """The train-mode pass reads each normalisation's batch mean and variance and combines the
    batches: the population mean and variance of every measured tensor, as float64 moments of
    that tensor (exposed from the same model, over every batch) give them."""
    from onnxobq.bn import graph as bn_graph, passes
    model, _, _ = data
    layers = rtn_layers(model)
    calib = dataclasses.replace(data[2], batch_size=8)
    graph = gs.import_onnx(model)
    bns = bn_graph.find_bn_nodes(graph, layers, {})
    targets = {"y": np.dtype(np.float32)}
    names = {"y": 1} | ({b.input: 1 for b in bns} if mode == "match" else {})
    ref = passes.float_reference(model, names, calib, builders.cpu())
    stats_model, captures, feeds = bn_graph.train_mode_model(model, layers, bns, targets, mode, 13, True)
    got = passes.train_mode_moments(stats_model, captures, feeds, ref, calib, builders.cpu())
    assert set(got) == {"y", "c1", "c2"}
    raw = {name: (name if tag.startswith("_obq_bn") else "_obq_raw" + tag[len("_obq_fix"):])
           for name, (tag, _) in captures.items()}
    probe = onnx.ModelProto()
    probe.CopyFrom(stats_model)
    probe.graph.output.extend(builders.fvi(r, None) for r in raw.values())
    sess = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    seen = {name: [] for name in raw}
    for i, feed in enumerate(calibration_batches(calib, model)):
        q_feed = dict(feed)
        for n, (mean_in, std_in) in feeds.items():
            q_feed[mean_in], q_feed[std_in] = ref.batch_moments[i][n]
        for name, r in raw.items():
            seen[name].append(sess.run([r], q_feed)[0].astype(np.float64))
    assert i == 3
    for name, parts in seen.items():
        a = np.concatenate(parts)
        assert got[name].count == a.size // a.shape[1]
        np.testing.assert_allclose(got[name].mean(), a.mean(axis=(0, 2, 3)), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got[name].var(), a.var(axis=(0, 2, 3)), rtol=1e-5, atol=1e-7)


def test_float_outputs_recomputed_past_the_cache_give_the_same_errors(data):
    model, _, calib = data
    layers = rtn_layers(model)
    cached = reestimate(model, layers, BNConfig(), calib, opset=13, symmetric=True)
    again = reestimate(model, layers, BNConfig(), calib, opset=13, symmetric=True,
                       device=builders.cpu(output_cache_bytes=0))
    assert again.error_before == pytest.approx(cached.error_before, rel=1e-6)  # sessions with other outputs fuse differently
    assert again.error_after == pytest.approx(cached.error_after, rel=1e-6)  # sessions with other outputs fuse differently


def test_passes_side_by_side_give_what_one_session_gives(data, tmp_path, monkeypatch):
    """A batch-1 model runs its BN passes on two sessions (runtime.session_workers): the same
    statistics and errors as on one, the batches folded in the same order."""
    from onnxobq import runtime
    model, x, _ = data
    one = onnx.ModelProto()
    one.CopyFrom(model)
    one.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    calib = CalibConfig(source=str(tmp_path / "calib.npz"))
    layers = rtn_layers(one)
    made = []
    real = runtime.session
    monkeypatch.setattr(runtime, "session", lambda *a, **k: made.append(k.get("threads")) or real(*a, **k))
    side = reestimate(one, layers, BNConfig(), calib, opset=13, symmetric=True, device=builders.cpu(cores=2))
    assert made == [1] * 8          # float pass, 2 error passes and the train-mode pass, 2 sessions each
    monkeypatch.setattr(runtime, "session_workers", lambda device, batch, size=0: (1, None))
    alone = reestimate(one, layers, BNConfig(), calib, opset=13, symmetric=True, device=builders.cpu(cores=2))
    assert side.samples == alone.samples == N and side.kept
    assert side.error_before == pytest.approx(alone.error_before, rel=1e-6)
    assert side.error_after == pytest.approx(alone.error_after, rel=1e-6)
    for a, b in zip(side.edits, alone.edits):
        np.testing.assert_allclose(a.mean, b.mean, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(a.var, b.var, rtol=1e-6, atol=1e-7)


def test_replayed_batches_give_the_model_that_reading_every_pass_gives(capsys, data, tmp_path, monkeypatch):
    """The pipeline reads the calibration data once for the capture and BN's four passes;
    with nothing kept (Tuning.replay_bytes = 0) every pass reads it again, to the same model, and
    so does the check that onnxruntime runs the model written (its first sample)."""
    from onnxobq import pipeline
    from onnxobq.backend import Tuning
    model, _, _ = data
    onnx.save(model, tmp_path / "bn.onnx")
    reads = builders.counted_reads(monkeypatch)
    runs = {}
    for limit in [Tuning.replay_bytes, 0]:
        monkeypatch.setattr(pipeline, "choose_device", lambda *a, limit=limit: builders.cpu(replay_bytes=limit))
        reads.clear()
        code = main(["quantize", str(tmp_path / "bn.onnx"), "--bits", "3", "--calib", str(tmp_path / "calib.npz"),
                     "--batch-size", "8", "-o", str(tmp_path / f"q{limit}.onnx"), "-q"])
        assert code == 0, capsys.readouterr().err
        runs[limit] = (len(reads), onnx.load(tmp_path / f"q{limit}.onnx"))
    (kept_reads, kept), (again_reads, again) = runs.values()
    assert (kept_reads, again_reads) == (1, 6)
    for a, b in zip(kept.graph.initializer, again.graph.initializer):
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(a), onnx.numpy_helper.to_array(b))
    assert len(kept.graph.initializer) == len(again.graph.initializer) > 0


def test_bn_samples_gives_what_those_samples_alone_give(data, tmp_path):
    """BNConfig.samples = 12: the same statistics, errors and verdict as calibration data of
    only the 12 samples at even steps through it (in batches of 8: 8 + 4), read or replayed."""
    from onnxobq.calibration import Replay
    model, x, _ = data
    layers = rtn_layers(model)
    np.savez(tmp_path / "picked.npz", x=x[[i * N // 12 for i in range(12)]])
    cfg = BNConfig(fold=False)
    want = reestimate(model, layers, cfg, CalibConfig(source=str(tmp_path / "picked.npz"), batch_size=8),
                      opset=13, symmetric=True)
    whole = CalibConfig(source=str(tmp_path / "calib.npz"), batch_size=8)
    replay = Replay(whole)
    list(calibration_batches(replay, model))                     # the capture's whole pass, kept
    for calib in (whole, replay):
        got = reestimate(model, layers, dataclasses.replace(cfg, samples=12), calib, opset=13, symmetric=True)
        assert (got.samples, want.samples) == (12, 12)
        assert (got.error_before, got.error_after, got.kept) == (want.error_before, want.error_after, want.kept)
        for a, b in zip(got.edits, want.edits):
            np.testing.assert_array_equal(a.mean, b.mean)
            np.testing.assert_array_equal(a.var, b.var)
    every = reestimate(model, layers, cfg, whole, opset=13, symmetric=True)
    assert every.samples == N and every.error_before != want.error_before


@pytest.mark.parametrize("given, want", [(["--bn-samples", "5"], 8), (["--bn-samples", "20"], 16), ([], 32),
                                         (["--bn-samples", "all"], 32)])
def test_bn_samples_come_in_whole_fixed_batches(capsys, data, tmp_path, given, want):
    """A fixed batch of 8: 5 samples round up to one batch, 20 down to two; the default (128)
    and all give every one of the 32."""
    model, _, _ = data
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    fixed.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 8
    onnx.save(fixed, tmp_path / "fixed.onnx")
    code = main(["quantize", str(tmp_path / "fixed.onnx"), "--bits", "3", "--calib", str(tmp_path / "calib.npz"),
                 *given, "-o", str(tmp_path / "q.onnx"), "--report", str(tmp_path / "r.json")])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert json.loads((tmp_path / "r.json").read_text())["bn"]["samples"] == want
    line = next(l for l in out.splitlines() if l.startswith("BN re-estimation"))
    on = f" on {want} of the 32 samples (--bn-samples);" if want < 32 else " on 32 samples;"
    assert "Convs corrected" + on in line


def test_the_default_bn_samples_are_128_spread_through_the_data(data, tmp_path):
    model, _, _ = data
    x = np.random.default_rng(3).standard_normal((200, 4, 10, 10)).astype(np.float32)
    np.savez(tmp_path / "many.npz", x=x)
    np.savez(tmp_path / "picked.npz", x=x[[i * 200 // 128 for i in range(128)]])
    layers = rtn_layers(model)
    got, want = (reestimate(model, layers, cfg, CalibConfig(source=str(tmp_path / f), batch_size=64),
                            opset=13, symmetric=True)
                 for cfg, f in ((BNConfig(), "many.npz"), (BNConfig(samples=None), "picked.npz")))
    assert BNConfig().samples == 128 and got.samples == want.samples == 128
    assert (got.error_before, got.error_after) == (want.error_before, want.error_after)


@pytest.mark.parametrize("bad", ["0", "-3", "many"])
def test_a_bad_bn_samples_is_one_line_and_status_2(capsys, data, tmp_path, bad):
    model, _, _ = data
    onnx.save(model, tmp_path / "bn.onnx")
    code = main(["quantize", str(tmp_path / "bn.onnx"), "--calib", str(tmp_path / "calib.npz"),
                 "--bn-samples", bad, "-o", str(tmp_path / "q.onnx"), "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and not (tmp_path / "q.onnx").exists()
    assert err == [f"onnxobq: error: Invalid value for '--bn-samples': {bad!r} is not a positive number or 'all'"]


def calibration_batches(calib, model):
    from onnxobq.calibration import batches
    from onnxobq.runtime import model_inputs
    return batches(calib, model_inputs(model))


@pytest.mark.parametrize("shape", [(3, 5, 70, 90), (2, 4), (1, 3, 7)])
def test_moments_of_an_array_match_float64_sums(shape):
    """Per-channel means and variances, the deviations summed in float32 runs (of 1,000 here, so
    that a 70 x 90 map takes seven), agree with float64 moments over every value but the channel's."""
    from onnxobq.bn.stats import Moments
    a = (np.random.default_rng(16).standard_normal(shape) * 3 + 5).astype(np.float32)
    m = Moments.of(a, squares_run=1000)
    a64 = a.astype(np.float64).swapaxes(0, 1).reshape(shape[1], -1)
    assert m.count == a64.shape[1]
    np.testing.assert_allclose(m.mean(), a64.mean(axis=1), rtol=1e-6)
    np.testing.assert_allclose(m.var(), a64.var(axis=1), rtol=1e-5)


def test_batches_of_float32_statistics_combine_without_cancelling():
    """Moments added batch by batch from each batch's float32 mean and variance (what the
    normalisation subgraphs give) keep the variance of a channel whose mean is 10^5 times its
    std, where sum((var + mean^2) * n) - N * mean^2 would leave nothing of it."""
    from onnxobq.bn.stats import Moments
    rng = np.random.default_rng(3)
    x = rng.standard_normal((12, 2, 500)) * np.array([1.0, 0.1])[None, :, None] + np.array([0.0, 1e4])[None, :, None]
    x[6:] += np.array([0.5, 0.05])[None, :, None]            # later batches drift: a between-batch part
    total = Moments()
    for b in range(0, 12, 3):
        batch = x[b:b + 3]
        mean, var = batch.mean(axis=(0, 2)).astype(np.float32), batch.var(axis=(0, 2)).astype(np.float32)
        total.add(Moments.of_batch(mean, var, batch.shape[0] * batch.shape[2]))
    assert total.count == 12 * 500
    np.testing.assert_allclose(total.mean(), x.mean(axis=(0, 2)), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(total.var(), x.var(axis=(0, 2)), rtol=1e-3)   # float32 means: 1e-4 off
    x32 = x.astype(np.float32)
    whole = Moments.of(x32[:5])                     # and the moments of arrays, in two passes
    whole.add(Moments.of(x32[5:]))
    np.testing.assert_allclose(whole.var(), x32.astype(np.float64).var(axis=(0, 2)), rtol=1e-5)


def test_bn_passes_with_no_whole_batch_are_skipped_with_a_note(data, tmp_path, flags):
    model, x, _ = data
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    fixed.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 8
    np.savez(tmp_path / "few.npz", x=x[:5])
    out = reestimate(fixed, rtn_layers(fixed), BNConfig(), CalibConfig(source=str(tmp_path / "few.npz")),
                     opset=13, symmetric=True)
    assert (out.samples, out.kept, out.edits) == (0, False, ())
    assert out.notes == ["skipped: the BN samples make no whole batch of the model's fixed batch; give --bn-samples all"]


def test_a_conv_whose_outputs_overflow_is_not_corrected_and_says_why(tmp_path):
    """conv1's outputs overflow to inf (weights of 8e37) while the clipped model output stays
    finite: conv1 is left uncorrected with a note (and not counted), conv2 is corrected, and
    nothing warns."""
    import warnings
    from onnx import helper, numpy_helper
    r = np.random.default_rng(8)
    w1 = np.full((4, 2, 3, 3), 8e37, np.float32)   # under graph.layers.HUGE_WEIGHT, so quantized
    w2 = (0.3 * r.standard_normal((3, 2, 1, 1))).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Clip", ["c1", "lo", "hi"], ["y"], name="clip"),
             helper.make_node("Conv", ["x", "w2"], ["z"], name="conv2")]
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"),
             numpy_helper.from_array(np.float32(0), "lo"), numpy_helper.from_array(np.float32(1), "hi")]
    model = builders.make_model(nodes, [builders.fvi("x", [None, 2, 6, 6])],
                                [builders.fvi("y", [None, 4, 6, 6]), builders.fvi("z", [None, 3, 6, 6])], inits)
    x = (r.random((8, 2, 6, 6)) + 0.5).astype(np.float32)
    np.savez(tmp_path / "c.npz", x=x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = reestimate(model, rtn_layers(model), BNConfig(), CalibConfig(source=str(tmp_path / "c.npz")),
                         opset=13, symmetric=True)
    assert out.notes == ["conv1: not corrected (its outputs are not finite on the calibration data)"]
    assert out.corrected == 1 and out.qlayers[1].bias is not None and out.qlayers[0].bias is None


@pytest.mark.parametrize("group_size", [0, 4])
def test_a_fold_scales_each_output_channel_of_a_grouped_layer(data, group_size):
    from onnxobq.bn.stats import fold_affine
    model, _, _ = data
    scan = scan_layers(gs.import_onnx(model))
    cfg = QuantizeConfig(model="", output="", solve=SolveConfig(
        method="rtn", grid=GridSpec(bits=3, narrow=True, group_size=group_size)))
    q = solve_all(scan, Captured({}, {}, 0), cfg, builders.cpu(), Progress())[0][0]
    O = q.codes.shape[0]
    a = np.linspace(-2.0, 1.5, O)                      # negative factors flip codes and zero-points
    folded = fold_affine(q, np.zeros(O), a, np.arange(O, dtype=float))
    assert folded.scale.shape == q.scale.shape == ((O, -(-q.layer.cols // group_size)) if group_size else (O,))
    np.testing.assert_allclose(folded.weight(), q.weight() * a.reshape(q.channel_shape()), rtol=1e-6)
    np.testing.assert_array_equal(folded.bias, np.arange(O))
    assert folded.codes.min() >= q.qmin and folded.codes.max() <= q.qmax


CLS = "models/ppocr_cls/ch_ppocr_mobile_v2.0_cls_infer.onnx"


def _held_out_sqnr(calib, bn: bool) -> float:
    """The bundled classifier at 4 bits calibrated on ``calib``: SQNR on its evaluation lines."""
    import onnxobq
    report = onnxobq.quantize(CLS, None, bits=4, calibration=calib, bn_reestimate=bn)
    return onnxobq.compare(CLS, report.quantized_model, calibration="models/ppocr_cls/eval.npz",
                           samples=32).outputs[0].sqnr_db, report


@pytest.mark.parametrize("noise, why", [(0.0, "all the same"), (1e-3, "nearly the same"),
                                        (0.1, "does not look like the data the model was trained on")])
def test_calibration_data_that_measures_nothing_leaves_the_bn_statistics_alone(noise, why):
    """Constant images, images with a little noise, and noise images (each four of them) gave
    kept corrections that took the held-out SQNR from 9.8 to 8.8 dB, from 9.8 to 2.5 dB and from
    21.0 to 8.9 dB: the BN stage now skips them and says why."""
    x = np.load("models/ppocr_cls/calib.npz")["x"][:4]
    calib = {"x": (np.full_like(x, -1) + np.random.default_rng(0).normal(0, noise, x.shape)).astype(np.float32)}
    with_bn, report = _held_out_sqnr(calib, True)
    without, _ = _held_out_sqnr(calib, False)
    assert not report.bn["kept"] and any(why in note for note in report.bn["notes"])
    assert with_bn == pytest.approx(without, abs=1e-6)


def test_real_calibration_data_still_corrects_the_bns():
    with_bn, report = _held_out_sqnr("models/ppocr_cls/calib.npz", True)
    assert report.bn["kept"] and report.bn["folded"] == 35
    assert with_bn > _held_out_sqnr("models/ppocr_cls/calib.npz", False)[0] + 3


def test_channels_the_data_does_not_measure_keep_their_trained_statistics():
    from onnxobq.bn.stats import MAX_STD_FACTOR, Moments, bn_statistics
    bn = dataclasses.make_dataclass("BN", ["mean", "var", "epsilon"])(np.zeros(3), np.ones(3), 0.0)
    # channel 0: measured, quantization doubled its std... and more; 1: measured; 2: std 0.05 of the trained one
    fp = Moments(10, np.array([0.1, 0.2, 0.3]), np.array([1.0, 1.0, 0.05 ** 2]) * 10)
    q = Moments(10, np.array([0.1, 0.2, 0.3]), np.array([25.0, 1.21, 0.05]) * 10)
    mean, var, unmeasured = bn_statistics(bn, fp, q, "match")
    np.testing.assert_allclose(var, [MAX_STD_FACTOR ** 2, 1.21, 1.0])
    np.testing.assert_allclose(mean, [0.1 - 0.1 * MAX_STD_FACTOR, 0.2 - 0.2 * 1.1, 0.0])
    assert unmeasured == 1
    mean, var, unmeasured = bn_statistics(bn, None, Moments(10, np.ones(3), np.array([4.0, 0.0, 1e-4]) * 10),
                                          "reestimate")
    np.testing.assert_allclose(var, [4.0, 1.0, 1.0])
    np.testing.assert_allclose(mean, [1.0, 0.0, 0.0])
    assert unmeasured == 2


def test_a_conv_channel_is_measured_against_the_layers_typical_channel():
    from onnxobq.bn.stats import MEASURED_CONV_STD, Moments, conv_measured
    sd = np.array([1.0, 1.0, 1.0, 1.0, 0.0, MEASURED_CONV_STD * 0.9, MEASURED_CONV_STD * 1.1])
    fp = Moments(10, np.zeros(7), sd ** 2 * 10)
    assert conv_measured(fp).tolist() == [True, True, True, True, False, False, True]


def test_a_bn_fed_by_a_graph_input_keeps_its_statistics():
    """x -> BN -> Conv -> BN -> y: the first BN's input is the model's own, which quantization
    cannot change (it stopped the train-mode model's build with a StopIteration)."""
    from onnx import helper, numpy_helper
    import onnxobq
    r = np.random.default_rng(3)
    x = r.standard_normal((16, 4, 8, 8)).astype(np.float32)

    def bn(name, c, mean, var):
        values = (1 + 0.1 * r.standard_normal(c), 0.1 * r.standard_normal(c), mean, var)
        return [numpy_helper.from_array(np.asarray(v, np.float32), f"{name}_{k}") for k, v in zip("sbmv", values)]

    w = numpy_helper.from_array((0.3 * r.standard_normal((6, 4, 3, 3))).astype(np.float32), "w")
    nodes = [helper.make_node("BatchNormalization", ["x"] + [f"bn0_{k}" for k in "sbmv"], ["b0"], name="bn0"),
             helper.make_node("Conv", ["b0", "w"], ["c"], name="conv", pads=[1, 1, 1, 1])]
    inits = bn("bn0", 4, np.zeros(4), np.ones(4)) + [w]
    make = lambda nodes, inits, out, c: builders.make_model(
        nodes, [builders.fvi("x", [None, 4, 8, 8])], [builders.fvi(out, [None, c, 8, 8])], inits)
    c = builders.run(make(nodes, inits, "c", 6), {"x": x})[0]     # the second BN gets the float model's statistics
    nodes.append(helper.make_node("BatchNormalization", ["c"] + [f"bn1_{k}" for k in "sbmv"], ["y"], name="bn1"))
    model = make(nodes, inits + bn("bn1", 6, c.mean(axis=(0, 2, 3)), c.var(axis=(0, 2, 3))), "y", 6)
    report = onnxobq.quantize(model, None, bits=4, calibration={"x": x}, bn_samples=None)
    assert report.bn["reestimated"] == 1, report.bn["notes"]
    q = ort.InferenceSession(report.quantized_model.SerializeToString())
    assert np.isfinite(q.run(None, {"x": x})[0]).all()
