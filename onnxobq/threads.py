"""Threads for the NumPy stages whose BLAS calls are too small to split well over the cores.

OpenBLAS splits one product or factorisation over every core, but the capture's products and
the solver's per-layer work are small: on the 2-core machine two BLAS threads ran them only
1.15 to 1.25 times faster than one, while two independent calls on two threads ran each at
the one-thread speed. So those stages hand whole layers to one thread per core and hold BLAS
to one thread meanwhile (LayerWorkers, used by capture.capture_hessians and
solve.solve_all). How many threads: Device.workers (one on CuPy).
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from .errors import in_context


@contextlib.contextmanager
def one_blas_thread(workers: int):
    """BLAS on one thread while ``workers`` > 1 threads call it, its thread count given back after."""
    if workers <= 1:
        yield
        return
    from threadpoolctl import threadpool_limits
    with threadpool_limits(1, user_api="blas"):
        yield


class LayerWorkers:
    """Layers handed to ``workers`` threads, the costliest first, BLAS on one thread meanwhile.

    The cost of a task is its time the last time a task of the same key ran (a layer's products
    on the previous batch), else the size it is given. Each thread keeps what ``tools`` makes
    for it (the capture's reusable product buffers). With one worker the tasks run in the
    caller's thread, in the order given, BLAS on every core. The threads are started and BLAS
    limited by ``with``.
    """

    def __init__(self, workers: int, tools: Callable[[], object] = lambda: None):
        self.workers, self._make_tools = workers, tools
        self._local = threading.local()
        self._seconds: dict = {}
        self._pool = None
        self._held = contextlib.ExitStack()

    def __enter__(self) -> "LayerWorkers":
        if self.workers > 1:
            self._held.enter_context(one_blas_thread(self.workers))
            self._pool = self._held.enter_context(
                ThreadPoolExecutor(self.workers, thread_name_prefix="onnxobq-layers"))
        return self

    def __exit__(self, *exc) -> None:
        self._held.close()                  # the threads end, then BLAS gets its threads back
        self._pool = None

    def _tools(self):
        """This thread's tools."""
        if not hasattr(self._local, "tools"):
            self._local.tools = self._make_tools()
        return self._local.tools

    def order(self, tasks: list) -> list:
        """(key, task, size) tasks, the longest last time first; sizes order the tasks not timed
        yet, after those."""
        return sorted(tasks, key=lambda t: (t[0] not in self._seconds, -self._seconds.get(t[0], 0.0), -t[2]))

    def run(self, tasks: list, fn: Callable) -> None:
        """``fn(key, task, tools)`` for each (key, task, size), the costliest first, each on one
        worker; returns when all are done. Once a task fails, the tasks not yet started are left
        undone, and its error is raised when the other workers have finished theirs."""
        if self._pool is None:
            tools = self._tools()
            for key, task, _ in tasks:
                fn(key, task, tools)
            return
        todo = queue.SimpleQueue()
        for item in self.order(tasks):
            todo.put(item)
        failed = threading.Event()

        def work():
            tools = self._tools()
            while not failed.is_set():
                try:
                    key, task, _ = todo.get_nowait()
                except queue.Empty:
                    return
                start = time.perf_counter()
                try:
                    fn(key, task, tools)
                except BaseException:
                    failed.set()                # the other workers stop at their next task
                    raise
                self._seconds[key] = time.perf_counter() - start

        futures = [self._pool.submit(in_context(work)) for _ in range(self.workers)]
        concurrent.futures.wait(futures)        # every worker has stopped before an error is raised
        for done in futures:
            done.result()
