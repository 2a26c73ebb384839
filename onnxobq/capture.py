"""Capture: run onnxruntime on the calibration data and accumulate each layer's Hessian.

One session exposes every layer input as an extra output. For each batch the
inputs are unfolded into the rows X of the layer-wise problem (im2col for Conv,
the flattened leading dimensions for Gemm and MatMul) and their products are added to a running
(sum, count) pair, so memory is bounded by one batch whatever the data size.
Layers that read the same tensor with the same geometry share one Hessian.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import math
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import numpy as np
import onnx
import onnxruntime as ort

from .backend import Uploader, is_cupy
from .calibration import CalibConfig, InputSpec, Replay, batch_size_for, batches, feed_samples
from .errors import UserError
from .graph.io import serialized
from .graph.layers import ConvGeometry, Layer
from .quant.activations import AbsHistogram
from .threads import LayerWorkers, cpu_workers, usable_cores

# Unfold at most this many elements at once (about 128 MB of float32), shared by the threads that
# unfold at the same time (see capture_hessians).
UNFOLD_ELEMENTS = 1 << 25


def model_inputs(model: onnx.ModelProto) -> list[InputSpec]:
    """The model's real inputs (initializers listed as inputs by old exporters are left out)."""
    inits = {t.name for t in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                     for d in tt.shape.dim)
        specs.append(InputSpec(vi.name, dims, np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))))
    return specs


def providers(device: str) -> list[str]:
    """onnxruntime providers: CUDA when onnxruntime-gpu is installed and the GPU is wanted."""
    if device != "cpu" and "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def session_options(spin: bool = True) -> ort.SessionOptions:
    """onnxruntime options that run a QDQ model as its ONNX graph says.

    By default onnxruntime fuses DequantizeLinear + MatMul into MatMulNBits with
    accuracy level 4, which also quantizes the activations to int8 at run time. Level 1
    keeps them in float32, so what is measured is the effect of the weights alone.

    Args:
        spin: let onnxruntime's idle threads spin for the next operator. Turn it off
            where NumPy's BLAS shares the cores between forward passes.
    """
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


def session(model: onnx.ModelProto, extra: dict[str, int], device: str = "cpu",
            spin: bool = True, threads: int | None = None) -> ort.InferenceSession:
    """An onnxruntime session of ``model`` that also returns the tensors in ``extra``.

    Args:
        model: the model; its outputs are restored before returning.
        extra: tensor name -> ONNX element type, for tensors to expose as outputs.
        device: "cpu", "cuda" or "auto".
        spin: see session_options.
        threads: onnxruntime's intra-op threads (None: its default, one per core).
    """
    have = {o.name for o in model.graph.output}
    added = [onnx.helper.make_tensor_value_info(n, t, None) for n, t in extra.items() if n not in have]
    model.graph.output.extend(added)
    opts = session_options(spin)
    if threads is not None:
        opts.intra_op_num_threads = threads
    try:
        with serialized(model) as source:
            return ort.InferenceSession(source, opts, providers=providers(device))
    except Exception as exc:
        raise UserError(f"onnxruntime cannot run the model ({_one_line(exc)}); "
                        "check that it runs with onnxruntime before quantizing") from None
    finally:
        del model.graph.output[len(model.graph.output) - len(added):]


# Two sessions hold two copies of the weights, and a model with large ones keeps onnxruntime's
# threads busy on one sample anyway: 64 batch-1 samples through 24 MatMuls of 2048 x 2048
# (400 MB) took 35.0 and 39.3 s on two sessions against 26.4 and 29.2 s on one, with 3.3 GB
# of peak RSS against 1.9 GB (onnxobq compare, 2 cores). The detector's model is 20 MB.
SIDE_MODEL_BYTES = 64 << 20


def session_workers(device: str, batch: int, model_bytes: int = 0) -> tuple[int, int | None]:
    """How many sessions of a model run its batches side by side (see side_by_side), and
    onnxruntime's threads for each (None: its default).

    Two, on half the cores each, where the CPU provider runs one sample at a time: its threads
    find little to share in one sample. On the 2-core machine, 48 images through the YOLOX
    detector (fixed batch 1) took 1.86 to 2.04 s on two 1-thread sessions against 2.39 to
    2.91 s on one session, alternating, and its BN stage (128 images) 28.7 and 29.0 s
    against 34.5 and 36.2 s. ResNet-50 in batches of 8 took the same either way, so larger
    batches keep one session, and so do models of more than SIDE_MODEL_BYTES. Used by the BN
    passes and by compare, not by the capture (see capture_hessians).
    """
    cores = usable_cores()
    if (batch == 1 and cores >= 2 and model_bytes <= SIDE_MODEL_BYTES
            and providers(device)[0] == "CPUExecutionProvider"):
        return 2, cores // 2
    return 1, None


def side_sessions(model: onnx.ModelProto, extra: dict[str, int], device: str, calib: CalibConfig | Replay,
                  inputs: list[InputSpec], spin: bool = True) -> list:
    """The sessions of ``model`` that session_workers asks for, for the batches of ``calib``."""
    workers, threads = session_workers(device, batch_size_for(calib, inputs), model.ByteSize())
    return [session(model, extra, device, spin=spin, threads=threads) for _ in range(workers)]


def side_by_side(fn: Callable, items: Iterable, states: list) -> Iterator:
    """``fn(state, item)`` for each item, as many items at a time as there are states, each on
    its own thread with its own state (its sessions); the results in the items' order.

    onnxruntime releases the GIL while it runs, and so do NumPy's reductions, so the items
    of a group run side by side. Each group finishes before the next starts, so the items
    are read in the caller's thread between groups and at most len(states) results are held.
    With one state the items run inline.
    """
    if len(states) == 1:
        for item in items:
            yield fn(states[0], item)
        return
    items = iter(items)
    with ThreadPoolExecutor(len(states), thread_name_prefix="onnxobq-run") as pool:
        while group := list(itertools.islice(items, len(states))):
            yield from list(pool.map(fn, states[:len(group)], group))


def run(sess: ort.InferenceSession, names: list[str], feed: dict) -> dict[str, np.ndarray]:
    """Run a session, turning a bad feed into a UserError that names the input."""
    try:
        return dict(zip(names, sess.run(names, feed)))
    except Exception as exc:
        why = _feed_mismatch(sess, feed) or _one_line(exc)
        raise UserError(f"onnxruntime rejected the calibration batch ({why}); "
                        "check the calibration data's shapes and dtypes against the model inputs") from None


def _one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's message on one line, without onnxruntime's boilerplate."""
    text = " ".join(str(exc).replace("Please fix either the inputs/outputs or the model.", "").split())
    text = text.replace("[ONNXRuntimeError] : ", "")
    return (text[:limit] + "...") if len(text) > limit else (text or type(exc).__name__)


def _feed_mismatch(sess, feed: dict) -> str | None:
    """Which fed array does not fit which model input, as onnxruntime sees them (None if all fit)."""
    try:
        for spec in sess.get_inputs():
            a = feed.get(spec.name)
            if a is None:
                return f"no data for input '{spec.name}'"
            want = [d if isinstance(d, int) and d > 0 else None for d in spec.shape]
            if len(want) != a.ndim or any(w is not None and w != g for w, g in zip(want, a.shape)):
                return f"input '{spec.name}' is {_fmt_dims(want)}, the batch has shape {list(a.shape)}"
    except Exception:
        return None
    return None


def _fmt_dims(dims) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


# ----------------------------------------------------------------------------- unfolding

def conv_pads(geom: ConvGeometry, spatial) -> list[int]:
    """Explicit pads (begins then ends) for a conv input of the given spatial size."""
    nsp = len(spatial)
    if geom.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        begins, ends = [], []
        for size, k, s, d in zip(spatial, geom.kernel, geom.strides, geom.dilations):
            out = -(-size // s)
            total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
            small = total // 2
            begins.append(small if geom.auto_pad == "SAME_UPPER" else total - small)
            ends.append(total - begins[-1])
        return begins + ends
    if geom.auto_pad == "VALID":
        return [0] * (2 * nsp)
    return list(geom.pads) if geom.pads else [0] * (2 * nsp)


def conv_outputs(geom: ConvGeometry, spatial) -> list[int]:
    """A conv's output size along each spatial axis."""
    nsp = len(spatial)
    pads = conv_pads(geom, spatial)
    return [(spatial[i] + pads[i] + pads[i + nsp] - geom.dilations[i] * (geom.kernel[i] - 1) - 1)
            // geom.strides[i] + 1 for i in range(nsp)]


def unfold(x, geom: ConvGeometry, xp):
    """im2col of a conv input (N, C, *spatial) into patch columns (C*K, N*L), K = prod(kernel).

    Row c*K + k matches the weight's flatten order (channel, then kernel offsets
    row-major), so W.reshape(O, -1) @ columns is the convolution at all N*L output
    positions. Each kernel offset is one strided copy straight into place, with the
    output positions contiguous.
    """
    N, C = x.shape[:2]
    spatial = x.shape[2:]
    nsp = len(spatial)
    pads = conv_pads(geom, spatial)
    if any(pads):
        x = xp.pad(x, [(0, 0), (0, 0)] + [(pads[i], pads[i + nsp]) for i in range(nsp)])
    out = conv_outputs(geom, spatial)
    K, L = math.prod(geom.kernel), math.prod(out)
    x = xp.swapaxes(x, 0, 1)                                        # (C, N, *spatial), a view
    if K == 1 and all(s == 1 for s in geom.strides):
        return xp.ascontiguousarray(x).reshape(C, N * L)          # pointwise: the input itself
    patches = xp.empty((C, K, N, *out), dtype=x.dtype)
    for k, offs in enumerate(itertools.product(*[range(n) for n in geom.kernel])):
        window = tuple(slice(o * d, o * d + s * (m - 1) + 1, s)
                       for o, d, s, m in zip(offs, geom.dilations, geom.strides, out))
        patches[:, k] = x[(slice(None), slice(None)) + window]
    return patches.reshape(C * K, N * L)


def layer_columns(layer: Layer, a, xp, groups: int | None = None):
    """The layer-wise problem's inputs for one batch: X^T of each group.

    Args:
        layer: the layer; a: its input for the batch.
        groups: for a grouped conv, ``a`` may hold the input channels of only this many
            consecutive groups (default: all of the layer's groups).

    Returns:
        (G, C, M): for each of the G groups, its C inputs (rows) over M samples
        (columns); H accumulates X^T X = P P^T.
    """
    G = layer.groups if groups is None else groups
    if layer.op == "Conv":
        P = unfold(a, layer.conv, xp)
    else:
        X = (a.T if layer.trans_a else a) if layer.op == "Gemm" else a.reshape(-1, a.shape[-1])
        P = X.T
    if P.shape[0] != G * layer.cols:
        raise UserError(f"layer {layer.name}: its input has {P.shape[0]} features where the weight "
                        f"{list(layer.shape)} needs {G * layer.cols}; the model looks inconsistent")
    return P.reshape(G, layer.cols, P.shape[1])


# ----------------------------------------------------------------------------- shifted products

def kernel_shifts(kernel) -> list[tuple[int, int]]:
    """The differences b - a of a 2-D kernel's offsets, one of each pair +-d: the first
    coordinate positive, or zero with the second non-negative. (0, 0) comes first."""
    kh, kw = kernel
    return [(dh, dw) for dh in range(kh) for dw in range(-(kw - 1), kw) if (dh, dw) >= (0, 0)]


@functools.lru_cache(maxsize=None)
def shift_pairs(kernel: tuple[int, int]) -> np.ndarray:
    """(K, K), for kernel offsets a and b (row-major): where F_{b-a} is among the 2S products
    F_d, then F_d^T = F_{-d}, for d in kernel_shifts(kernel). Made once per kernel, read-only."""
    shifts = kernel_shifts(kernel)
    index = {d: s for s, d in enumerate(shifts)} | {(-i, -j): len(shifts) + s for s, (i, j) in enumerate(shifts)}
    offsets = list(itertools.product(*map(range, kernel)))
    pairs = np.array([[index[bh - ah, bw - aw] for bh, bw in offsets] for ah, aw in offsets])
    pairs.setflags(write=False)
    return pairs


def ring_bounds(geom: ConvGeometry, spatial) -> list[tuple[int, int, int, int]]:
    """Along each axis of a stride-1 conv input, (first, lo, hi, end): the patches that
    start at first..end-1 of the input padded by (kernel - 1) * dilation on both sides
    cover every non-zero product at every kernel shift; those at lo..hi-1 are the conv's
    own output positions that touch the input (the others read padding only). The ring
    is the wider box less the inner one."""
    pads, out = conv_pads(geom, spatial), conv_outputs(geom, spatial)
    bounds = []
    for i, size in enumerate(spatial):
        e = geom.dilations[i] * (geom.kernel[i] - 1)
        bounds.append((0, max(0, e - pads[i]), min(size + e, out[i] - pads[i] + e), size + e))
    return bounds


# shifted_products multiplies its stack of shifted copies on the left, (S C x M)(M x C), up to this
# many channels, and on the right, (C x M)(M x S C), above. On 2 cores (OpenBLAS, medians of 15
# calls of accumulate, alternating), the left took 0.84 to 0.95 of the right's time for 12 to 96
# channels (the detector's layers, one image: 70.3 ms summed over its 22 layers against 66.4 ms)
# and for 64 and 128 at 56 x 56 and 28 x 28 in batches of 8, but 1.01 to 1.05 for 192 at 13 x 13
# (one image), 1.07 for 256 at 14 x 14 and 1.68 for 512 at 7 x 7 (batches of 8).
STACK_LEFT_CHANNELS = 128


def shifted_products(x, geom: ConvGeometry, stack=None):
    """X^T X of a stride-1 2-D conv, kernel-offset-major, from products of its whole input.

    Block (a, b) of X^T X (kernel offsets a and b, C x C each) sums x[q] x[q + d]^T,
    d = b - a (times the dilation), over the output positions shifted by a. Summed over
    every position instead, it is the same for all pairs with the same d:
    F_d = sum_q x[q] x[q + d]^T, one (C, M) x (M, C) product per distinct d, 13 for a
    3 x 3 kernel where im2col's product has 81 blocks (40.5 counting its symmetry).
    What the wider sum adds is exactly the patches of the positions in a thin ring around
    the real output positions (see ring_bounds), over the input padded with zeros, so
    their product is subtracted.

    Args:
        x: the conv input (N, C, H, W), float32.
        geom: its geometry; strides must be 1.
        stack: optional float32 array of shape (S, C, N, H, W), S = len(kernel_shifts),
            to hold the shifted copies of x (overwritten).

    Returns:
        (F, ring): F (C, S, C) with F[:, s] = F_d for d = kernel_shifts(kernel)[s]; ring,
        the ring's patches as ring_strips gives them.
    """
    N, C, H, W = x.shape
    dh, dw = geom.dilations
    shifts = kernel_shifts(geom.kernel)
    xs = np.ascontiguousarray(np.swapaxes(x, 0, 1))                # (C, N, H, W)
    B = np.empty((len(shifts), C, N, H, W), np.float32) if stack is None else stack
    for s, (i, j) in enumerate(shifts):
        ph, pw = i * dh, j * dw                  # B[s] at q holds x at q + (ph, pw), else 0
        rows, lo, hi = max(0, H - ph), min(W, max(0, -pw)), max(0, W - max(0, pw))
        B[s, :, :, rows:] = 0
        B[s, :, :, :rows, :lo] = 0
        B[s, :, :, :rows, hi:] = 0
        if hi > lo:
            B[s, :, :, :rows, lo:hi] = xs[:, :, ph:ph + rows, lo + pw:hi + pw]
    if C <= STACK_LEFT_CHANNELS:                          # F as a transposed view of G[s, j, i] = F_d[i, j]
        F = (B.reshape(len(shifts) * C, -1) @ xs.reshape(C, -1).T).reshape(len(shifts), C, C).transpose(2, 0, 1)
    else:
        F = (xs.reshape(C, -1) @ B.reshape(len(shifts) * C, -1).T).reshape(C, len(shifts), C)

    return F, ring_strips(x, geom)


def ring_boxes(geom: ConvGeometry, spatial) -> list[tuple[tuple[int, int, int, int], tuple[int, int, int, int]]]:
    """The ring of shifted_products as up to four strips (above, below, left, right of the
    output positions), each with the box of kernel offsets whose patch elements can touch the
    input there (a patch just above the output reads padding in its upper rows).

    Returns:
        [((r0, r1, c0, c1), (h0, h1, w0, w1))]: the strip's patches start at rows r0..r1-1 and
        columns c0..c1-1 of the input padded by (kernel - 1) * dilation on each side, and are
        restricted to the kernel offsets h0..h1-1 by w0..w1-1.
    """
    H, W = spatial
    (kh, kw), (dh, dw) = geom.kernel, geom.dilations
    eh, ew = dh * (kh - 1), dw * (kw - 1)
    (th, ih, jh, bh), (tw, iw, jw, bw) = ring_bounds(geom, spatial)
    # offsets that reach the input from the rows before lo, and from those at hi and after
    above, below = (-(-(eh - ih + 1) // dh), kh), (0, min(kh, (eh + H - 1 - jh) // dh + 1))
    left, right = (-(-(ew - iw + 1) // dw), kw), (0, min(kw, (ew + W - 1 - jw) // dw + 1))
    boxes = []
    for (r0, r1, c0, c1), (h0, h1), (w0, w1) in (((th, ih, tw, bw), above, (0, kw)), ((jh, bh, tw, bw), below, (0, kw)),
                                                  ((ih, jh, tw, iw), (0, kh), left), ((ih, jh, jw, bw), (0, kh), right)):
        if r1 > r0 and c1 > c0 and h1 > h0 and w1 > w0:
            boxes.append(((r0, r1, c0, c1), (h0, h1, w0, w1)))
    return boxes


def ring_strips(x, geom: ConvGeometry) -> list[tuple[tuple[int, int, int, int], np.ndarray]]:
    """The patches of ring_boxes(geom, ...) for the input x (N, C, H, W).

    Returns:
        [((h0, h1, w0, w1), P)]: P (A * C, R) holds the strip's R patches restricted to the
        offsets h0..h1-1 by w0..w1-1, rows offset-major (A = (h1 - h0) * (w1 - w0)).
    """
    N, C, H, W = x.shape
    (kh, kw), (dh, dw) = geom.kernel, geom.dilations
    eh, ew = dh * (kh - 1), dw * (kw - 1)
    wide = np.pad(x, [(0, 0), (0, 0), (eh, eh), (ew, ew)])
    strips = []
    for (r0, r1, c0, c1), (h0, h1, w0, w1) in ring_boxes(geom, (H, W)):
        sub = ConvGeometry((h1 - h0, w1 - w0), (1, 1), (0, 0, 0, 0), geom.dilations)
        window = wide[:, :, r0 + h0 * dh:r1 + (h1 - 1) * dh, c0 + w0 * dw:c1 + (w1 - 1) * dw]
        A = (h1 - h0) * (w1 - w0)
        P = np.ascontiguousarray(unfold(window, sub, np).reshape(C, A, -1).swapaxes(0, 1)).reshape(A * C, -1)
        strips.append(((h0, h1, w0, w1), P))
    return strips


class Products:
    """Each batch's float32 product P P^T, written into one reused buffer (and, for
    shifted_products, its stack of shifted inputs into another).

    A fresh product array per layer and batch costs page faults on NumPy (over 100 MB
    per image of the YOLOX detector); CuPy's memory pool reuses its blocks anyway.
    The product is consumed (added to a sum) before the next one is made.
    """

    def __init__(self, xp):
        self.xp = xp
        self._buffer = None
        self._stack = None

    def __call__(self, P):
        G, C = P.shape[:2]
        if is_cupy(self.xp):
            return P @ self.xp.swapaxes(P, 1, 2)
        if self._buffer is None or self._buffer.size < G * C * C:
            self._buffer = None
            self._buffer = np.empty(G * C * C, np.float32)
        out = self._buffer[:G * C * C].reshape(G, C, C)
        return np.matmul(P, np.swapaxes(P, 1, 2), out=out)

    def stack(self, shape) -> np.ndarray:
        """A reused float32 NumPy array of ``shape``, its contents undefined."""
        n = math.prod(shape)
        if self._stack is None or self._stack.size < n:
            self._stack = None
            self._stack = np.empty(n, np.float32)
        return self._stack[:n].reshape(shape)


@dataclass
class Held:
    """Sample columns held back so that they are multiplied together: P (..., m) of a fixed
    leading shape, up to ``capacity`` columns, in one buffer made at the first hold."""

    capacity: int
    buffer: object = field(default=None, repr=False)
    count: int = 0

    def hold(self, P, xp, multiply: Callable) -> None:
        """Hold P's columns, first handing what is held to ``multiply`` where they would not fit
        beside it. A P of more than half the capacity would share no gather: it goes to
        ``multiply`` at once, uncopied."""
        m = P.shape[-1]
        if 2 * m > self.capacity:
            multiply(P)
            return
        if self.count + m > self.capacity:
            multiply(self.take())
        if self.buffer is None:
            self.buffer = xp.empty(P.shape[:-1] + (self.capacity,), np.float32)
        self.buffer[..., self.count:self.count + m] = P
        self.count += m

    def take(self):
        """The columns held so far (a view of the buffer, valid until the next put); empties it."""
        out, self.count = self.buffer[..., :self.count], 0
        return out


# Each strip of a shifted-products ring holds back at most twice its rows' count of columns,
# within this many floats (4 MB).
RING_ELEMENTS = 1 << 20


def ring_columns(rows: int) -> int:
    """How many patch columns a ring strip of ``rows`` rows holds back before multiplying."""
    return min(2 * rows, RING_ELEMENTS // rows)


@dataclass
class HessianSum:
    """A running sum of X^T X and its sample count; H = 2 * sum / count at the end.

    NumPy computes ``P @ P.T`` with a symmetric rank-k update (half a general product),
    so the product is left to it; each batch's float32 product is added in place.
    Where a batch brings few samples for its features (a batch-1 model's deep layers),
    up to ``gather`` sample columns wait in a buffer and are multiplied together: see
    gather_columns.

    Batches given by add_shifted are summed as their shifted products F_d (13 C x C blocks
    for 3 x 3, where the sum has 81) and their rings' patches, held back by strip; both go into
    the sum, held kernel-offset-major (row k * C + c instead of c * K + k, where its blocks
    are contiguous), once, by hessian, which also puts it back in the weight's order.
    """

    sum: object = None
    count: int = 0
    dtype: str = "float64"
    gather: int = 0
    _waiting: Held | None = field(default=None, repr=False)
    _kernel_major: int = field(default=0, repr=False)        # K, where the sum is kernel-major
    _kernel: tuple = field(default=(), repr=False)           # the kernel of add_shifted's batches
    _shifts: object = field(default=None, repr=False)        # sum of the F_d, (C, S, C)
    _ring: dict = field(default_factory=dict, repr=False)    # offset box -> Held strip patches

    def add(self, P, xp, product: Products, groups: tuple[int, int] | None = None) -> None:
        """Add one batch given as P = X^T of each group (G, C, M).

        Args:
            groups: (first, total) where P holds only the groups first, first + 1, ... of
                ``total``; its samples are counted with the part that starts at group 0.
                Such parts are never held back, nor is a batch of more than gather / 2 samples.
        """
        first, total = groups or (0, P.shape[0])
        if first == 0:
            self.count += P.shape[2]
        m = P.shape[2]
        if groups is not None or 2 * m > self.gather:    # would not share a gather with another batch
            self._multiply(P, xp, product, first, total)
            return
        if self._waiting is None:
            self._waiting = Held(self.gather)
        self._waiting.hold(P, xp, lambda Q: self._multiply(Q, xp, product, 0, Q.shape[0]))

    def add_shifted(self, F, ring, kernel, count: int, product: Products) -> None:
        """Add one batch of a stride-1 2-D conv given as shifted_products(...) = (F, ring)
        over ``count`` output positions (NumPy, one group)."""
        C, K = F.shape[0], math.prod(kernel)
        self.count += count
        if self.sum is None:
            self.sum = np.zeros((1, K * C, K * C), self.dtype)
            self._kernel_major = K
        if self._shifts is None:
            self._shifts = np.zeros(F.shape, self.dtype)
            self._kernel = tuple(kernel)
        with np.errstate(invalid="ignore", over="ignore"):
            np.add(self._shifts, F, out=self._shifts)
        for box, P in ring:
            held = self._ring.setdefault(box, Held(ring_columns(P.shape[0])))
            held.hold(P, np, lambda Q, box=box: self._subtract_ring(box, Q, product))

    def _subtract_ring(self, box, P, product: Products) -> None:
        (kh, kw), (h0, h1, w0, w1) = self._kernel, box
        C = self.sum.shape[1] // (kh * kw)
        # splitting the offset axis of the blocks' view is a view in either layout
        blocks = self._blocks(kh * kw, C).reshape(kh, kw, C, kh, kw, C)
        target = blocks[h0:h1, w0:w1, :, h0:h1, w0:w1, :]
        with np.errstate(invalid="ignore", over="ignore"):
            np.subtract(target, product(P[None])[0].reshape(target.shape), out=target)

    def _blocks(self, K: int, C: int):
        """The sum of a one-group conv as (K, C, K, C) blocks by kernel offset, a view."""
        H = self.sum[0]
        if self._kernel_major:
            return H.reshape(K, C, K, C)
        return H.reshape(C, K, C, K).transpose(1, 0, 3, 2)

    def flush(self, xp, product: Products) -> None:
        """Multiply the sample columns held back so far into the sum."""
        if self._waiting is not None and self._waiting.count:
            P = self._waiting.take()
            self._multiply(P, xp, product, 0, P.shape[0])

    def _multiply(self, P, xp, product: Products, first: int, total: int) -> None:
        with np.errstate(invalid="ignore", over="ignore"):  # NaN inputs are reported by the solve stage
            part = product(P)
            if self.sum is None:
                self.sum = xp.zeros((total,) + part.shape[1:], self.dtype)
            if self._kernel_major:                     # a one-group conv: add it block by block
                K = self._kernel_major
                C = part.shape[1] // K
                target = self._blocks(K, C).transpose(1, 0, 3, 2)
                np.add(target, part[0].reshape(C, K, C, K), out=target)
                return
            target = self.sum[first:first + part.shape[0]]
            xp.add(target, part, out=target)           # in place: no float64 copy per batch

    def _expand_shifts(self, product: Products) -> None:
        """Subtract the held ring patches and add the summed F_d into every block they make."""
        for box, held in self._ring.items():
            if held.count:
                self._subtract_ring(box, held.take(), product)
        self._ring = {}
        if self._shifts is None:
            return
        F, self._shifts = self._shifts, None
        C, K = F.shape[0], math.prod(self._kernel)
        both = np.concatenate([F, F.transpose(2, 1, 0)], axis=1)      # F_d, then F_-d = F_d^T
        part = both[:, shift_pairs(self._kernel)].transpose(1, 0, 2, 3)   # (K, C, K, C)
        blocks = self._blocks(K, C)
        with np.errstate(invalid="ignore", over="ignore"):
            np.add(blocks, part, out=blocks)

    def hessian(self, xp, product: Products | None = None):
        """H = 2 X X^T / N, in the sum's dtype. Multiplies what is held back (with ``product``),
        then scales the running sum in place and hands it over in the weight's order."""
        product = product or Products(xp)
        self.flush(xp, product)
        self._waiting = None
        self._expand_shifts(product)
        H, self.sum = self.sum, None
        if self._kernel_major:
            K = self._kernel_major
            C = H.shape[1] // K
            H = np.ascontiguousarray(H.reshape(K, C, K, C).transpose(1, 0, 3, 2)).reshape(1, K * C, K * C)
            self._kernel_major = 0
        H *= 2.0 / max(self.count, 1)
        return H


# On NumPy, a layer whose batches bring fewer than twice as many samples as it has features
# multiplies its samples in gathers of 2 * d_col (at most GATHER_ELEMENTS floats, 64 MB, held
# per layer): its P P^T with few columns runs far below BLAS's speed, and each such product is
# added in float64 to a C x C sum. On the YOLOX detector (batch 1, 2 cores), its four layers
# of 1,728 columns with 169 samples per image took 7.6 to 8.5 ms per image instead of 14.5 to
# 15.1 ms, and the whole accumulation 242 ms per image instead of 285 ms.
GATHER_ELEMENTS = 1 << 24


def gather_columns(layer: Layer, xp) -> int:
    """How many sample columns a layer's HessianSum holds back before multiplying (0: none)."""
    if is_cupy(xp):
        return 0
    return min(2 * layer.cols, GATHER_ELEMENTS // (layer.groups * layer.cols))


def accumulate(layer: Layer, a: np.ndarray, acc: HessianSum, xp, upload: Uploader,
               product: Products, elements: int = UNFOLD_ELEMENTS) -> None:
    """Upload one batch of a layer's input, unfold it and add it to ``acc``, a few samples at a time
    (and on NumPy, for a grouped conv, a few groups at a time: see GROUP_CHUNK_ELEMENTS; for a
    stride-1 2-D conv, through shifted products where they pay: see shifts_pay), at most about
    ``elements`` unfolded elements at a time."""
    a = upload(a, np.float32)
    per = groups_at_once(layer, a, xp)
    shifted = shifts_pay(layer, a, xp, acc.gather)
    copies = 1 if layer.conv is None else len(kernel_shifts(layer.conv.kernel)) if shifted else math.prod(layer.conv.kernel)
    per_sample = max(1, a[:1].size * per // layer.groups * copies)
    step = max(1, elements // per_sample) if layer.op != "Gemm" else a.shape[0]
    for start in range(0, a.shape[0], step):
        chunk = a[start:start + step]
        if shifted:
            _add_shifted(layer, chunk, acc, product)
        elif per >= layer.groups:
            acc.add(layer_columns(layer, chunk, xp), xp, product)
        else:
            width = chunk.shape[1] // layer.groups            # input channels per group
            for g0 in range(0, layer.groups, per):
                g1 = min(g0 + per, layer.groups)
                part = layer_columns(layer, chunk[:, g0 * width:g1 * width], xp, g1 - g0)
                acc.add(part, xp, product, (g0, layer.groups))


def _add_shifted(layer: Layer, x: np.ndarray, acc: HessianSum, product: Products) -> None:
    g = layer.conv
    N, C = x.shape[:2]
    stack = product.stack((len(kernel_shifts(g.kernel)), C, N) + x.shape[2:])
    F, ring = shifted_products(x, g, stack)
    acc.add_shifted(F, ring, g.kernel, N * math.prod(conv_outputs(g, x.shape[2:])), product)


# On NumPy, a stride-1 2-D conv (one group) builds its product from shifted products where their
# cost is at most SHIFT_COST of im2col's. Costs count multiply-adds (im2col's symmetric product
# needs half of its blocks) plus ADD_COST per element of each float64 add of a product to a sum,
# shared by the batches of a gather (im2col's, see gather_columns, and each ring strip's), plus
# CALL_COST. On 2 cores (scripts/shift_bench.py), 3 x 3 convs with cost ratios 0.33 to 0.49
# took 0.39 to 0.60 of im2col's time where that was a millisecond or more (96 channels at
# 52 x 52, one image: 4.6 ms instead of 11.8; 512 at 7 x 7, batches of 8: 31.6 instead of
# 52.7); at 0.74 (96 at 10 x 10) 0.79; at 0.75 to 1.16 (32 at 7 x 7 in batches of 8, 128 and
# 96 at 7 x 7) 0.89 to 1.11, in calls of under half a millisecond.
SHIFT_COST = 0.65
ADD_COST = 60          # a float64 add took 0.8 ns per element, a large GEMM 0.013 ns per multiply-add
CALL_COST = 8e6        # shifted products' fixed cost beyond im2col's: 0.09 ms a call on tiny inputs


def shifts_pay(layer: Layer, a, xp, gather: int = 0) -> bool:
    """Whether ``accumulate`` adds this input of the layer through shifted_products, where
    im2col's columns would be held back in gathers of ``gather``."""
    g = layer.conv
    if (is_cupy(xp) or g is None or layer.groups != 1 or len(g.kernel) != 2 or a.ndim != 4
            or any(s != 1 for s in g.strides) or math.prod(g.kernel) == 1):
        return False
    return shift_cost(g, a.shape, gather) <= SHIFT_COST


def shift_cost(geom: ConvGeometry, shape, gather: int = 0) -> float:
    """The cost of shifted_products and its adds for an input of ``shape`` (N, C, H, W), as a
    fraction of im2col's (see SHIFT_COST)."""
    N, C, spatial = shape[0], shape[1], shape[2:]
    K, S = math.prod(geom.kernel), len(kernel_shifts(geom.kernel))
    m = N * math.prod(conv_outputs(geom, spatial))
    shared = m / gather if 2 * m <= gather else 1.0             # im2col's share of an add
    shifted = S * C * C * (N * math.prod(spatial) + ADD_COST) + CALL_COST
    for (r0, r1, c0, c1), (h0, h1, w0, w1) in ring_boxes(geom, spatial):
        rows, strip = (h1 - h0) * (w1 - w0) * C, N * (r1 - r0) * (c1 - c0)
        held = ring_columns(rows)
        shifted += rows ** 2 * (strip / 2 + ADD_COST * (strip / held if 2 * strip <= held else 1.0))
    return shifted / ((K * C) ** 2 * (m / 2 + ADD_COST * shared))


# On NumPy a grouped conv is unfolded and multiplied about this many patch elements (4 MB)
# at a time, so that each group's patches are still in cache for their product. On the
# PP-OCRv4 recognizer (2 cores), its 14 depthwise convs on 8 text lines took 1.2 s instead
# of 1.7 to 1.8 s, and the capture of its 64 calibration lines 16.1 to 17.0 s instead of
# 19.8 to 21.6 s.
GROUP_CHUNK_ELEMENTS = 1 << 20


def groups_at_once(layer: Layer, a, xp) -> int:
    """How many groups of a layer ``accumulate`` unfolds together for the input ``a``: all of
    them, except for a grouped conv on NumPy, whose groups go a cache-sized few at a time."""
    if is_cupy(xp) or layer.op != "Conv" or layer.groups == 1:
        return layer.groups
    per_group = layer.cols * a.shape[0] * math.prod(a.shape[2:])   # patches, about (before strides)
    return max(1, GROUP_CHUNK_ELEMENTS // max(per_group, 1))


@dataclass
class Captured:
    """Every layer's Hessian, by Layer.hessian_key.

    Attributes:
        hessians: H = 2XX^T/N, (G, C, C) on the array module used, in the dtype of the sums.
        rows: N, the rows of X behind each Hessian (samples times output positions).
        samples: calibration samples read.
        waited: seconds the accumulation spent waiting for onnxruntime's forward passes
            (None where nothing was captured). Near the capture's time: onnxruntime bounds
            it; near zero: the Hessian products do.
        ranges: a histogram of |x| of each layer input over the calibration data, by tensor
            name (where the capture was asked for them), for activation quantization.
    """

    hessians: dict
    rows: dict
    samples: int
    waited: float | None = None
    ranges: dict = field(default_factory=dict)


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

    def produce():
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put((done, None))
        except BaseException as exc:  # handed to the consumer, which raises it
            q.put((done, exc))

    worker = threading.Thread(target=produce, name="onnxobq-capture", daemon=True)
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


def merge_sums(parts: list[tuple]) -> tuple:
    """One Hessian from the (H, N) of several sums: sum_i N_i H_i / sum_i N_i, and its rows."""
    if len(parts) == 1:
        return parts[0]
    rows = sum(n for _, n in parts)
    H = sum(h * (n / max(rows, 1)) for h, n in parts)
    return H, rows


def capture_hessians(model: onnx.ModelProto, layers: list[Layer], calib: CalibConfig | Replay, xp,
                     device: str = "cpu", on_batch: Callable[[int], None] | None = None,
                     pipeline_depth: int | None = None, sum_dtype: str = "float64",
                     ranges: bool = False) -> Captured:
    """Run the calibration data through the model and build every layer's Hessian.

    On NumPy each batch's layers are multiplied on one thread per core, the costliest first (by
    their time on the previous batch), each thread with its own buffers (threads.LayerWorkers).
    On the 2-core machine the detector's capture of 256 random images took 32.1 and 33.4 s this
    way against 41.4 and 43.0 s on two BLAS threads (scripts/speed_bench.py, alternating with
    ecd2f4f). Each sum is added to by one thread per batch, and the batches in order, so the
    Hessians do not depend on the threads' timing.

    Args:
        model: the float model.
        layers: the layers to quantize.
        calib: the calibration source, or a Replay of it.
        xp: numpy or cupy, where the Hessians accumulate.
        device: onnxruntime device choice.
        on_batch: called with the number of samples after each batch (progress bars).
        pipeline_depth: batches run ahead by onnxruntime in a background thread while
            the Hessians of earlier ones accumulate (0: no overlap). By default 1 when they
            accumulate on a GPU, and 0 on NumPy, whose products and onnxruntime would fight for
            the same cores (on the 2-core machine the overlap was slower, and later no faster).
        sum_dtype: dtype of the running sums and of the Hessians: float64, or float32 where
            the solve runs in float32 anyway (a GPU), which halves their memory. Each batch's
            product is float32 either way.
        ranges: also count each layer input's |x| (Captured.ranges), for activation
            quantization.

    Returns:
        Captured: the Hessians (on ``xp``, in ``sum_dtype``) and their row counts by hessian_key.
    """
    inputs = model_inputs(model)
    targets, reads = sum_targets(layers)
    parts = list(reads.values())
    dtypes = layer_input_outputs(model, [use for _, use in parts])
    # One session: on the 2-core machine two side by side (see session_workers) cut the wait for
    # the detector's forward passes (256 images) by 1.6 and 1.9 s, but its products took 4.9
    # and 6.5 s longer.
    sess = session(model, dtypes, device, spin=is_cupy(xp))
    names = list(dtypes)
    hists = {use.input: AbsHistogram() for _, use in parts} if ranges else {}
    sums = {}
    for key, use in parts:
        sums.setdefault(key, HessianSum(dtype=sum_dtype, gather=gather_columns(use, xp)))
    samples = 0

    def forward():
        for feed in batches(calib, inputs):
            acts = run(sess, names, feed) if names else {}
            yield feed, {**acts, **feed}

    waited = 0.0
    if pipeline_depth is None:
        pipeline_depth = 1 if is_cupy(xp) else 0

    threads = cpu_workers(xp)
    elements = UNFOLD_ELEMENTS // threads            # the threads' unfolds together stay within it

    def add(key, task, tools):
        use, a = task
        accumulate(use, a, sums[key], xp, *tools, elements)

    with contextlib.closing(prefetch(forward(), pipeline_depth)) as items, \
            LayerWorkers(threads, lambda: (Uploader(xp), Products(xp))) as workers:
        while True:
            start = time.perf_counter()
            item = next(items, None)
            waited += time.perf_counter() - start
            if item is None:
                break
            feed, acts = item
            workers.run([(key, (use, acts[use.input]), acts[use.input].size * use.cols) for key, use in parts], add)
            for name, hist in hists.items():
                hist.add(acts[name])
            n = feed_samples(feed)
            samples += n
            if on_batch:
                on_batch(n)
    if samples == 0:
        raise UserError(f"--calib {calib.source}: no calibration samples were read; "
                        "give more samples (a model with a fixed batch needs at least that many)")
    # one sum at a time: each hands over a copy of itself in the weight's order
    product = Products(xp)
    done = {key: (s.hessian(xp, product), s.count) for key, s in sums.items()}
    hessians, rows = {}, {}
    for key, keys in targets.items():
        hessians[key], rows[key] = merge_sums([done[k] for k in keys])
    return Captured(hessians, rows, samples, waited, hists)
