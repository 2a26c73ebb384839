"""The values that pass between the stages: layers, their solutions and figures, Hessians.

A leaf: NumPy only, so that every stage, the report and the exporters can share them.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

QUANTIZABLE_OPS = ("Conv", "Gemm", "MatMul")


def fmt_shape(shape) -> str:
    """A shape as messages show it, a dynamic dimension (None) as ?: [?, 3, 224, 224]."""
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


@dataclass(frozen=True)
class InputSpec:
    """A model input: name, shape (ints, or None for a dynamic dimension) and NumPy dtype."""

    name: str
    shape: tuple
    dtype: np.dtype

    @property
    def fixed_batch(self) -> int | None:
        """The batch size fixed by the model, or None when the first dimension is dynamic."""
        return self.shape[0] if self.shape and self.shape[0] is not None else None


@dataclass(frozen=True)
class ConvGeometry:
    """What im2col needs to know about a Conv (spatial rank 1, 2 or 3)."""

    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    pads: tuple[int, ...]        # ONNX order: begins then ends
    dilations: tuple[int, ...]
    auto_pad: str = "NOTSET"


@dataclass(frozen=True)
class Layer:
    """One quantizable layer.

    Attributes:
        name: the node's name (made unique).
        op: "Conv", "Gemm" or "MatMul".
        weight: the weight tensor's name; source: "initializer" or "Constant node".
        input: the activation tensor whose Hessian is needed; output: the node's output.
        shape: the weight's stored shape; dtype: its NumPy dtype name.
        groups: independent groups (Conv group attribute; 1 otherwise).
        rows, cols: d_row and d_col of one group.
        transposed: the weight is stored inputs x outputs (Gemm transB=0, MatMul),
            so it is solved on its transpose.
        trans_a: Gemm transA=1 (the activation arrives transposed).
        conv: im2col geometry for a Conv, else None.
        bias: the bias tensor's name (Conv input 3, Gemm C), or None.
        uses: (name, input, output) of the other nodes that share this weight (same op and
            attributes, the weight as their second input, all in the main graph; RetinaNet-style
            detection heads run one conv on every pyramid level). The weight is solved once on
            the sum of every use's X^T X; ``name``, ``input`` and ``output`` are those of the
            first.
    """

    name: str
    op: str
    weight: str
    source: str
    input: str
    output: str
    shape: tuple[int, ...]
    dtype: str
    groups: int
    rows: int
    cols: int
    transposed: bool = False
    trans_a: bool = False
    conv: ConvGeometry | None = None
    bias: str | None = None
    uses: tuple[tuple[str, str, str], ...] = ()

    @property
    def channel_axis(self) -> int:
        """The axis of the stored weight that indexes output channels."""
        return 1 if self.transposed else 0

    @property
    def hessian_key(self) -> tuple:
        """Layers with the same key see the same unfolded input and share one Hessian."""
        return (self.input, self.op == "Conv", self.trans_a, self.conv, self.groups, self.cols, self.uses)

    def each_use(self) -> list[Layer]:
        """One layer per node that uses the weight, each with its own input and output (the
        layer itself when it has no other uses)."""
        if not self.uses:
            return [self]
        return [replace(self, name=n, input=i, output=o, uses=())
                for n, i, o in ((self.name, self.input, self.output), *self.uses)]


@dataclass(frozen=True)
class Skipped:
    """A layer left in float, with the reason."""

    name: str
    op: str
    weight: str
    reason: str


@dataclass
class LayerScan:
    """The result of scanning a graph: layers, skipped layers, each layer's weight by name, and
    every floating-point constant of the main graph by name, with the op of its first reader
    and its element count (the parameters: what the layers quantize, and what stays in float)."""

    layers: list[Layer] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    weights: dict[str, np.ndarray] = field(default_factory=dict)
    constants: dict[str, tuple[str, int]] = field(default_factory=dict)


def to_matrix(layer: Layer, w: np.ndarray) -> np.ndarray:
    """The stored weight as the solver's (G, R, C) stack: rows are outputs, columns inputs.

    Conv columns follow the weight's own flatten order c*kh*kw + i*kw + j.
    """
    if layer.op == "Conv":
        return w.reshape(layer.groups, layer.rows, layer.cols)
    return (w.T if layer.transposed else w)[None]


def from_matrix(layer: Layer, m: np.ndarray) -> np.ndarray:
    """Inverse of :func:`to_matrix`: a (G, R, C) stack back to the stored weight layout."""
    if layer.op == "Conv":
        return m.reshape(layer.shape)
    return m[0].T if layer.transposed else m[0]


@dataclass(frozen=True)
class QuantizedLayer:
    """A layer's quantized weight in its stored layout.

    Attributes:
        layer: the layer.
        codes: integer grid codes (int16: half int32's memory, and room for a code's negation in a
            BN fold), shaped like the stored weight.
        scale: per output channel (O,), float64; zero: per output channel (O,), int32. With
            ``group_size`` B > 0, one per output channel and group of B columns (O, ceil(C / B)),
            the columns being those of the solver's matrix (``graph.layers.to_matrix``).
        qmin, qmax: the integer range; bits: the bit width.
        bias: a replacement bias (O,) set by BN folding or correction, else None.
        group_size: the grid's group size (0: one scale per output channel).
    """

    layer: Layer
    codes: np.ndarray
    scale: np.ndarray
    zero: np.ndarray
    qmin: int
    qmax: int
    bits: int
    bias: np.ndarray | None = None
    group_size: int = 0

    def channel_shape(self) -> tuple[int, ...]:
        """Shape that broadcasts a per-channel vector against the stored weight."""
        shape = [1] * len(self.layer.shape)
        shape[self.layer.channel_axis] = -1
        return tuple(shape)

    def per_weight(self, values: np.ndarray) -> np.ndarray:
        """Per-channel (O,) or per-group (O, n) values broadcast against the stored weight."""
        if not self.group_size:
            return values.reshape(self.channel_shape())
        layer = self.layer
        m = np.repeat(values.reshape(layer.groups, layer.rows, -1), self.group_size, axis=-1)[..., :layer.cols]
        return from_matrix(layer, m)

    def stored_scale(self) -> np.ndarray:
        """The scale as the model stores it: in the weight's dtype (DequantizeLinear's output type)."""
        return self.scale.astype(self.layer.dtype)

    def weight(self) -> np.ndarray:
        """The dequantized weight in the layer's dtype, computed as DequantizeLinear does
        (in float32 for a float32 or float16 weight, then rounded to the weight's dtype)."""
        work = np.float64 if np.dtype(self.layer.dtype) == np.float64 else np.float32
        diff = (self.codes - self.per_weight(self.zero)).astype(work)
        return (diff * self.per_weight(self.stored_scale().astype(work))).astype(self.layer.dtype)


@dataclass(frozen=True)
class LayerStats:
    """Per-layer figures for the report (errors are ||WX-QX||^2/||WX||^2 from the Hessian).

    ``stacked`` is how many layers were solved together with it (1: alone); ``seconds`` is
    then its share of their solve time. ``group_size`` is its grid's (0: one scale per channel).
    """

    name: str
    op: str
    shape: tuple[int, ...]
    groups: int
    bits: int
    method: str
    error: float | None
    rtn_error: float | None
    seconds: float
    damp: float | None
    cols: int = 0
    rows: int | None = None
    note: str = ""
    stacked: int = 1
    group_size: int = 0

    @property
    def rank_deficient(self) -> bool:
        """Its Hessian came from fewer rows of X than it has inputs (Hessian methods only)."""
        return self.rows is not None and self.rows < self.cols


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


@dataclass(frozen=True)
class BNEdit:
    """New running statistics for one BatchNormalization node, and whether it is folded.

    Attributes:
        output: the BN node's output tensor (identifies the node).
        mean, var: the re-estimated statistics.
        fold_into: output tensor of the Conv it is folded into, or None to keep the node.
        params: the names of the node's parameter tensors (gone from the model where it is folded).
    """

    output: str
    mean: np.ndarray
    var: np.ndarray
    fold_into: str | None = None
    params: tuple[str, ...] = ()
