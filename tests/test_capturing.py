"""The capture: Hessians of real models on onnxruntime against brute force, however it runs."""
import threading
import time
from dataclasses import replace

import numpy as np
import onnx_graphsurgeon as gs
import pytest

from onnxobq import capturing, runtime
from onnxobq.calibration import CalibConfig
from onnxobq.capturing import capture_hessians
from onnxobq.graph import scan_layers
from onnxobq.hessian import sums as accumulate_module
from onnxobq.hessian.sums import groups_at_once

import builders
from hessian.brute import brute_force_conv_hessian


def test_capture_normalises_and_batches_like_one_big_sum(tmp_path):
    """H = 2 X X^T / N over all samples, however the data is batched."""
    model = builders.conv_stack()
    layers = scan_layers(gs.import_onnx(model)).layers
    x = np.random.default_rng(2).standard_normal((7, 3, 12, 12)).astype(np.float32)
    np.savez(tmp_path / "c.npz", x=x)
    first = layers[0]
    expect = brute_force_conv_hessian(x, first)
    count = 7 * 12 * 12
    for bs in (1, 3, 7):
        got = capture_hessians(model, layers, CalibConfig(source=str(tmp_path / "c.npz"), batch_size=bs), builders.cpu())
        H = got.hessians
        assert got.samples == 7 and got.rows[first.hessian_key] == count
        np.testing.assert_allclose(H[first.hessian_key], 2 * expect / count, rtol=1e-4, atol=1e-5)


def test_a_shared_weight_gets_the_hessian_of_all_its_uses(tmp_path):
    """H = 2 (X3 X3^T + X4 X4^T) / (N3 + N4) over both pyramid levels' patches; the conv of the
    same geometry on one level keeps that level's own Hessian."""
    import onnx
    model = builders.shared_head()
    scan = scan_layers(gs.import_onnx(model))
    head = next(l for l in scan.layers if l.name == "head_p3")
    other = next(l for l in scan.layers if l.name == "other")
    assert [l.name for l in scan.layers] == ["stem", "down", "head_p3", "other"] and not scan.skipped
    assert head.uses == (("head_p4", "p4", "y4"),) and head.source == "initializer, shared by 2 nodes"
    x = np.random.default_rng(4).standard_normal((3, 3, 12, 12)).astype(np.float32)
    np.savez(tmp_path / "c.npz", x=x)
    got = capture_hessians(model, scan.layers, CalibConfig(source=str(tmp_path / "c.npz")), builders.cpu())
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend([builders.fvi("p3", None), builders.fvi("p4", None)])
    p3, p4 = builders.run(probe, {"x": x})[3:]
    s3, s4 = brute_force_conv_hessian(p3, head), brute_force_conv_hessian(p4, head)
    n3, n4 = 3 * 12 * 12, 3 * 6 * 6
    assert got.rows[head.hessian_key] == n3 + n4 and got.rows[other.hessian_key] == n3
    np.testing.assert_allclose(got.hessians[head.hessian_key], 2 * (s3 + s4) / (n3 + n4), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got.hessians[other.hessian_key], 2 * s3 / n3, rtol=1e-4, atol=1e-5)
    assert set(got.hessians) == {l.hessian_key for l in scan.layers}      # the uses' own are dropped


def test_a_shared_weight_captured_on_two_threads_in_many_batches_is_exact(tmp_path):
    """x -> Conv -> p; one 3 x 3 weight of 288 columns reads x and p. Its two reads are multiplied
    on two threads at once: each goes into its own sum (they went into one, and the Hessian
    changed from run to run by up to 280 times its entries)."""
    from onnx import helper, numpy_helper
    r = np.random.default_rng(5)
    inits = [numpy_helper.from_array((0.2 * r.standard_normal((32, 32, 1, 1))).astype(np.float32), "wa"),
             numpy_helper.from_array((0.1 * r.standard_normal((8, 32, 3, 3))).astype(np.float32), "ws")]
    nodes = [helper.make_node("Conv", ["x", "wa"], ["p"], name="mix"),
             helper.make_node("Conv", ["x", "ws"], ["y1"], name="shared_x", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["p", "ws"], ["y2"], name="shared_p", pads=[1, 1, 1, 1])]
    out = [builders.fvi(n, [None, c, 16, 16]) for n, c in (("p", 32), ("y1", 8), ("y2", 8))]
    model = builders.make_model(nodes, [builders.fvi("x", [None, 32, 16, 16])], out, inits)
    layers = scan_layers(gs.import_onnx(model)).layers
    shared = next(l for l in layers if l.name == "shared_x")
    assert shared.uses
    x = r.standard_normal((16, 32, 16, 16)).astype(np.float32)
    np.savez(tmp_path / "c.npz", x=x)
    p = builders.run(model, {"x": x})[0]
    want = 2 * (brute_force_conv_hessian(x, shared) + brute_force_conv_hessian(p, shared)) / (2 * 16 * 256)
    for _ in range(3):
        got = capture_hessians(model, layers, CalibConfig(source=str(tmp_path / "c.npz"), batch_size=1),
                               builders.cpu(cores=2))
        np.testing.assert_allclose(got.hessians[shared.hessian_key], want, rtol=1e-4, atol=1e-4)


def test_an_input_read_the_same_way_by_a_shared_and_another_layer_is_multiplied_once(tmp_path, monkeypatch):
    """p3 is read with the 3 x 3 geometry by the shared head's first use and by the other conv:
    one product per batch for both; the stem's, the down conv's and the head's p4 read make 4."""
    model = builders.shared_head()
    layers = scan_layers(gs.import_onnx(model)).layers
    x = np.random.default_rng(5).standard_normal((4, 3, 12, 12)).astype(np.float32)
    np.savez(tmp_path / "c.npz", x=x)
    read, accumulate = [], capturing.accumulate
    monkeypatch.setattr(capturing, "accumulate", lambda use, a, *rest: (read.append(use.name), accumulate(use, a, *rest)))
    capture_hessians(model, layers, CalibConfig(source=str(tmp_path / "c.npz"), batch_size=2), builders.cpu())
    assert sorted(read) == sorted(["stem", "down", "head_p3", "head_p4"] * 2)


def test_capture_of_an_inner_layer_matches_its_activations(tmp_path):
    """The Gemm after the pooling sees the pooled features: check against ORT's own values."""
    import onnx
    model = builders.conv_stack()
    layers = scan_layers(gs.import_onnx(model)).layers
    fc = next(l for l in layers if l.op == "Gemm")
    x = np.random.default_rng(3).standard_normal((5, 3, 12, 12)).astype(np.float32)
    np.savez(tmp_path / "c.npz", x=x)
    H = capture_hessians(model, layers, CalibConfig(source=str(tmp_path / "c.npz")), builders.cpu()).hessians
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(builders.fvi("f", None))
    f = builders.run(probe, {"x": x})[1].astype(np.float64)
    np.testing.assert_allclose(H[fc.hessian_key][0], 2 * f.T @ f / 5, rtol=1e-4, atol=1e-5)


def test_pipelined_capture_gives_the_plain_hessians(tmp_path):
    """The forward passes running ahead in a thread change nothing: same sums, same order."""
    model = builders.conv_stack()
    layers = scan_layers(gs.import_onnx(model)).layers
    x = np.random.default_rng(5).standard_normal((9, 3, 12, 12)).astype(np.float32)
    np.savez(tmp_path / "c.npz", x=x)
    calib = CalibConfig(source=str(tmp_path / "c.npz"), batch_size=2)
    plain = capture_hessians(model, layers, calib, replace(builders.cpu(), pipeline_depth=0))
    piped = capture_hessians(model, layers, calib, replace(builders.cpu(), pipeline_depth=2))
    assert plain.rows == piped.rows and plain.samples == piped.samples == 9
    for key, H in plain.hessians.items():
        np.testing.assert_array_equal(piped.hessians[key], H)


def test_grouped_convs_unfolded_a_few_groups_at_a_time_give_the_same_hessians(tmp_path, monkeypatch):
    """On NumPy a grouped conv goes through accumulate a few groups at a time (here one, and
    three): the depthwise and the grouped conv of conv_stack get the Hessians and row counts
    of the whole-layer path."""
    model = builders.conv_stack()
    layers = scan_layers(gs.import_onnx(model)).layers
    x = np.random.default_rng(11).standard_normal((5, 3, 12, 12)).astype(np.float32)
    np.savez(tmp_path / "c.npz", x=x)
    calib = CalibConfig(source=str(tmp_path / "c.npz"), batch_size=2)
    whole = capture_hessians(model, layers, calib, builders.cpu(group_chunk_elements=1 << 40))
    grouped = [l for l in layers if l.groups > 1]
    assert sorted(l.groups for l in grouped) == [2, 8]
    dw = next(l for l in grouped if l.groups == 8)
    for elements in (1, 3 * 9 * 2 * 144):          # one group at a time; depthwise 3, 3, 2 (and 6, 2)
        device = builders.cpu(group_chunk_elements=elements)
        assert groups_at_once(dw, np.zeros((2, 8, 12, 12), np.float32), device) == (1 if elements == 1 else 3)
        parts = capture_hessians(model, layers, calib, device)
        assert parts.rows == whole.rows
        for key, H in whole.hessians.items():
            np.testing.assert_allclose(parts.hessians[key], H, rtol=1e-6, atol=1e-7)


def test_capture_counts_the_time_it_waits_for_the_forward_passes(tmp_path, monkeypatch):
    """With onnxruntime made slow (0.1 s a batch), the accumulation waits at least the whole first
    forward pass (nothing runs before it), and never longer than the capture took."""
    model = builders.conv_stack()
    layers = scan_layers(gs.import_onnx(model)).layers
    np.savez(tmp_path / "c.npz", x=np.ones((10, 3, 12, 12), np.float32))
    real_run = capturing.run

    def slow_run(*args):
        time.sleep(0.1)
        return real_run(*args)

    monkeypatch.setattr(capturing, "run", slow_run)
    start = time.perf_counter()
    got = capture_hessians(model, layers, CalibConfig(source=str(tmp_path / "c.npz"), batch_size=2), builders.cpu())
    total = time.perf_counter() - start
    assert 0.1 <= got.waited <= total


def test_prefetch_runs_at_most_depth_ahead_and_reraises():
    from onnxobq.capturing import prefetch

    made = []

    def items():
        for i in range(6):
            made.append(i)
            yield i

    for i in prefetch(items(), depth=1):
        time.sleep(0.02)                   # let the producer run as far ahead as it may
        assert len(made) <= i + 3          # item i in use, one queued, one being made
    assert made == list(range(6))

    def failing():
        yield 1
        raise ValueError("bad batch 2")

    with pytest.raises(ValueError, match="bad batch 2"):
        list(prefetch(failing(), depth=1))


def test_on_numpy_the_capture_takes_turns_with_onnxruntime_and_its_threads_do_not_spin(tmp_path, monkeypatch):
    """NumPy's BLAS and onnxruntime share the cores: no batch runs ahead, no thread spins."""
    depths, spins = [], []
    real_prefetch, real_options = capturing.prefetch, runtime.session_options
    monkeypatch.setattr(capturing, "prefetch", lambda items, depth=1: depths.append(depth) or real_prefetch(items, depth))
    monkeypatch.setattr(runtime, "session_options", lambda spin=True, **k: spins.append(spin) or real_options(spin, **k))
    model = builders.conv_stack()
    np.savez(tmp_path / "c.npz", x=np.ones((4, 3, 12, 12), np.float32))
    capture_hessians(model, scan_layers(gs.import_onnx(model)).layers,
                     CalibConfig(source=str(tmp_path / "c.npz"), batch_size=2), builders.cpu())
    assert depths == [0] and spins == [False]
    opts = real_options(spin=False)
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_capture_through_shifted_products_gives_the_unfolded_hessians(tmp_path, monkeypatch):
    """With every stride-1 conv of conv_stack sent through shifted products, capture_hessians
    gives the Hessians and row counts of im2col alone, and the brute-force one of the first conv."""
    model = builders.conv_stack()
    layers = scan_layers(gs.import_onnx(model)).layers
    x = np.random.default_rng(14).standard_normal((5, 3, 12, 12)).astype(np.float32)
    np.savez(tmp_path / "c.npz", x=x)
    calib = CalibConfig(source=str(tmp_path / "c.npz"), batch_size=2)
    unfolded = capture_hessians(model, layers, calib, builders.cpu(shift_cost=0.0))
    used = []
    real = accumulate_module.add_shifted
    monkeypatch.setattr(accumulate_module, "add_shifted", lambda layer, *a: used.append(layer.name) or real(layer, *a))
    shifted = capture_hessians(model, layers, calib, builders.cpu(shift_cost=1e9))
    assert used and layers[0].name in used
    assert shifted.rows == unfolded.rows
    for key, H in unfolded.hessians.items():
        np.testing.assert_allclose(shifted.hessians[key], H, rtol=1e-5, atol=1e-6)
    first = layers[0]
    np.testing.assert_allclose(shifted.hessians[first.hessian_key],
                               2 * brute_force_conv_hessian(x, first) / (5 * 144), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("workers", [1, 3])
def test_products_on_several_threads_give_the_one_thread_hessians(tmp_path, monkeypatch, workers):
    """The capture's products spread over threads (threads.LayerWorkers) give the Hessians and row
    counts of one thread, each layer's products made on one thread per batch, with BLAS held to
    one thread meanwhile and given back its threads after."""
    from threadpoolctl import threadpool_info
    model = builders.conv_stack()
    layers = scan_layers(gs.import_onnx(model)).layers
    np.savez(tmp_path / "c.npz", x=np.random.default_rng(21).standard_normal((5, 3, 12, 12)).astype(np.float32))
    calib = CalibConfig(source=str(tmp_path / "c.npz"), batch_size=2)
    before = [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]
    alone = capture_hessians(model, layers, calib, replace(builders.cpu(), workers=1))
    seen, real = [], capturing.accumulate

    def spy(layer, *a, **k):
        blas = [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]
        seen.append((layer.name, threading.current_thread().name, blas))
        return real(layer, *a, **k)

    monkeypatch.setattr(capturing, "accumulate", spy)
    spread = capture_hessians(model, layers, calib, replace(builders.cpu(), workers=workers))
    assert [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"] == before
    assert len(seen) == 3 * len(alone.hessians)                   # three batches, every sum
    if workers > 1:
        assert {t for _, t, _ in seen} <= {f"onnxobq-layers_{i}" for i in range(workers)}
        assert all(blas == [1] * len(before) for _, _, blas in seen)
    assert spread.rows == alone.rows and spread.samples == alone.samples == 5
    for key, H in alone.hessians.items():
        np.testing.assert_allclose(spread.hessians[key], H, rtol=1e-5, atol=1e-6)
