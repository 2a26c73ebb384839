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

    def counted(method, W, H, xp, repeat, obq_rows):
        calls.append((method, W.shape))
        return real(method, W, H, xp, repeat, obq_rows)

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
