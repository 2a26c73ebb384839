"""scripts/shift_bench.py: each way of capturing is really taken, and the cost is shift_cost's."""
import sys

import numpy as np

import shift_bench
from onnxobq.backend import choose_device
from onnxobq.hessian import gather_columns, sums
from onnxobq.hessian.shifted import shift_cost


def test_each_way_is_taken_and_the_printed_cost_is_shift_costs(monkeypatch, capsys):
    taken = []
    real = sums.add_shifted
    monkeypatch.setattr(sums, "add_shifted", lambda *a: taken.append("shifted") or real(*a))
    assert shift_bench.seconds_per_call(shift_bench.conv(4), np.ones((1, 4, 9, 9), np.float32), False) > 0
    assert taken == []
    assert shift_bench.seconds_per_call(shift_bench.conv(4), np.ones((1, 4, 9, 9), np.float32), True) > 0
    assert taken
    monkeypatch.setattr(sys, "argv", ["shift_bench.py", "--shapes", "8x6x2", "--repeat", "1"])
    shift_bench.main()
    row = capsys.readouterr().out.splitlines()[-1].split()
    layer, device = shift_bench.conv(8), choose_device("cpu")
    want = shift_cost(layer.conv, (2, 8, 6, 6), device.tuning, gather_columns(layer, device))
    assert row[:3] == ["8", "6", "2"] and float(row[3]) == round(want, 2)
