"""onnxruntime sessions: side by side in order, how many, and errors that name the input."""
import itertools
import time

import numpy as np
import pytest

from onnxobq import runtime
from onnxobq.backend import Tuning

import builders


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


def test_a_feed_that_onnxruntime_rejects_is_one_line_naming_the_input():
    from onnxobq.errors import UserError
    sess = runtime.session(builders.conv_stack(), {})
    with pytest.raises(UserError) as err:
        runtime.run(sess, ["y"], {"x": np.zeros((4, 3, 8, 8), np.float32)})
    assert str(err.value) == ("onnxruntime rejected the calibration batch (input 'x' is [?, 3, 12, 12], the batch "
                              "has shape [4, 3, 8, 8]); check the calibration data's shapes and dtypes against "
                              "the model inputs")


def test_a_large_models_session_maps_a_file_and_keeps_no_packed_copies(monkeypatch):
    """Past runtime.FILE_SESSION_BYTES (lowered here) a session reads a temporary file with external
    data, which onnxruntime maps, and prepacks nothing (both copies held the weights again)."""
    import onnxruntime as ort
    model = builders.conv_stack()
    x = builders.rng(0).standard_normal((2, 3, 12, 12)).astype(np.float32)
    want = runtime.session(model, {}).run(None, {"x": x})[0]
    seen = []
    real = ort.InferenceSession

    def spy(source, opts, *a, **k):
        seen.append((source, opts.get_session_config_entry("session.disable_prepacking")))
        return real(source, opts, *a, **k)

    monkeypatch.setattr(runtime, "FILE_SESSION_BYTES", 100)
    monkeypatch.setattr(runtime.ort, "InferenceSession", spy)
    got = runtime.session(model, {}).run(None, {"x": x})[0]
    assert len(seen) == 1 and seen[0][0].endswith("model.onnx") and seen[0][1] == "1"
    np.testing.assert_array_equal(got, want)
