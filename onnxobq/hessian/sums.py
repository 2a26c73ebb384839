"""Running Hessian sums: each batch's X^T X added to a (sum, count) pair, H = 2 sum / count.

``accumulate`` takes one batch of a layer's input, uploads it, unfolds it (or takes its shifted
products) a few samples at a time, and adds it to the layer's HessianSum. Sums add up over
batches in any grouping: the map over batches reduces by adding.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..backend import Device, Tuning, Uploader, is_cupy
from ..types import Layer
from .shifted import kernel_shifts, ring_columns, shift_pairs, shifted_products, shifts_pay
from .unfold import conv_outputs, layer_columns


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
    are contiguous), once, by hessian, which also puts it back in the weight's order. Each ring
    strip holds back up to ring_columns(rows, ``ring_elements``) columns.
    """

    sum: object = None
    count: int = 0
    dtype: str = "float64"
    gather: int = 0
    ring_elements: int = Tuning.ring_elements
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
            held = self._ring.setdefault(box, Held(ring_columns(P.shape[0], self.ring_elements)))
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


def gather_columns(layer: Layer, device: Device) -> int:
    """How many sample columns a layer's HessianSum holds back before multiplying (0: none, as on
    a GPU): twice its features, within Tuning.gather_elements floats."""
    if device.gpu:
        return 0
    return min(2 * layer.cols, device.tuning.gather_elements // (layer.groups * layer.cols))


def accumulate(layer: Layer, a: np.ndarray, acc: HessianSum, device: Device, upload: Uploader,
               product: Products, elements: int | None = None) -> None:
    """Upload one batch of a layer's input, unfold it and add it to ``acc``, a few samples at a time
    (and on NumPy, for a grouped conv, a few groups at a time: see groups_at_once; for a stride-1
    2-D conv, through shifted products where they pay: see shifts_pay), at most about
    ``elements`` unfolded elements at a time (default Tuning.unfold_elements)."""
    xp, tuning = device.xp, device.tuning
    elements = tuning.unfold_elements if elements is None else elements
    a = upload(a, np.float32)
    per = groups_at_once(layer, a, device)
    shifted = shifts_pay(layer, a, device, acc.gather)
    copies = 1 if layer.conv is None else len(kernel_shifts(layer.conv.kernel)) if shifted else math.prod(layer.conv.kernel)
    per_sample = max(1, a[:1].size * per // layer.groups * copies)
    step = max(1, elements // per_sample) if layer.op != "Gemm" else a.shape[0]
    for start in range(0, a.shape[0], step):
        chunk = a[start:start + step]
        if shifted:
            add_shifted(layer, chunk, acc, product, tuning.stack_left_channels)
        elif per >= layer.groups:
            acc.add(layer_columns(layer, chunk, xp), xp, product)
        else:
            width = chunk.shape[1] // layer.groups            # input channels per group
            for g0 in range(0, layer.groups, per):
                g1 = min(g0 + per, layer.groups)
                part = layer_columns(layer, chunk[:, g0 * width:g1 * width], xp, g1 - g0)
                acc.add(part, xp, product, (g0, layer.groups))


def add_shifted(layer: Layer, x: np.ndarray, acc: HessianSum, product: Products,
                left_channels: int = Tuning.stack_left_channels) -> None:
    """Add one batch ``x`` of a stride-1 2-D conv to ``acc`` through its shifted products."""
    g = layer.conv
    N, C = x.shape[:2]
    stack = product.stack((len(kernel_shifts(g.kernel)), C, N) + x.shape[2:])
    F, ring = shifted_products(x, g, stack, left_channels)
    acc.add_shifted(F, ring, g.kernel, N * math.prod(conv_outputs(g, x.shape[2:])), product)


def groups_at_once(layer: Layer, a, device: Device) -> int:
    """How many groups of a layer ``accumulate`` unfolds together for the input ``a``: all of
    them, except for a grouped conv on NumPy, whose groups go a cache-sized few at a time
    (Tuning.group_chunk_elements)."""
    if device.gpu or layer.op != "Conv" or layer.groups == 1:
        return layer.groups
    per_group = layer.cols * a.shape[0] * math.prod(a.shape[2:])   # patches, about (before strides)
    return max(1, device.tuning.group_chunk_elements // max(per_group, 1))


def merge_sums(parts: list[tuple]) -> tuple:
    """One Hessian from the (H, N) of several sums: sum_i N_i H_i / sum_i N_i, and its rows."""
    if len(parts) == 1:
        return parts[0]
    rows = sum(n for _, n in parts)
    H = sum(h * (n / max(rows, 1)) for h, n in parts)
    return H, rows
