"""The device policy: how many threads take layers."""
from onnxobq.backend import Tuning, choose_device


def test_cpu_workers_are_one_per_core_up_to_the_cap_and_one_on_a_gpu(monkeypatch):
    from onnxobq import backend
    gpu = type("cupy", (), {"__name__": "cupy"})()      # stands for the cupy module
    for cores, want in [(1, 1), (2, 2), (3, 3), (16, Tuning.max_cpu_workers)]:
        assert choose_device("cpu", cores=cores).workers == want
    monkeypatch.setattr(backend, "cupy_or_none", lambda: gpu)
    monkeypatch.setattr(backend, "device_name", lambda xp: "cuda:test")
    assert choose_device("cuda", cores=16).workers == 1
