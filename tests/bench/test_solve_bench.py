"""scripts/solve_bench.py: its problems and its per-shape counting of exact OBQ."""
import json

import numpy as np
import pytest

import solve_bench


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_problems_are_in_the_working_dtype_and_positive_definite(dtype):
    """W and H both in the dtype asked for (H was float64 beside float32 W before 8499aa8)."""
    W, H = solve_bench.problem(2, 5, 16, np, dtype)
    assert W.dtype == H.dtype == np.dtype(dtype) and W.shape == (2, 5, 16) and H.shape == (2, 16, 16)
    np.testing.assert_allclose(H, np.swapaxes(H, 1, 2), rtol=1e-6)
    assert (np.linalg.eigvalsh(H.astype(np.float64)) > 0).all()


def test_obq_per_shape_times_each_shape_once_and_counts_it_for_every_layer(tmp_path, monkeypatch):
    """n10, n12 and n22 share one shape: OBQ is solved for n4 and n10 only, and the total
    counts n10's time three times."""
    calls = []
    real = solve_bench.time_solve

    def counted(method, W, H, xp, repeat, obq_rows, group_size=0):
        calls.append((method, W.shape))
        return real(method, W, H, xp, repeat, obq_rows, group_size)

    monkeypatch.setattr(solve_bench, "time_solve", counted)
    out = tmp_path / "r.json"
    solve_bench.main(["--resnet50", "--layers", "n4,n10,n12,n22", "--methods", "obq", "--repeat", "0",
                      "--obq-rows", "1", "--obq-per-shape", "--json", str(out)])
    assert calls == [("obq", (1, 64, 64)), ("obq", (1, 256, 64))]
    rec = json.loads(out.read_text())
    by = {r["problem"]: r for r in rec["records"]}
    assert [by[n]["same_shape_as_earlier"] for n in ("n4", "n10", "n12", "n22")] == [False, False, True, True]
    assert by["n12"]["seconds"] == by["n22"]["seconds"] == by["n10"]["seconds"]
    assert rec["totals"]["obq"] == pytest.approx(by["n4"]["seconds"] + 3 * by["n10"]["seconds"])


@pytest.mark.parametrize("method,coef", [("fastobq", (2e-11, 5e-12, 3e-9, 4e-3)), ("gptq", (1e-10, 3e-11, 0.0, 0.0)),
                                         ("fastobq", (0.0, 1e-11, 1e-8, 1e-3))])
def test_cost_model_recovers_the_coefficients_of_exact_times(method, coef):
    """Times made from a known a F + b R C^2 + d R C + c give back a, b, d and c."""
    a, b, d, c = coef
    factor = 4 / 3 if method == "fastobq" else 2 / 3
    cells = [(R, C, a * factor * C ** 3 + b * R * C ** 2 + d * R * C + c)
             for C in (256, 1024, 4096) for R in (256, 1024, 4096)]
    np.testing.assert_allclose(solve_bench.fit_cost_model(method, cells), coef, rtol=1e-6, atol=1e-15)


def test_cost_model_keeps_coefficients_non_negative():
    """Times that fall with C would need a negative C^3 term: the fit drops it instead."""
    cells = [(256, 256, 3.0), (256, 512, 2.0), (256, 1024, 1.0)]
    assert min(solve_bench.fit_cost_model("gptq", cells)) >= 0


def test_scaling_table_prints_the_model_beside_each_cell(capsys, tmp_path):
    out = tmp_path / "r.json"
    solve_bench.main(["--cols", "16,32", "--rows", "4,8", "--methods", "gptq", "--repeat", "1",
                      "--json", str(out)])
    text = capsys.readouterr().out
    rec = json.loads(out.read_text())
    fit = rec["cost_model"]["gptq"]
    assert "gptq: seconds = F / (" in text and "model s" in text
    for r in rec["records"]:
        model = fit["factor_s_per_flop"] * (2 / 3) * r["C"] ** 3 + fit["sweep_s_per_flop"] * r["R"] * r["C"] ** 2 \
            + fit["per_weight_s"] * r["R"] * r["C"] + fit["fixed_s"]
        assert f"{r['R']:>6} {r['C']:>6} {r['seconds']:>11.4f} {model:>10.4f}" in text


def test_gpu_recursive_min_cols_sets_the_solver_constant(monkeypatch, tmp_path, capsys):
    from onnxobq.solvers import common

    monkeypatch.setattr(common, "GPU_RECURSIVE_MIN_COLS", common.GPU_RECURSIVE_MIN_COLS)  # restored after
    out = tmp_path / "r.json"
    solve_bench.main(["--cols", "16", "--rows", "4", "--methods", "gptq", "--repeat", "0",
                      "--gpu-recursive-min-cols", "512", "--json", str(out)])
    assert common.GPU_RECURSIVE_MIN_COLS == 512
    assert "GPU_RECURSIVE_MIN_COLS 512" in capsys.readouterr().out
    assert json.loads(out.read_text())["gpu_recursive_min_cols"] == 512
