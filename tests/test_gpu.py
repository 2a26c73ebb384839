"""NumPy and CuPy give the same answers. Skipped without CuPy and a CUDA GPU (see conftest.py)."""
import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

from onnxobq.backend import choose_device, to_numpy
from onnxobq.calibration import CalibConfig
from onnxobq.capturing import capture_hessians
from onnxobq.cli import main
from onnxobq.graph import scan_layers
from onnxobq.quant import GridSpec, fit_grid
from onnxobq.solvers import METHODS, ORDERS, Damping, layer_error

import builders

pytestmark = pytest.mark.gpu


@pytest.fixture
def cp():
    return pytest.importorskip("cupy")


def problem(seed, G=2, R=24, C=70, N=400):
    r = np.random.default_rng(seed)
    X = np.einsum("ij,gjn->gin", np.eye(C) + 0.5 * r.standard_normal((C, C)), r.standard_normal((G, C, N)))
    return r.standard_normal((G, R, C)), 2 * X @ X.transpose(0, 2, 1) / N


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("method", ["fastobq", "gptq"])
def test_sweep_float64_matches(cp, method, order):
    W, H = problem(0)
    spec = GridSpec(bits=3)
    ref = METHODS[method].solve(W, H, fit_grid(W, spec), order=order, block=16)
    Wg, Hg = cp.asarray(W), cp.asarray(H)
    got = METHODS[method].solve(Wg, Hg, fit_grid(Wg, spec, cp), order=order, block=16, xp=cp, kernel=True)
    np.testing.assert_allclose(to_numpy(got.Q), ref.Q, atol=1e-6)
    np.testing.assert_array_equal(got.fallback, ref.fallback)


@pytest.mark.parametrize("method", ["fastobq", "gptq", "obq", "rtn"])
def test_grouped_grids_match(cp, method):
    W, H = problem(3)
    spec = GridSpec(bits=3, group_size=16)          # 70 columns: four groups of 16 and one of 6
    ref = METHODS[method].solve(W, H, fit_grid(W, spec))
    Wg, Hg = cp.asarray(W), cp.asarray(H)
    got = METHODS[method].solve(Wg, Hg, fit_grid(Wg, spec, cp), xp=cp, kernel=True)
    np.testing.assert_allclose(to_numpy(got.Q), ref.Q, atol=1e-6)


def test_sweep_float32_agrees_within_float_tolerance(cp):
    W, H = problem(1, G=3, R=64, C=200)
    spec = GridSpec(bits=4, search="mse")
    ref = METHODS["fastobq"].solve(W, H, fit_grid(W, spec))
    Wg, Hg = cp.asarray(W, dtype=cp.float32), cp.asarray(H, dtype=cp.float32)
    got = METHODS["fastobq"].solve(Wg, Hg, fit_grid(Wg, spec, cp), xp=cp, kernel=True)
    codes = to_numpy(got.codes)
    assert np.mean(codes != ref.codes) < 0.01
    e_ref, e_got = layer_error(W, ref.Q, H, np), layer_error(W, to_numpy(got.Q).astype(np.float64), H, np)
    assert abs(e_got - e_ref) <= 0.02 * e_ref


def test_cholesky_fallback_on_gpu(cp):
    W, H = problem(2)
    H[1] = -np.eye(H.shape[1])
    spec = GridSpec(bits=4)
    got = METHODS["fastobq"].solve(cp.asarray(W), cp.asarray(H), fit_grid(cp.asarray(W), spec, cp),
                                   damp=Damping(0.01, relative=False, retries=1), xp=cp, kernel=True)
    assert list(got.fallback) == [False, True]


def test_capture_hessians_match(cp, tmp_path):
    model = builders.conv_stack()
    layers = scan_layers(gs.import_onnx(model)).layers
    x = np.random.default_rng(3).standard_normal((6, 3, 12, 12)).astype(np.float32)
    np.savez(tmp_path / "c.npz", x=x)
    calib = CalibConfig(source=str(tmp_path / "c.npz"), batch_size=4)
    ref = capture_hessians(model, layers, calib, builders.cpu()).hessians
    got = capture_hessians(model, layers, calib, choose_device("cuda", precision="float64")).hessians
    got32 = capture_hessians(model, layers, calib, choose_device("cuda")).hessians   # what --device cuda uses
    for key in ref:
        np.testing.assert_allclose(to_numpy(got[key]), ref[key], rtol=1e-4, atol=1e-5)
        assert got32[key].dtype == cp.float32
        np.testing.assert_allclose(to_numpy(got32[key]), ref[key], rtol=1e-4, atol=1e-5)


def test_activation_ranges_on_a_gpu_capture_match_numpy(cp, tmp_path):
    """The |x| histograms are counted on the host either way: the same counts, range and max."""
    model = builders.conv_stack()
    layers = scan_layers(gs.import_onnx(model)).layers
    np.savez(tmp_path / "c.npz", x=np.random.default_rng(5).standard_normal((6, 3, 12, 12)).astype(np.float32))
    calib = CalibConfig(source=str(tmp_path / "c.npz"), batch_size=4)
    ref = capture_hessians(model, layers, calib, builders.cpu(), ranges=True).ranges
    got = capture_hessians(model, layers, calib, choose_device("cuda"), ranges=True).ranges
    assert list(got) == list(ref) == ["x", "r1", "r2", "f"]
    for name in ref:
        assert (got[name].top, got[name].amax) == (ref[name].top, ref[name].amax)
        np.testing.assert_array_equal(got[name].counts, ref[name].counts)


def test_cli_cuda_matches_cpu(cp, tmp_path, capsys):
    onnx.save(builders.conv_stack(), tmp_path / "m.onnx")
    x = np.random.default_rng(4).standard_normal((16, 3, 12, 12)).astype(np.float32)
    np.savez(tmp_path / "c.npz", x=x)
    for device in ("cpu", "cuda"):
        code = main(["quantize", str(tmp_path / "m.onnx"), "--bits", "4", "--calib", str(tmp_path / "c.npz"),
                     "--device", device, "--precision", "float64", "--format", "fake",
                     "-o", str(tmp_path / f"{device}.onnx"), "-q"])
        assert code == 0, capsys.readouterr().err
    a = builders.run(onnx.load(tmp_path / "cpu.onnx"), {"x": x})[0]
    b = builders.run(onnx.load(tmp_path / "cuda.onnx"), {"x": x})[0]
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("G,R,C,block", [(1, 37, 300, 128), (3, 5, 70, 50), (7, 1, 9, 128), (2, 64, 130, 32)])
def test_block_kernel_matches_plain_sweep(cp, dtype, G, R, C, block):
    """The one-launch-per-block kernel gives the plain CuPy sweep's codes (and NumPy's in float64)."""
    from onnxobq.solvers import cuda_sweep
    from onnxobq.solvers.common import cholesky, inverse_hessian
    from onnxobq.solvers.sweep import blocked_sweep

    W, H = problem(5, G=G, R=R, C=C)
    Hinv, _, _ = inverse_hessian(H, Damping(), np)
    U = np.swapaxes(cholesky(Hinv, np)[0], -1, -2)
    grid = fit_grid(W, GridSpec(bits=3))
    args = (grid.scale, grid.zero, grid.qmin, grid.qmax, block)
    ref = blocked_sweep(W, U, *args, np)
    g = [cp.asarray(a, dtype=dtype) for a in (W, U, grid.scale, grid.zero)]
    plain = to_numpy(blocked_sweep(g[0], g[1], g[2], g[3], *args[2:], cp))
    fused = to_numpy(cuda_sweep.blocked_sweep_cuda(g[0], g[1], g[2], g[3], *args[2:], cp))
    assert np.mean(fused != plain) <= (0 if dtype == "float64" else 0.002)
    if dtype == "float64":
        np.testing.assert_array_equal(fused, ref)


@pytest.mark.parametrize("C", [16, 100])
def test_cholesky_reports_failure_on_gpu(cp, C):
    """A stack with one indefinite matrix: both backends flag exactly that one (batched and per-matrix paths)."""
    from onnxobq.solvers.common import cholesky

    r = np.random.default_rng(6)
    Q, _ = np.linalg.qr(r.standard_normal((C, C)))
    good = Q @ np.diag(np.linspace(1, 2, C)) @ Q.T
    bad = Q @ np.diag(np.r_[np.linspace(1, 2, C - 1), -1e-3]) @ Q.T   # fails late, not at the first pivot
    A = np.stack([good, bad, good])
    for xp in (np, cp):
        L, ok = cholesky(xp.asarray(A), xp)
        assert to_numpy(ok).tolist() == [True, False, True]
        np.testing.assert_allclose(to_numpy(L)[0] @ to_numpy(L)[0].T, good, atol=1e-10)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("C", [40, 65, 300, 1500])
def test_cholesky_failure_at_any_pivot_is_reported(cp, dtype, C):
    """The O(C^2) check catches a factorisation that breaks down at the first, a middle
    or the last pivot (where cuSOLVER leaves a partial factor and raises nothing)."""
    from onnxobq.solvers.common import cholesky

    r = np.random.default_rng(C)
    F = np.tril(r.standard_normal((C, C))) / np.sqrt(C) + np.eye(C)
    A = F @ F.T
    stack = [A]
    for k in (0, C // 2, C - 1):
        bad = A.copy()
        bad[k, k] = (F[k, :k] ** 2).sum() - 0.5     # the k-th pivot becomes -0.5
        stack.append(bad)
    stack.append(A)
    for xp in (np, cp):
        L, ok = cholesky(xp.asarray(np.stack(stack), dtype=dtype), xp)
        assert to_numpy(ok).tolist() == [True, False, False, False, True], (xp.__name__, dtype, C)
        np.testing.assert_allclose(to_numpy(L)[0], F, atol=1e-3 if dtype == "float32" else 1e-9)


def test_inverse_factors_match_numpy(cp):
    from onnxobq.solvers.common import inverse_cholesky, inverse_diagonal, upper_inverse_factor

    for C in (30, 300):
        r = np.random.default_rng(C)
        X = r.standard_normal((2, C, 3 * C))
        A = X @ X.transpose(0, 2, 1) / C + 0.1 * np.eye(C)
        U, ok = upper_inverse_factor(cp.asarray(A), cp)
        np.testing.assert_allclose(to_numpy(U), upper_inverse_factor(A, np)[0], rtol=1e-7, atol=1e-9)
        d = inverse_diagonal(inverse_cholesky(cp.asarray(A), cp)[0], cp)
        np.testing.assert_allclose(to_numpy(d), inverse_diagonal(inverse_cholesky(A, np)[0], np), rtol=1e-9)


@pytest.mark.parametrize("upper", [False, True])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_recursive_inverse_cholesky_on_cupy_matches_numpy(cp, monkeypatch, dtype, upper):
    """With GPU_RECURSIVE_MIN_COLS lowered, CuPy builds the inverse factors by halves too: the
    same factors as NumPy's, and the identity for the matrix that is not positive definite."""
    from onnxobq.solvers import common

    monkeypatch.setattr(common, "GPU_RECURSIVE_MIN_COLS", 200)
    r = np.random.default_rng(2)
    X = r.standard_normal((3, 300, 600))
    A = X @ X.transpose(0, 2, 1) / 300 + 0.05 * np.eye(300)
    A[1, 250, 250] = -1.0
    got, ok = common.inverse_cholesky(cp.asarray(A, dtype=dtype), cp, upper)
    want, want_ok = common.inverse_cholesky(A, np, upper)
    assert to_numpy(ok).tolist() == want_ok.tolist() == [True, False, True]
    tol = (1e-3 if dtype == "float32" else 1e-10) * np.abs(want).max()
    np.testing.assert_allclose(to_numpy(got), want, rtol=0, atol=tol)


def test_uploader_copies_through_its_pinned_buffer(cp):
    """Uploads of growing and shrinking sizes (the buffer is reused) arrive intact, cast to the dtype."""
    from onnxobq.backend import Uploader

    up = Uploader(cp)
    r = np.random.default_rng(8)
    for shape in [(4, 3), (64, 32, 7), (2, 5), (1,)]:
        a = r.standard_normal(shape)
        got = up(a, np.float32)
        assert got.dtype == cp.float32 and got.shape == shape
        np.testing.assert_array_equal(to_numpy(got), a.astype(np.float32))


def test_stacked_layers_on_gpu_match_each_layer_on_numpy(cp):
    from onnxobq.config import SolveConfig
    from onnxobq.types import ConvGeometry, Layer
    from onnxobq.solve import solve_layer, solve_stack

    layers, weights, hessians = [], [], []
    for n, G in enumerate((1, 3, 2)):
        W, H = problem(10 + n, G=G, R=16, C=40)
        layers.append(Layer(f"l{n}", "Conv", f"w{n}", "initializer", f"x{n}", f"y{n}", (16 * G, 40, 1),
                            "float32", G, 16, 40, conv=ConvGeometry((1,), (1,), (0, 0), (1,))))
        weights.append(W.reshape(16 * G, 40, 1).astype(np.float32))
        hessians.append(H)
    cfg = SolveConfig(grid=GridSpec(bits=3), precision="float64")
    got = solve_stack(layers, weights, [cp.asarray(H) for H in hessians], cfg,
                      choose_device("cuda", precision="float64"), [1, 1, 1])
    for (q, s), layer, w, H in zip(got, layers, weights, hessians):
        q1, s1 = solve_layer(layer, w, H, cfg, builders.cpu())
        assert np.mean(q.codes != q1.codes) < 0.002
        assert s.error == pytest.approx(s1.error, rel=1e-3) and s.stacked == 3
