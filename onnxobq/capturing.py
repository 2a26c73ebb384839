"""Capture: run the float model on the calibration data and sum each layer's Hessian.

One onnxruntime session exposes every layer input as an extra output. Each batch maps to
the products X^T X of its layers' inputs (hessian.accumulate), which reduce by adding into
one running (sum, count) per distinct read of a tensor, so memory is bounded by one batch
whatever the data size. Layers that read the same tensor with the same geometry share one
Hessian; a weight shared by several nodes gets the Hessian of all its uses.
"""
from __future__ import annotations

import contextlib
import queue
import threading
import time
from typing import Callable, Iterable, Iterator

import numpy as np
import onnx

from .backend import Device, Uploader
from .calibration import CalibConfig, Replay, batches, feed_samples
from .errors import UserError, in_context
from .hessian import HessianSum, Products, accumulate, gather_columns, merge_sums
from .quant.activations import AbsHistogram
from .runtime import model_inputs, run, session
from .threads import LayerWorkers
from .types import Captured, Layer


def prefetch(items: Iterable, depth: int = 1) -> Iterator:
    """Yield ``items`` while a background thread already produces the next ``depth`` of them.

    onnxruntime releases the GIL while it runs, so the forward pass of batch i+1
    overlaps the accumulation of batch i. At most ``depth`` items wait in the queue
    (plus one being made and one being used), so memory stays bounded by a few
    batches. An exception in the producer is raised here, in the consumer. With
    ``depth`` 0 the items are produced inline.
    """
    if depth <= 0:
        yield from items
        return
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def put(entry) -> bool:
        """Queue ``entry`` unless the consumer has stopped (False then)."""
        while not stop.is_set():
            try:
                q.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce():
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((done, None))
        except BaseException as exc:  # handed to the consumer, which raises it
            put((done, exc))

    worker = threading.Thread(target=in_context(produce), name="onnxobq-capture", daemon=True)
    worker.start()
    try:
        while True:
            item, exc = q.get()
            if item is done:
                if exc is not None:
                    raise exc
                return
            yield item
    finally:
        stop.set()
        worker.join()


def layer_input_outputs(model: onnx.ModelProto, layers: list[Layer]) -> dict[str, int]:
    """The layer inputs a capture session exposes as extra outputs: tensor name -> ONNX
    element type (model inputs are fed, not captured)."""
    feeds = {s.name for s in model_inputs(model)}
    return {l.input: onnx.helper.np_dtype_to_tensor_dtype(np.dtype(l.dtype))
            for l in layers if l.input not in feeds}


def sum_targets(layers: list[Layer]) -> tuple[dict, dict]:
    """Which running sums a capture keeps, and which layer inputs go into which.

    Each distinct read of an input (a use's hessian_key: the tensor and how it is unfolded)
    is multiplied once per batch. A shared weight's Hessian is that of all its uses,
    sum_u N_u H_u / sum_u N_u: a use only it reads accumulates into its own sum, and a use
    that other layers read the same way (a RetinaNet head's first conv beside the box head's,
    on the same level) into a sum of that read, merged into each of theirs at the end.

    Returns:
        (targets, reads): hessian_key of each layer -> the keys of the sums that make its
        Hessian; and each read's key -> (the key of the sum it goes into, the use that reads it).
    """
    readers: dict = {}
    for layer in layers:
        for use in layer.each_use():
            readers.setdefault(use.hessian_key, {})[layer.hessian_key] = None
    targets, reads = {}, {}
    for layer in layers:
        keys = {}
        for use in layer.each_use():
            only = len(readers[use.hessian_key]) == 1
            key = layer.hessian_key if only else use.hessian_key
            keys[key] = None
            reads.setdefault(use.hessian_key, (key, use))
        targets.setdefault(layer.hessian_key, list(keys))
    return targets, reads


def capture_hessians(model: onnx.ModelProto, layers: list[Layer], calib: CalibConfig | Replay, device: Device,
                     on_batch: Callable[[int], None] | None = None, ranges: bool = False,
                     sums: bool = True) -> Captured:
    """Run the calibration data through the model and build every layer's Hessian.

    On NumPy each batch's layers are multiplied on one thread per core, the costliest first (by
    their time on the previous batch), each thread with its own buffers (threads.LayerWorkers).
    On the 2-core machine the detector's capture of 256 random images took 32.1 and 33.4 s this
    way against 41.4 and 43.0 s on two BLAS threads (scripts/speed_bench.py). Each sum is added
    to by one thread per batch, and the batches in order, so the Hessians do not depend on the
    threads' timing. On a GPU onnxruntime runs Device.pipeline_depth batches ahead (prefetch).

    Args:
        model: the float model.
        layers: the layers to quantize.
        calib: the calibration source, or a Replay of it.
        device: where the Hessians accumulate, in Device.solve_dtype (float32 on a GPU halves
            their memory; each batch's product is float32 either way).
        on_batch: called with the number of samples after each batch (progress bars).
        ranges: also count each layer input's |x| (Captured.ranges), for activation
            quantization.
        sums: build the Hessians (off where a run needs only the ranges: RTN with act_bits).

    Returns:
        Captured: the Hessians (on ``device.xp``) and their row counts by hessian_key.
    """
    targets, reads = sum_targets(layers)
    parts = list(reads.values())
    running = {}
    for key, use in parts if sums else ():
        running.setdefault(key, HessianSum(dtype=device.solve_dtype, gather=gather_columns(use, device),
                                           ring_elements=device.tuning.ring_elements))
    hists = {use.input: AbsHistogram() for _, use in parts} if ranges else {}
    elements = device.tuning.unfold_elements // device.workers    # the threads' unfolds together stay within it

    def add(key, task, tools):
        for use, a in task:      # a sum's reads one after another, on one thread
            accumulate(use, a, running[key], device, *tools, elements)

    samples, waited = 0, 0.0
    with contextlib.closing(prefetch(forward(model, parts, calib, device), device.pipeline_depth)) as items, \
            LayerWorkers(device.workers, lambda: (Uploader(device.xp), Products(device.xp))) as workers:
        while True:
            start = time.perf_counter()
            item = next(items, None)
            waited += time.perf_counter() - start
            if item is None:
                break
            feed, acts = item
            workers.run(_tasks(parts, running, acts), add)
            for name, hist in hists.items():
                hist.add(acts[name])
            samples += feed_samples(feed)
            if on_batch:
                on_batch(feed_samples(feed))
    if samples == 0:
        raise UserError(f"{calib.label}: no calibration samples were read; "
                        "give more samples (a model with a fixed batch needs at least that many)")
    hessians, rows = reduce_sums(running, targets, device) if sums else ({}, {})
    return Captured(hessians, rows, samples, waited, hists)


def _tasks(parts: list, running: dict, acts: dict) -> list:
    """One task per running sum, with all the reads that add into it: two threads never add to
    one sum at once (the uses of a shared weight raced when each read was a task of its own)."""
    grouped: dict = {}
    for key, use in parts:
        if key in running:
            grouped.setdefault(key, []).append((use, acts[use.input]))
    return [(key, reads, sum(a.size * use.cols for use, a in reads)) for key, reads in grouped.items()]


def forward(model: onnx.ModelProto, parts: list, calib: CalibConfig | Replay, device: Device) -> Iterator:
    """(feed, activations) for each batch: the layer inputs that ``parts`` read, by tensor name.

    One session: on the 2-core machine two side by side (see runtime.session_workers) cut the
    wait for the detector's forward passes (256 images) by 1.6 and 1.9 s, but its products took
    4.9 and 6.5 s longer."""
    inputs = model_inputs(model)
    dtypes = layer_input_outputs(model, [use for _, use in parts])
    sess = session(model, dtypes, device.runtime, spin=device.spin)
    names = list(dtypes)
    for feed in batches(calib, inputs):
        acts = run(sess, names, feed) if names else {}
        yield feed, {**acts, **feed}


def reduce_sums(sums: dict, targets: dict, device: Device) -> tuple[dict, dict]:
    """Every layer's Hessian and row count from the running sums of its reads, one sum at a time
    (each hands over a copy of itself in the weight's order)."""
    product = Products(device.xp)
    done = {key: (s.hessian(device.xp, product), s.count) for key, s in sums.items()}
    hessians, rows = {}, {}
    for key, keys in targets.items():
        hessians[key], rows[key] = merge_sums([done[k] for k in keys])
    return hessians, rows
