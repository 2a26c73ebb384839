"""Brute-force references for the Hessian tests: a conv layer, and X^T X summed patch by patch."""
import itertools

import numpy as np

from onnxobq.hessian import Products, conv_pads
from onnxobq.types import ConvGeometry, Layer


def conv_layer(wshape, groups=1, strides=None, pads=None, dilations=None, auto_pad="NOTSET"):
    nsp = len(wshape) - 2
    geom = ConvGeometry(tuple(wshape[2:]), tuple(strides or [1] * nsp), tuple(pads or [0] * 2 * nsp),
                        tuple(dilations or [1] * nsp), auto_pad)
    return Layer(name="c", op="Conv", weight="w", source="initializer", input="x", output="y",
                 shape=tuple(wshape), dtype="float32", groups=groups, rows=wshape[0] // groups,
                 cols=int(np.prod(wshape[1:])), conv=geom)


class Counting(Products):
    """Products that records the column count of each product it makes."""

    def __init__(self, xp):
        super().__init__(xp)
        self.calls = []

    def __call__(self, P):
        self.calls.append(P.shape[2])
        return super().__call__(P)


def brute_force_conv_hessian(x, layer):
    """Sum over every sample and output position of patch * patch^T, written with plain loops."""
    g = layer.conv
    N, C = x.shape[:2]
    spatial = x.shape[2:]
    nsp = len(spatial)
    pads = conv_pads(g, spatial)
    cpg = C // layer.groups
    H = np.zeros((layer.groups, layer.cols, layer.cols))
    out = [(spatial[i] + pads[i] + pads[i + nsp] - g.dilations[i] * (g.kernel[i] - 1) - 1) // g.strides[i] + 1
           for i in range(nsp)]
    for n in range(N):
        for pos in itertools.product(*[range(o) for o in out]):
            for grp in range(layer.groups):
                patch = []
                for c in range(grp * cpg, (grp + 1) * cpg):
                    for offs in itertools.product(*[range(k) for k in g.kernel]):
                        idx = [pos[i] * g.strides[i] + offs[i] * g.dilations[i] - pads[i] for i in range(nsp)]
                        inside = all(0 <= idx[i] < spatial[i] for i in range(nsp))
                        patch.append(x[(n, c) + tuple(idx)] if inside else 0.0)
                p = np.array(patch)
                H[grp] += np.outer(p, p)
    return H
