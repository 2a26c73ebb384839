"""Threads for the NumPy stages whose BLAS calls are too small to split well over the cores.

OpenBLAS splits one product or factorisation over every core, but the capture's products and
the solver's per-layer work are small: on the 2-core machine two BLAS threads ran them only
1.15 to 1.25 times faster than one, while two independent calls on two threads ran each at
the one-thread speed. So those stages hand whole layers to one thread per core and hold BLAS
to one thread meanwhile (capture.ProductWorkers, pipeline.solve_all). On CuPy they keep one.
"""
from __future__ import annotations

import contextlib
import os

from .backend import is_cupy


def usable_cores() -> int:
    """The CPUs this process may run on (its affinity mask, which a container may narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# At most this many threads take layers at once. Each holds its own buffers (the capture's
# product and shifted-copy buffers, up to about 170 MB a thread on ResNet-50 in batches of 8;
# a solve's copies of its Hessian, up to about 700 MB for a layer of 4,608 columns), and the
# costliest layers start together; measured on 2 cores only.
MAX_CPU_WORKERS = 4


def cpu_workers(xp) -> int:
    """How many threads take layers at a time: one per core on NumPy (up to MAX_CPU_WORKERS),
    one on CuPy."""
    return 1 if is_cupy(xp) else max(1, min(usable_cores(), MAX_CPU_WORKERS))


@contextlib.contextmanager
def one_blas_thread(workers: int):
    """BLAS on one thread while ``workers`` > 1 threads call it, its thread count given back after."""
    if workers <= 1:
        yield
        return
    from threadpoolctl import threadpool_limits
    with threadpool_limits(1, user_api="blas"):
        yield
