import itertools
import threading
import time
from dataclasses import replace

import numpy as np
import onnx_graphsurgeon as gs
import pytest

from onnxobq import capturing, runtime
from onnxobq.backend import Tuning, choose_device
from onnxobq.calibration import CalibConfig
from onnxobq.capturing import capture_hessians
from onnxobq.graph import scan_layers
from onnxobq.hessian import HessianSum, Products, conv_outputs, conv_pads, gather_columns, layer_columns, shifts_pay
from onnxobq.hessian import sums as accumulate_module
from onnxobq.hessian.sums import add_shifted, groups_at_once
from onnxobq.hessian.shifted import ring_bounds
from onnxobq.types import ConvGeometry, Layer

import builders


def conv_layer(wshape, groups=1, strides=None, pads=None, dilations=None, auto_pad="NOTSET"):
    nsp = len(wshape) - 2
    geom = ConvGeometry(tuple(wshape[2:]), tuple(strides or [1] * nsp), tuple(pads or [0] * 2 * nsp),
                        tuple(dilations or [1] * nsp), auto_pad)
    return Layer(name="c", op="Conv", weight="w", source="initializer", input="x", output="y",
                 shape=tuple(wshape), dtype="float32", groups=groups, rows=wshape[0] // groups,
                 cols=int(np.prod(wshape[1:])), conv=geom)


class Counting(Products):
    """Products that records the column count of each product it makes."""

    def __init__(self, xp):
        super().__init__(xp)
        self.calls = []

    def __call__(self, P):
        self.calls.append(P.shape[2])
        return super().__call__(P)


def brute_force_conv_hessian(x, layer):
    """Sum over every sample and output position of patch * patch^T, written with plain loops."""
    g = layer.conv
    N, C = x.shape[:2]
    spatial = x.shape[2:]
    nsp = len(spatial)
    pads = conv_pads(g, spatial)
    cpg = C // layer.groups
    H = np.zeros((layer.groups, layer.cols, layer.cols))
    out = [(spatial[i] + pads[i] + pads[i + nsp] - g.dilations[i] * (g.kernel[i] - 1) - 1) // g.strides[i] + 1
           for i in range(nsp)]
    for n in range(N):
        for pos in itertools.product(*[range(o) for o in out]):
            for grp in range(layer.groups):
                patch = []
                for c in range(grp * cpg, (grp + 1) * cpg):
                    for offs in itertools.product(*[range(k) for k in g.kernel]):
                        idx = [pos[i] * g.strides[i] + offs[i] * g.dilations[i] - pads[i] for i in range(nsp)]
                        inside = all(0 <= idx[i] < spatial[i] for i in range(nsp))
                        patch.append(x[(n, c) + tuple(idx)] if inside else 0.0)
                p = np.array(patch)
                H[grp] += np.outer(p, p)
    return H


CASES = [
    dict(xshape=(2, 4, 7, 8), wshape=(6, 4, 3, 3), strides=[2, 1], pads=[1, 0, 2, 1], dilations=[1, 2]),
    dict(xshape=(2, 6, 7, 6), wshape=(6, 2, 3, 2), groups=3, strides=[2, 2], pads=[1, 1, 1, 1]),
    dict(xshape=(2, 5, 6, 7), wshape=(5, 1, 3, 3), groups=5, auto_pad="SAME_UPPER", strides=[2, 2]),
    dict(xshape=(1, 4, 6, 7), wshape=(4, 1, 4, 3), groups=4, auto_pad="SAME_LOWER", strides=[3, 2]),
    dict(xshape=(2, 4, 6, 5), wshape=(3, 4, 3, 3), auto_pad="VALID", strides=[2, 2]),
    dict(xshape=(3, 3, 13), wshape=(5, 3, 4), strides=[3], pads=[2, 1], dilations=[2]),
    dict(xshape=(1, 2, 4, 5, 5), wshape=(4, 2, 2, 3, 2), strides=[1, 2, 1], pads=[0, 1, 1, 1, 0, 1]),
    dict(xshape=(3, 8, 4, 5), wshape=(6, 8, 1, 1)),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c["wshape"])))
def test_conv_hessian_equals_brute_force(case):
    case = dict(case)
    x = np.random.default_rng(0).standard_normal(case.pop("xshape")).astype(np.float32)
    layer = conv_layer(**case)
    acc = HessianSum()
    acc.add(layer_columns(layer, x, np), np, Products(np))
    np.testing.assert_allclose(acc.sum, brute_force_conv_hessian(x, layer), rtol=1e-4, atol=1e-3)


def test_gemm_and_matmul_hessians_equal_brute_force():
    r = np.random.default_rng(1)
    a = r.standard_normal((5, 7)).astype(np.float32)
    gemm = Layer("g", "Gemm", "w", "initializer", "a", "y", (7, 3), "float32", 1, 3, 7, transposed=True)
    gemm_t = Layer("g", "Gemm", "w", "initializer", "a", "y", (3, 5), "float32", 1, 3, 5, trans_a=True)
    mm = Layer("m", "MatMul", "w", "initializer", "a", "y", (7, 3), "float32", 1, 3, 7, transposed=True)
    a3 = r.standard_normal((2, 4, 7)).astype(np.float32)
    for layer, act, rows in ((gemm, a, a), (gemm_t, a, a.T), (mm, a3, a3.reshape(-1, 7))):
        acc = HessianSum()
        acc.add(layer_columns(layer, act, np), np, Products(np))
        brute = sum(np.outer(row, row) for row in rows.astype(np.float64))
        np.testing.assert_allclose(acc.sum[0], brute, rtol=1e-5, atol=1e-4)
        assert acc.count == len(rows)


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


def test_side_by_side_keeps_the_order_runs_groups_on_distinct_states_and_reraises():
    import threading
    from onnxobq.runtime import side_by_side

    read, log = [], []

    def items():
        for i in range(7):
            read.append(i)
            yield i

    def fn(state, item):
        log.append((state, item, len(read)))
        time.sleep(0.01 * (3 - item % 3))        # later items of a group finish first
        return item * 10, state, threading.current_thread().name

    got = list(side_by_side(fn, items(), ["a", "b", "c"]))
    assert [g[0] for g in got] == [i * 10 for i in range(7)]
    assert [g[1] for g in got] == ["a", "b", "c", "a", "b", "c", "a"]         # state i of each group
    assert all(name.startswith("onnxobq-run") for _, _, name in got)
    assert sorted((item, seen) for _, item, seen in log) == [(0, 3), (1, 3), (2, 3), (3, 6), (4, 6), (5, 6), (6, 7)]
    assert [g[:2] for g in side_by_side(fn, range(3), ["only"])] == [(0, "only"), (10, "only"), (20, "only")]

    def failing(state, item):
        if item == 4:
            raise ValueError("bad batch 4")
        return item

    with pytest.raises(ValueError, match="bad batch 4"):
        list(side_by_side(failing, range(6), ["a", "b"]))

    endless = side_by_side(lambda state, item: item, itertools.count(), ["a", "b"])
    assert [next(endless), next(endless), next(endless)] == [0, 1, 2]
    endless.close()                          # a consumer that stops early: no thread left waiting
    assert not [t for t in threading.enumerate() if t.name.startswith("onnxobq-run")]


def test_two_sessions_run_batches_of_one_sample_on_the_cpu():
    sixteen = builders.cpu(cores=16)
    assert runtime.session_workers(sixteen, 1) == (2, 8)
    assert runtime.session_workers(sixteen, 8) == (1, None)
    assert runtime.session_workers(sixteen, 1, Tuning.side_model_bytes) == (2, 8)
    assert runtime.session_workers(sixteen, 1, Tuning.side_model_bytes + 1) == (1, None)
    assert runtime.session_workers(builders.cpu(cores=1), 1) == (1, None)


def test_hessian_sum_over_batches_equals_the_full_product():
    """Batches summed in place give 2 X X^T / N of all of them, symmetric."""
    r = np.random.default_rng(8)
    X = r.standard_normal((2, 301, 50)).astype(np.float32)          # (G, C, M)
    acc, product = HessianSum(), Products(np)
    for part in np.split(X, [20, 35], axis=2):
        acc.add(np.ascontiguousarray(part), np, product)
    H = acc.hessian(np)
    X64 = X.astype(np.float64)
    np.testing.assert_allclose(H, 2 * X64 @ X64.transpose(0, 2, 1) / 50, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(H, H.transpose(0, 2, 1))


def test_held_back_samples_are_multiplied_in_gathers_and_all_counted():
    """With ``gather``, batches with fewer columns wait and are multiplied together; batches with
    more go straight in; hessian() multiplies what is still held. The result is the full product."""
    r = np.random.default_rng(10)
    X = r.standard_normal((2, 40, 200)).astype(np.float32)          # (G, C, M)
    acc, product = HessianSum(gather=64), Counting(np)
    calls = product.calls
    for part in np.split(X, [20, 50, 60, 150, 170], axis=2):        # 20, 30, 10, 90, 20, 30 columns
        acc.add(np.ascontiguousarray(part), np, product)
    assert calls == [90, 60] and acc.count == 200     # 90 straight in; 20+30+10 held until 20 more came
    H = acc.hessian(np, product)
    assert calls == [90, 60, 50]                       # the last 20 + 30, held until the end
    X64 = X.astype(np.float64)
    np.testing.assert_allclose(H, 2 * X64 @ X64.transpose(0, 2, 1) / 200, rtol=1e-5, atol=1e-4)


def test_a_batch_that_cannot_share_a_gather_is_multiplied_at_once_not_copied():
    r = np.random.default_rng(11)
    P = r.standard_normal((1, 8, 40)).astype(np.float32)
    acc = HessianSum(gather=64)                                    # two batches of 40 never fit
    acc.add(P, np, Products(np))
    assert acc._waiting is None and acc.count == 40
    np.testing.assert_allclose(acc.sum[0], P[0].astype(np.float64) @ P[0].T.astype(np.float64), rtol=1e-5)


def test_gather_columns_is_twice_the_features_within_the_held_memory_cap():
    layer = conv_layer(wshape=(8, 16, 3, 3))                          # C = 144
    assert gather_columns(layer, builders.cpu()) == 288
    assert gather_columns(layer, builders.cpu(gather_elements=144 * 100)) == 100


def test_products_reuse_one_buffer_across_shapes():
    """Each product equals P P^T whatever came before it (a smaller, then a larger, shape),
    and a product of the same size or smaller lands in the same buffer."""
    r = np.random.default_rng(9)
    product = Products(np)
    first = None
    for shape in ((1, 5, 7), (3, 10, 4), (1, 2, 9), (2, 30, 11)):
        P = r.standard_normal(shape).astype(np.float32)
        got = product(P)
        np.testing.assert_allclose(got, P @ P.transpose(0, 2, 1), rtol=1e-5, atol=1e-5)
        if shape == (1, 2, 9):
            assert np.shares_memory(got, first)
        first = got


def test_on_numpy_the_capture_takes_turns_with_onnxruntime_and_its_threads_do_not_spin(tmp_path, monkeypatch):
    """NumPy's BLAS and onnxruntime share the cores: no batch runs ahead, no thread spins."""
    depths, spins = [], []
    real_prefetch, real_options = capturing.prefetch, runtime.session_options
    monkeypatch.setattr(capturing, "prefetch", lambda items, depth=1: depths.append(depth) or real_prefetch(items, depth))
    monkeypatch.setattr(runtime, "session_options", lambda spin=True: spins.append(spin) or real_options(spin))
    model = builders.conv_stack()
    np.savez(tmp_path / "c.npz", x=np.ones((4, 3, 12, 12), np.float32))
    capture_hessians(model, scan_layers(gs.import_onnx(model)).layers,
                     CalibConfig(source=str(tmp_path / "c.npz"), batch_size=2), builders.cpu())
    assert depths == [0] and spins == [False]
    opts = real_options(spin=False)
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"


SHIFTED = [
    dict(xshape=(2, 3, 9, 10), wshape=(4, 3, 3, 3), pads=[1, 1, 1, 1]),
    dict(xshape=(1, 2, 11, 9), wshape=(4, 2, 5, 3), pads=[2, 0, 1, 3], dilations=[2, 1]),
    dict(xshape=(2, 2, 7, 8), wshape=(3, 2, 1, 3), auto_pad="SAME_LOWER"),
    dict(xshape=(1, 3, 8, 8), wshape=(3, 3, 3, 3), auto_pad="VALID"),
    dict(xshape=(1, 2, 6, 7), wshape=(2, 2, 3, 2), pads=[4, 3, 0, 5]),     # pads wider than the kernel
    dict(xshape=(3, 2, 5, 6), wshape=(2, 2, 2, 2), auto_pad="SAME_UPPER"),
    dict(xshape=(1, 2, 4, 5), wshape=(2, 2, 3, 3), pads=[4, 5, 4, 5], dilations=[4, 3]),  # shifts past the input
]


@pytest.mark.parametrize("left", [True, False], ids=["stack-left", "stack-right"])
@pytest.mark.parametrize("case", SHIFTED, ids=lambda c: "x".join(map(str, c["wshape"])) + "-" + str(c.get("auto_pad", c.get("pads"))))
def test_shifted_products_give_the_brute_force_hessian(case, left):
    """A stride-1 conv's sum built from shifted products equals the sum over every patch, and
    counts every output position, with the stack of shifted copies multiplied on either side."""
    case = dict(case)
    x = np.random.default_rng(12).standard_normal(case.pop("xshape")).astype(np.float32)
    layer = conv_layer(**case)
    acc, product = HessianSum(), Products(np)
    add_shifted(layer, x, acc, product, 1 << 30 if left else 0)
    assert acc.count == x.shape[0] * np.prod(conv_outputs(layer.conv, x.shape[2:]))
    H = acc.hessian(np, product)
    np.testing.assert_allclose(H, 2 * brute_force_conv_hessian(x, layer) / acc.count, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("ring_elements", [60, 400, 1 << 20])
def test_ring_patches_held_back_or_not_give_the_brute_force_hessian(ring_elements):
    """Batches of a stride-1 conv whose ring patches (four strips of 15 patch rows, with 7, 7,
    6 and 6 patches an image) are subtracted at once (the strips hold 4 columns), held in 26
    columns or held in 30 all give the brute-force Hessian, in the known products."""
    r = np.random.default_rng(15)
    layer = conv_layer(wshape=(4, 5, 3, 3), pads=[1, 1, 1, 1])
    batches = [r.standard_normal((1, 5, 6, 5)).astype(np.float32) for _ in range(7)]
    acc, product = HessianSum(ring_elements=ring_elements), Counting(np)
    for x in batches:
        add_shifted(layer, x, acc, product)
    H = acc.hessian(np, product)
    assert sorted(product.calls) == sorted({60: [7] * 14 + [6] * 14,
                                            400: [21, 21, 7] * 2 + [24, 18] * 2,
                                            1 << 20: [28, 21] * 2 + [30, 12] * 2}[ring_elements])
    np.testing.assert_allclose(H, 2 * brute_force_conv_hessian(np.concatenate(batches), layer) / (7 * 30),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shifted_first", [True, False])
def test_shifted_and_unfolded_batches_add_into_one_sum(shifted_first):
    """A layer whose batches go some through shifted products (the sum kernel-major) and some
    through im2col, held back in a gather or not, still gets the brute-force Hessian."""
    r = np.random.default_rng(13)
    layer = conv_layer(wshape=(4, 3, 3, 3), pads=[1, 1, 1, 1])
    batches = [r.standard_normal((n, 3, 6, 5)).astype(np.float32) for n in (2, 1, 3)]
    acc, product = HessianSum(gather=60), Products(np)                 # 30 columns a sample: held
    for i, x in enumerate(batches):
        if (i % 2 == 0) == shifted_first:
            add_shifted(layer, x, acc, product)
        else:
            acc.add(layer_columns(layer, x, np), np, product)
    H = acc.hessian(np, product)
    x = np.concatenate(batches)
    assert acc.count == 6 * 30
    np.testing.assert_allclose(H, 2 * brute_force_conv_hessian(x, layer) / 180, rtol=1e-4, atol=1e-5)


def test_shifts_pay_only_for_wide_stride_1_2d_convs_with_one_group():
    """The rule's known answers for a 3 x 3 conv of 96 channels, one image a batch, im2col's
    columns held in gathers of 1,728: at 52 x 52 yes (cost ratio 0.33), at 13 x 13 yes (0.57),
    at 10 x 10 no (0.74); at 7 x 7 no (1.16), but yes where im2col's 49 columns would be
    multiplied alone (0.36); strided, grouped, pointwise or 1-D never."""
    wide, cpu = np.zeros((1, 96, 52, 52), np.float32), builders.cpu()
    conv = conv_layer((96, 96, 3, 3), pads=[1, 1, 1, 1])
    assert shifts_pay(conv, wide, cpu, gather=1728)
    assert shifts_pay(conv, wide[:, :, :13, :13], cpu, gather=1728)
    assert not shifts_pay(conv, wide[:, :, :10, :10], cpu, gather=1728)
    assert not shifts_pay(conv, wide[:, :, :7, :7], cpu, gather=1728)
    assert shifts_pay(conv, wide[:, :, :7, :7], builders.cpu())
    assert not shifts_pay(conv_layer((96, 96, 3, 3), strides=[2, 2], pads=[1, 1, 1, 1]), wide, builders.cpu())
    assert not shifts_pay(conv_layer((96, 48, 3, 3), groups=2, pads=[1, 1, 1, 1]), wide, builders.cpu())
    assert not shifts_pay(conv_layer((96, 96, 1, 1)), wide, builders.cpu())
    assert not shifts_pay(conv_layer((96, 96, 3), pads=[1, 1]), wide[:, :, 0], builders.cpu())
    assert ring_bounds(conv.conv, (52, 52)) == [(0, 1, 53, 54)] * 2


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


def test_a_feed_that_onnxruntime_rejects_is_one_line_naming_the_input():
    from onnxobq.errors import UserError
    sess = runtime.session(builders.conv_stack(), {})
    with pytest.raises(UserError) as err:
        runtime.run(sess, ["y"], {"x": np.zeros((4, 3, 8, 8), np.float32)})
    assert str(err.value) == ("onnxruntime rejected the calibration batch (input 'x' is [?, 3, 12, 12], the batch "
                              "has shape [4, 3, 8, 8]); check the calibration data's shapes and dtypes against "
                              "the model inputs")


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


def test_layer_workers_run_the_costliest_first_and_stop_at_an_error():
    """The first batch goes largest first, later ones by their times on the one before; a
    task's error reaches the caller, and the tasks not yet started are left undone."""
    from onnxobq.threads import LayerWorkers
    done = []

    def fn(key, seconds, tools):
        time.sleep(seconds)
        done.append(key)

    with LayerWorkers(2) as workers:
        tasks = [("a", 0.06, 1), ("b", 0.0, 3), ("c", 0.03, 2)]
        assert [t[0] for t in workers.order(tasks)] == ["b", "c", "a"]
        workers.run(tasks, fn)
        assert sorted(done) == ["a", "b", "c"]
        assert [t[0] for t in workers.order(tasks + [("d", 0.0, 9)])] == ["a", "c", "b", "d"]

        def fail(key, task, tools):
            time.sleep(0.02)
            done.append(key)
            if key == "x":
                raise ValueError("bad layer x")

        done.clear()
        with pytest.raises(ValueError, match="bad layer x"):
            workers.run([("x", None, 9), ("y", None, 8)] + [(f"z{i}", None, 1) for i in range(20)], fail)
        assert {"x", "y"} <= set(done) and len(done) < 22


def test_cpu_workers_are_one_per_core_up_to_the_cap_and_one_on_a_gpu(monkeypatch):
    from onnxobq import backend
    gpu = type("cupy", (), {"__name__": "cupy"})()      # stands for the cupy module
    for cores, want in [(1, 1), (2, 2), (3, 3), (16, Tuning.max_cpu_workers)]:
        assert choose_device("cpu", cores=cores).workers == want
    monkeypatch.setattr(backend, "cupy_or_none", lambda: gpu)
    monkeypatch.setattr(backend, "device_name", lambda xp: "cuda:test")
    assert choose_device("cuda", cores=16).workers == 1
