"""Solving same-shaped layers as one stack gives each layer exactly what it gets alone."""
import threading
from dataclasses import replace

import numpy as np
import onnx
import pytest

from onnxobq import pipeline, solve
from onnxobq.backend import Tuning, choose_device
from onnxobq.calibration import CalibConfig
from onnxobq.config import BNConfig, QuantizeConfig, SolveConfig
from onnxobq.quant import GridSpec
from onnxobq.types import ConvGeometry, Layer
from onnxobq.pipeline import run
from onnxobq.report import summary_lines
from onnxobq.solve import plan_stacks, solve_layer, solve_stack
from onnxobq.solvers import Damping

import builders


def layer(name, rows, cols, groups=1):
    k = cols  # a 1-D conv whose kernel spans the inputs: (O, 1, cols) per group
    return Layer(name, "Conv", name + ".w", "initializer", name + ".x", name + ".y",
                 (rows * groups, 1, k), "float32", groups, rows, cols,
                 conv=ConvGeometry((k,), (1,), (0, 0), (1,)))


def test_plan_stacks_groups_equal_shapes_within_the_limits():
    budget = 10 * (4 + 8) * 8 * 4                                 # ten groups of (4, 8) in float32
    layers = [layer("a", 4, 8), layer("b", 3, 8), layer("c", 4, 8, groups=6), layer("d", 4, 8, groups=4),
              layer("e", 4, 8), layer("wide", 2, Tuning.stack_max_cols + 1), layer("wide2", 2, Tuning.stack_max_cols + 1),
              layer("f", 4, 8)]
    has_h = [True] * 7 + [False]
    # a+c fill 7 of the 10 groups, d (4 more) opens a new stack that e joins; b is another shape;
    # the wide layers stay alone; f has no Hessian, so it cannot join the others.
    assert plan_stacks(layers, has_h, 4, budget) == [[0, 2], [1], [3, 4], [5], [6], [7]]
    assert plan_stacks(layers, has_h, 4, 0) == [[i] for i in range(len(layers))]


def test_plan_stacks_keeps_layers_of_other_bit_widths_apart():
    layers = [layer(n, 4, 8) for n in "abcd"]
    assert plan_stacks(layers, [True] * 4, 4, 1 << 20) == [[0, 1, 2, 3]]
    assert plan_stacks(layers, [True] * 4, 4, 1 << 20, [4, 8, 4, 8]) == [[0, 2], [1, 3]]


def test_only_a_gpu_stacks():
    assert choose_device("cpu").stack_bytes == 0 and builders.cpu().stack_bytes == 0


def stack_problem(seed, shapes, C=12):
    r = np.random.default_rng(seed)
    layers, weights, hessians = [], [], []
    for n, (R, G) in enumerate(shapes):
        lay = layer(f"l{n}", R, C, G)
        X = (np.eye(C) + 0.5 * r.standard_normal((C, C))) @ r.standard_normal((G, C, 5 * C))
        layers.append(lay)
        weights.append(r.standard_normal(lay.shape).astype(np.float32))
        hessians.append(2 * X @ X.transpose(0, 2, 1) / X.shape[2])
    return layers, weights, hessians


@pytest.mark.parametrize("method", ["fastobq", "gptq", "obq", "rtn"])
def test_a_stack_solves_each_layer_as_alone(method):
    layers, weights, hessians = stack_problem(0, [(5, 1), (5, 3), (5, 2)])
    cfg = SolveConfig(method=method, grid=GridSpec(bits=3))
    together = solve_stack(layers, weights, hessians, cfg, builders.cpu(), [100, 200, 300])
    for i, (q, s) in enumerate(together):
        q1, s1 = solve_layer(layers[i], weights[i], hessians[i], cfg, builders.cpu(), [100, 200, 300][i])
        np.testing.assert_array_equal(q.codes, q1.codes)
        np.testing.assert_array_equal(q.scale, q1.scale)
        np.testing.assert_array_equal(q.zero, q1.zero)
        assert (s.name, s.method, s.rows, s.damp, s.note) == (s1.name, s1.method, s1.rows, s1.damp, s1.note)
        assert s.error == pytest.approx(s1.error, rel=1e-12)
        assert s.rtn_error == pytest.approx(s1.rtn_error, rel=1e-12)
        assert (s.stacked, s1.stacked) == (3, 1)


def test_a_failing_or_broken_layer_in_a_stack_is_reported_alone():
    layers, weights, hessians = stack_problem(1, [(4, 1), (4, 2), (4, 1)])
    hessians[1][1] = -np.eye(12)                 # one group of the middle layer cannot be factorised
    cfg = SolveConfig(method="fastobq", grid=GridSpec(bits=4), damp=Damping(0.01, relative=False, retries=1))
    out = solve_stack(layers, weights, hessians, cfg, builders.cpu(), [1, 1, 1])
    assert [s.method for _, s in out] == ["fastobq", "fastobq+rtn", "fastobq"]
    assert out[1][1].note.startswith("Cholesky failed in 1/2 group(s)")
    hessians[2][0, 0, 0] = np.nan                # NaN activations behind the last layer
    out = solve_stack(layers, weights, hessians, cfg, builders.cpu(), [1, 1, 1])
    assert [s.method for _, s in out] == ["fastobq", "fastobq+rtn", "rtn"]
    assert out[2][1].note.startswith("NaN or Inf in its calibration inputs")
    assert [s.stacked for _, s in out] == [1, 1, 1]


def repeated_net() -> onnx.ModelProto:
    """x(N,8,10,10) -> two Conv3x3 8->8 and two depthwise Conv3x3 (two stacks of two) -> y."""
    r = builders.rng(3)
    weights = {"wa": (8, 8, 3, 3), "wb": (8, 8, 3, 3), "wc": (8, 1, 3, 3), "wd": (8, 1, 3, 3)}
    inits = [onnx.numpy_helper.from_array((r.standard_normal(s) * 0.3).astype(np.float32), k)
             for k, s in weights.items()]
    make = onnx.helper.make_node
    nodes = [make("Conv", ["x", "wa"], ["a"], name="a", pads=[1, 1, 1, 1]),
             make("Relu", ["a"], ["ra"], name="ra"),
             make("Conv", ["ra", "wb"], ["b"], name="b", pads=[1, 1, 1, 1]),
             make("Conv", ["b", "wc"], ["c"], name="c", group=8, pads=[1, 1, 1, 1]),
             make("Relu", ["c"], ["rc"], name="rc"),
             make("Conv", ["rc", "wd"], ["y"], name="d", group=8, pads=[1, 1, 1, 1])]
    return builders.make_model(nodes, [builders.fvi("x", [None, 8, 10, 10])],
                               [builders.fvi("y", [None, 8, 10, 10])], inits)


def test_quantize_writes_the_same_model_with_and_without_stacks(tmp_path, monkeypatch):
    src, calib = tmp_path / "m.onnx", tmp_path / "calib.npz"
    onnx.save(repeated_net(), src)
    np.savez(calib, x=builders.rng(4).standard_normal((6, 8, 10, 10)).astype(np.float32))
    reports = {}
    for limit in (0, Tuning.stack_max_cols):              # stack on the CPU too
        device = replace(builders.cpu(stack_max_cols=limit), stack_bytes=Tuning.stack_max_bytes)
        monkeypatch.setattr(pipeline, "choose_device", lambda *a, device=device: device)
        cfg = QuantizeConfig(model=str(src), output=str(tmp_path / f"q{limit}.onnx"),
                             calib=CalibConfig(source=str(calib), batch_size=2),
                             solve=SolveConfig(grid=GridSpec(bits=3)), bn=BNConfig(reestimate=False))
        reports[limit] = run(cfg)
    alone, stacked = reports[0].layers, reports[Tuning.stack_max_cols].layers
    assert [s.stacked for s in alone] == [1, 1, 1, 1] and [s.stacked for s in stacked] == [2, 2, 2, 2]
    assert [s.error for s in stacked] == pytest.approx([s.error for s in alone], rel=1e-12)
    assert (tmp_path / "q0.onnx").read_bytes() == (tmp_path / f"q{Tuning.stack_max_cols}.onnx").read_bytes()
    note = ("note: 4 layers were solved in stacks with others of the same shape; "
            "their seconds are shares of their stack's time")
    assert note in summary_lines(reports[Tuning.stack_max_cols])
    assert not any("stacks" in line for line in summary_lines(reports[0]))


@pytest.mark.parametrize("bits", [4, 8])
def test_the_reported_errors_match_float64_sums(bits):
    """The report's float32 errors (solve.REPORT_DTYPE) equal float64 ones to 1e-5, also for a
    Hessian of rank 8 (8 samples, 64 inputs), where the solved error is a small part of the norm."""
    from onnxobq.types import to_matrix
    from onnxobq.solvers import METHODS, layer_error

    r = np.random.default_rng(5)
    lay = layer("l", 16, 64)
    X = r.standard_normal((1, 64, 8)) * r.random((1, 64, 1)) ** 2
    H = 2 * X @ X.transpose(0, 2, 1) / 8
    w = (0.1 * r.standard_normal(lay.shape)).astype(np.float32)
    q, s = solve_layer(lay, w, H, SolveConfig(grid=GridSpec(bits=bits)), builders.cpu(), 8)
    W = to_matrix(lay, w).astype(np.float64)
    Q = (to_matrix(lay, q.codes).astype(np.float64) - q.zero[None, :, None]) * q.scale[None, :, None]
    rtn = METHODS["rtn"].solve(W, None, solve.fit_grid(W, GridSpec(bits=bits), np), xp=np).Q
    assert s.error < 0.02 * s.rtn_error
    assert s.error == pytest.approx(layer_error(W, Q, H, np), rel=1e-5)
    assert s.rtn_error == pytest.approx(layer_error(W, rtn, H, np), rel=1e-5)


@pytest.mark.parametrize("size", [1e19, 3e19])
def test_reported_errors_past_float32s_range_come_from_float64_sums(size):
    """Activations of about 1e19 (a model whose values blow up) give errors, or at 3e19 a
    Hessian, past float32's range: the errors are then summed in H's float64, finite, without
    a warning."""
    import warnings
    from onnxobq.types import to_matrix
    from onnxobq.solvers import layer_error

    r = np.random.default_rng(6)
    lay = layer("l", 8, 16)
    X = r.standard_normal((1, 16, 64)) * size
    H = 2 * X @ X.transpose(0, 2, 1) / 64
    w = r.standard_normal(lay.shape).astype(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        in_float32 = solve.weighted_norms(to_matrix(lay, w), H.astype(np.float32), np)
    assert not np.isfinite(in_float32).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q, s = solve_layer(lay, w, H, SolveConfig(grid=GridSpec(bits=4)), builders.cpu(), 64)
    W = to_matrix(lay, w).astype(np.float64)
    Q = (to_matrix(lay, q.codes).astype(np.float64) - q.zero[None, :, None]) * q.scale[None, :, None]
    assert np.isfinite(s.error) and s.error == pytest.approx(layer_error(W, Q, H, np), rel=1e-9)


def test_layers_solved_on_several_threads_write_the_model_of_one(tmp_path, monkeypatch):
    """On NumPy the layers go to one thread per core (BLAS on one thread each): the model written,
    the reported errors and the progress count are those of one thread in graph order, and BLAS
    gets its threads back."""
    from threadpoolctl import threadpool_info
    src, calib = tmp_path / "m.onnx", tmp_path / "calib.npz"
    onnx.save(repeated_net(), src)
    np.savez(calib, x=builders.rng(5).standard_normal((6, 8, 10, 10)).astype(np.float32))
    blas = lambda: [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]  # noqa: E731
    before, reports, advanced = blas(), {}, {}

    class Count(pipeline.Progress):
        def start(self, what, total):
            self.what = what

        def advance(self, n=1):
            if self.what == "layers":
                advanced[workers] = advanced.get(workers, 0) + n

    seen, real = [], solve.solve_stack

    def spy(*a, **k):
        seen.append((workers, threading.current_thread().name, blas()))
        return real(*a, **k)

    monkeypatch.setattr(solve, "solve_stack", spy)
    for workers in (1, 3):
        monkeypatch.setattr(pipeline, "choose_device", lambda *a, workers=workers: replace(builders.cpu(), workers=workers))
        cfg = QuantizeConfig(model=str(src), output=str(tmp_path / f"q{workers}.onnx"),
                             calib=CalibConfig(source=str(calib), batch_size=2),
                             solve=SolveConfig(grid=GridSpec(bits=3)), bn=BNConfig(reestimate=False))
        reports[workers] = run(cfg, Count())
    assert blas() == before
    assert advanced == {1: 4, 3: 4}
    assert [(t, b) for w, t, b in seen if w == 1] == [(threading.main_thread().name, before)] * 4
    assert {t for w, t, _ in seen if w == 3} <= {f"onnxobq-layers_{i}" for i in range(3)}
    assert all(b == [1] * len(before) for w, _, b in seen if w == 3)
    assert [s.name for s in reports[3].layers] == [s.name for s in reports[1].layers]
    assert [s.error for s in reports[3].layers] == pytest.approx([s.error for s in reports[1].layers], rel=1e-9)
    assert (tmp_path / "q1.onnx").read_bytes() == (tmp_path / "q3.onnx").read_bytes()


@pytest.mark.parametrize("method, group_size", [("fastobq", 0), ("gptq", 8), ("rtn", 0)])
def test_a_layer_solved_a_part_of_its_rows_at_a_time_gets_what_it_gets_whole(method, group_size):
    """Rows are independent given H: with Tuning.solve_rows_bytes at three rows' bytes, a 2-group
    layer of 10 rows is solved in 4 parts per call, to the same codes, grid and errors (FastOBQ's
    column order, a sum over rows, is the whole layer's)."""
    r = np.random.default_rng(11)
    lay = layer("l", 10, 24, groups=2)
    w = r.standard_normal(lay.shape).astype(np.float32)
    X = r.standard_normal((2, 24, 200))
    H = 2 * X @ X.transpose(0, 2, 1) / 200
    cfg = SolveConfig(method=method, grid=GridSpec(bits=3, group_size=group_size))
    whole = solve_layer(lay, w, None if method == "rtn" else H, cfg, builders.cpu(1), 200)
    parts = solve_layer(lay, w, None if method == "rtn" else H, cfg,
                        builders.cpu(1, solve_rows_bytes=3 * 2 * 24 * 8), 200)
    np.testing.assert_array_equal(parts[0].codes, whole[0].codes)
    np.testing.assert_array_equal(parts[0].scale, whole[0].scale)
    np.testing.assert_array_equal(parts[0].zero, whole[0].zero)
    if method != "rtn":     # the report's error sums are float32 products (solve.REPORT_DTYPE), summed by part
        assert parts[1].error == pytest.approx(whole[1].error, rel=1e-6)
        assert parts[1].rtn_error == pytest.approx(whole[1].rtn_error, rel=1e-6)


def test_the_solve_threads_are_as_many_as_half_the_available_memory_holds(monkeypatch):
    """Each thread holds about solve.PART_WORKING_SET times its part of rows, plus three copies of H."""
    lay = layer("l", 1000, 64)           # 512 KB in float64, one part
    device = builders.cpu(2)
    per_thread = solve.PART_WORKING_SET * 1000 * 64 * 8 + 3 * 64 * 64 * 8
    for free, want in ((None, 2), (100 * per_thread, 2), (3 * per_thread, 1), (0, 1)):
        monkeypatch.setattr(solve, "available_bytes", lambda free=free: free)
        assert min(device.workers, solve._memory_workers([lay], [[0]], device)) == want
