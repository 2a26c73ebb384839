"""Shifted products: X^T X of a stride-1 2-D conv from products of its whole input.

Each block of X^T X pairs two kernel offsets a and b; summed over every position instead of
the output's, it is the same for all pairs with the same difference d = b - a, so one
(C, M) x (M, C) product per distinct d serves them (13 for a 3 x 3 kernel where im2col's
product has 81 blocks). What the wider sum adds is the patches of a thin ring around the
output positions, subtracted by the accumulation (see accumulate.HessianSum).
"""
from __future__ import annotations

import functools
import itertools
import math

import numpy as np

from ..backend import Device, Tuning
from ..types import ConvGeometry, Layer
from .unfold import conv_outputs, conv_pads, unfold


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


def shifted_products(x, geom: ConvGeometry, stack=None, left_channels: int = Tuning.stack_left_channels):
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
        left_channels: the stack is multiplied on the left, (S C x M)(M x C), up to this many
            channels, and on the right, (C x M)(M x S C), above (Tuning.stack_left_channels).

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
    if C <= left_channels:                          # F as a transposed view of G[s, j, i] = F_d[i, j]
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


def ring_columns(rows: int, ring_elements: int) -> int:
    """How many patch columns a ring strip of ``rows`` rows holds back before multiplying:
    twice its rows' count, within ``ring_elements`` floats (Tuning.ring_elements)."""
    return min(2 * rows, ring_elements // rows)


def shifts_pay(layer: Layer, a, device: Device, gather: int = 0) -> bool:
    """Whether ``accumulate`` adds this input of the layer through shifted_products (on NumPy, a
    stride-1 2-D conv of one group whose shift_cost is at most Tuning.shift_cost), where
    im2col's columns would be held back in gathers of ``gather``."""
    g = layer.conv
    if (device.gpu or g is None or layer.groups != 1 or len(g.kernel) != 2 or a.ndim != 4
            or any(s != 1 for s in g.strides) or math.prod(g.kernel) == 1):
        return False
    return shift_cost(g, a.shape, device.tuning, gather) <= device.tuning.shift_cost


def shift_cost(geom: ConvGeometry, shape, tuning: Tuning, gather: int = 0) -> float:
    """The cost of shifted_products and its adds for an input of ``shape`` (N, C, H, W), as a
    fraction of im2col's. Costs count multiply-adds (im2col's symmetric product needs half of
    its blocks) plus ``tuning.add_cost`` per element of each float64 add of a product to a sum,
    shared by the batches of a gather (im2col's, see gather_columns, and each ring strip's),
    plus ``tuning.call_cost``."""
    N, C, spatial = shape[0], shape[1], shape[2:]
    K, S = math.prod(geom.kernel), len(kernel_shifts(geom.kernel))
    m = N * math.prod(conv_outputs(geom, spatial))
    shared = m / gather if 2 * m <= gather else 1.0             # im2col's share of an add
    shifted = S * C * C * (N * math.prod(spatial) + tuning.add_cost) + tuning.call_cost
    for (r0, r1, c0, c1), (h0, h1, w0, w1) in ring_boxes(geom, spatial):
        rows, strip = (h1 - h0) * (w1 - w0) * C, N * (r1 - r0) * (c1 - c0)
        held = ring_columns(rows, tuning.ring_elements)
        shifted += rows ** 2 * (strip / 2 + tuning.add_cost * (strip / held if 2 * strip <= held else 1.0))
    return shifted / ((K * C) ** 2 * (m / 2 + tuning.add_cost * shared))
