"""The device policy: NumPy or CuPy, and every choice that follows from it, in one object.

A run builds one :class:`Device` (:func:`choose_device`) and passes it down. It says where
the arrays live (``xp``), how many threads take layers, whether same-shaped layers are
solved as stacks, whether onnxruntime runs a batch ahead, and which tuning constants
(:class:`Tuning`) the capture, the solve and BatchNorm use. Numeric code takes ``xp`` and
never imports CuPy itself; the I/O edges always hand over and receive NumPy arrays.
"""
from __future__ import annotations

import os
import resource
from dataclasses import dataclass, field

import numpy as np

from .errors import UserError, option


@dataclass(frozen=True)
class Tuning:
    """Sizes and costs that decide how the work is cut. Each was measured on the 2-core
    development machine (or the H100 machine where it says so); tests shrink them to reach
    every path on small models.

    Attributes:
        unfold_elements: the capture unfolds at most this many elements at once (about
            128 MB of float32), shared by the threads that unfold at the same time.
        gather_elements: on NumPy, a layer whose batches bring fewer than twice as many
            samples as it has features multiplies its samples in gathers of 2 * d_col, at most
            this many floats (64 MB) held per layer: its P P^T with few columns runs far below
            BLAS's speed. On the YOLOX detector (batch 1) its four layers of 1,728 columns took
            7.6 to 8.5 ms per image instead of 14.5 to 15.1 ms.
        ring_elements: each strip of a shifted-products ring holds back at most twice its
            rows' count of columns, within this many floats (4 MB).
        group_chunk_elements: on NumPy a grouped conv is unfolded and multiplied about this
            many patch elements (4 MB) at a time, so that each group's patches are still in
            cache for their product: the PP-OCRv4 recognizer's capture of 64 lines took 16.1
            to 17.0 s instead of 19.8 to 21.6 s.
        shift_cost: a stride-1 2-D conv (one group) builds its product from shifted products
            where their cost is at most this fraction of im2col's (see hessian.shifted.shift_cost).
            3 x 3 convs with cost ratios 0.33 to 0.49 took 0.39 to 0.60 of im2col's time
            (scripts/shift_bench.py); at 0.75 to 1.16, 0.89 to 1.11.
        add_cost: a float64 add of a product to a sum, per element, in multiply-adds (0.8 ns
            against a large GEMM's 0.013 ns per multiply-add).
        call_cost: shifted products' fixed cost beyond im2col's, in multiply-adds (0.09 ms a call).
        stack_left_channels: shifted products multiply their stack of shifted copies on the
            left up to this many channels, on the right above: the left took 0.84 to 0.95 of
            the right's time for 12 to 128 channels, 1.07 for 256 and 1.68 for 512.
        stack_max_cols: on a GPU, layers whose groups have the same (rows, cols) and at most
            this many columns are solved as one stack of groups: the GPU pays each operation's
            launch once per stack instead of once per layer.
        stack_max_bytes: the most a stack's weights and Hessians take (the solver holds
            several temporaries of this size).
        solve_rows_bytes: a stack whose weights take more than this in the solve's dtype (and
            more than four times its Hessians) is solved that many bytes of rows at a time (rows
            are independent given H and the column order): one 200,000 x 256 layer's FastOBQ
            solve peaked at 12.5 times its float32 weight whole, 2.7 times in parts of 64 MB
            (scripts/memory_bench.py --pieces). Each part factorises H again.
        max_cpu_workers: at most this many threads take layers at once on NumPy. Each holds
            its own buffers (up to about 170 MB a thread on ResNet-50's capture in batches
            of 8; a solve's copies of its Hessian, up to about 700 MB for 4,608 columns).
        side_model_bytes: models of more than this many bytes keep one onnxruntime session
            where two would run batch-1 samples side by side: two sessions hold two copies of
            the weights (24 MatMuls of 2048 x 2048 took 35.0 and 39.3 s on two sessions
            against 26.4 and 29.2 s on one, with 3.3 GB of peak RSS against 1.9 GB).
        replay_bytes: the calibration batches are kept for BatchNorm's passes up to this many
            bytes (the detector's 256 inputs of 3 x 416 x 416 are 532 MB).
        output_cache_bytes: BatchNorm keeps the float model's outputs between its passes up
            to this size; past it they are computed again.
        squares_run: BatchNorm's moments sum squares in float32 runs of this many values: a
            (8, 64, 112, 112) array took 3.8 ms where float64 sums took 8.3 ms, within 1.3e-7.
    """

    unfold_elements: int = 1 << 25
    gather_elements: int = 1 << 24
    ring_elements: int = 1 << 20
    group_chunk_elements: int = 1 << 20
    shift_cost: float = 0.65
    add_cost: float = 60
    call_cost: float = 8e6
    stack_left_channels: int = 128
    stack_max_cols: int = 1024
    stack_max_bytes: int = 64 << 20
    solve_rows_bytes: int = 64 << 20
    max_cpu_workers: int = 4
    side_model_bytes: int = 64 << 20
    replay_bytes: int = 1 << 30
    output_cache_bytes: int = 512 << 20
    squares_run: int = 4096


@dataclass(frozen=True)
class Device:
    """Where a run computes, and the choices that follow from it.

    Attributes:
        xp: ``numpy`` or ``cupy``: where the Hessians accumulate and the solver runs.
        name: "cpu" or "cuda:" and the GPU's name, for the report.
        runtime: the onnxruntime choice ("cpu", "cuda" or "auto"; see runtime.providers).
        cores: the CPUs this process may run on.
        workers: threads that take layers at once (capture products and solves): one per
            core on NumPy, up to ``tuning.max_cpu_workers``, BLAS on one thread each (see
            threads.LayerWorkers); one on a GPU.
        solve_dtype: the solver's arithmetic and the Hessian sums' dtype: float64 on the CPU,
            float32 on a GPU (``precision`` "auto"), which halves their memory there.
        stack_bytes: bytes a stack of same-shaped layers may hold (0: every layer alone, as on
            the CPU, where stacking saved no time and its temporaries raised the peak memory).
        pipeline_depth: batches onnxruntime runs ahead in a thread while the Hessians of
            earlier ones accumulate: 1 on a GPU, 0 on NumPy, whose products and onnxruntime
            would fight for the same cores.
        spin: let onnxruntime's idle threads spin between operators (off on NumPy, where BLAS
            shares the cores between forward passes).
        sweep_kernel: run the sweep's in-block loop as one CUDA kernel per block where the
            layer allows (``ONNXOBQ_SWEEP_KERNEL=0`` turns it off for benchmarks).
        tuning: the sizes and costs.
    """

    xp: object = np
    name: str = "cpu"
    runtime: str = "cpu"
    cores: int = 1
    workers: int = 1
    solve_dtype: str = "float64"
    stack_bytes: int = 0
    pipeline_depth: int = 0
    spin: bool = False
    sweep_kernel: bool = False
    tuning: Tuning = field(default_factory=Tuning)

    @property
    def gpu(self) -> bool:
        """Whether the arrays live on a GPU (CuPy)."""
        return is_cupy(self.xp)

    def peak_gpu_mb(self) -> float | None:
        """The GPU memory CuPy's pool holds, in MB (None on the CPU)."""
        return self.xp.get_default_memory_pool().total_bytes() / 2 ** 20 if self.gpu else None


def choose_device(choice: str = "auto", precision: str = "auto", tuning: Tuning | None = None,
                  cores: int | None = None) -> Device:
    """The Device for a ``device`` choice.

    Args:
        choice: "auto" (CuPy when a GPU is usable, else NumPy), "cpu" or "cuda".
        precision: the solver's arithmetic: "auto", "float32" or "float64".
        tuning: the sizes and costs (default: Tuning()).
        cores: the usable CPUs (default: this process's affinity).

    Raises:
        UserError: "cuda" was asked for and no usable GPU is present.
    """
    tuning = tuning or Tuning()
    cores = cores or usable_cores()
    xp = np if choice == "cpu" else cupy_or_none()
    if choice == "cuda" and xp is None:
        raise UserError(f"{option('device', 'cuda')}: CuPy with a CUDA GPU is not available here; "
                        f"install onnxobq[gpu] on a GPU machine or use {option('device', 'cpu')}")
    xp = np if xp is None else xp
    gpu = is_cupy(xp)
    dtype = ("float32" if gpu else "float64") if precision == "auto" else precision
    return Device(xp=xp, name=device_name(xp), runtime=choice, cores=cores,
                  workers=1 if gpu else max(1, min(cores, tuning.max_cpu_workers)), solve_dtype=dtype,
                  stack_bytes=tuning.stack_max_bytes if gpu else 0, pipeline_depth=1 if gpu else 0, spin=gpu,
                  sweep_kernel=gpu and os.environ.get("ONNXOBQ_SWEEP_KERNEL", "1") != "0", tuning=tuning)


def usable_cores() -> int:
    """The CPUs this process may run on (its affinity mask, which a container may narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def cupy_or_none():
    """Return the CuPy module when CuPy is installed and sees a CUDA GPU, else None."""
    try:
        import cupy
    except Exception:  # not installed, or a broken CUDA install: both mean "no GPU"
        return None
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return None
    except Exception:
        return None
    return cupy


def is_cupy(xp) -> bool:
    """True when ``xp`` is the CuPy module."""
    return getattr(xp, "__name__", "") == "cupy"


def synchronize(xp) -> None:
    """Wait for the GPU's queued work (no-op on NumPy), so that a timer sees it."""
    if is_cupy(xp):
        xp.cuda.Stream.null.synchronize()


class Uploader:
    """Copies host arrays to the array module's device.

    On CuPy every copy goes through one reusable page-locked (pinned) host buffer,
    grown to the largest array seen. On the H100 machine one batch of ResNet-50's
    layer inputs (32 images) took 290 ms to upload from ordinary pageable memory and
    27 ms from pinned memory, not counting the host copy into it; end to end, with that
    copy, the capture of 2,048 images went from 35.0 s to 31.4 s. The upload is
    synchronous, so the buffer is free again when a call returns. On NumPy it only
    converts the dtype (no copy when there is nothing to convert).
    """

    def __init__(self, xp):
        self.xp = xp
        self._buffer = None

    def __call__(self, a: np.ndarray, dtype) -> object:
        dtype = np.dtype(dtype)
        if not is_cupy(self.xp):
            return np.ascontiguousarray(a, dtype=dtype)
        nbytes = a.size * dtype.itemsize
        if self._buffer is None or self._buffer.size() < nbytes:
            self._buffer = None                      # free the old one first
            self._buffer = self.xp.cuda.alloc_pinned_memory(max(nbytes, 1))
        stage = np.frombuffer(self._buffer, dtype, a.size).reshape(a.shape)
        np.copyto(stage, a, casting="same_kind")
        out = self.xp.empty(a.shape, dtype=dtype)
        out.set(stage)                               # synchronous without a stream
        return out


def to_numpy(a) -> np.ndarray:
    """Bring an array from either module back to the host as a NumPy array."""
    if isinstance(a, np.ndarray):
        return a
    get = getattr(a, "get", None)
    return get() if get is not None else np.asarray(a)


def device_name(xp) -> str:
    """A short name of the device behind ``xp`` for the report."""
    if not is_cupy(xp):
        return "cpu"
    props = xp.cuda.runtime.getDeviceProperties(xp.cuda.Device().id)
    name = props["name"]
    return "cuda:" + (name.decode() if isinstance(name, bytes) else str(name))


def available_bytes() -> int | None:
    """The memory the kernel says can be used without swapping (MemAvailable), or None off Linux."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB (Linux reports KB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
