"""LayerWorkers: the costliest first, and an error stops them."""
import time

import pytest


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
