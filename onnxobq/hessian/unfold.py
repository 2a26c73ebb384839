"""im2col: a layer's input as the rows X of its layer-wise problem (numpy and backend only).

A Conv's input is unfolded into patch columns (one per output position, in the weight's
flatten order); a Gemm's or MatMul's is its flattened leading dimensions.
"""
from __future__ import annotations

import itertools
import math

from ..errors import UserError
from ..types import ConvGeometry, Layer


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
