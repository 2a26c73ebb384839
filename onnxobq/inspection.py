"""What ``inspect`` finds in a model: its inputs, its layers, and the parameters left in float."""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

from .graph import load, scan_folded
from .runtime import model_inputs


@dataclass(frozen=True)
class InputRecord:
    """A model input: its name, shape (None for a dynamic dimension) and NumPy dtype name."""

    name: str
    shape: tuple
    dtype: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class LayerRecord:
    """A Conv, Gemm or MatMul, as quantize would find it.

    Attributes:
        name: the node's name (made unique); op; weight: the weight tensor's name.
        shape: the weight's stored shape; rows, cols: d_row x d_col of one group; groups.
        source: where the weight lives ("initializer", "Constant node", "folded Transpose", ...).
        shared_with: the other nodes that share the weight (one layer for all of them).
        quantizable: whether quantize quantizes it; reason: why not, where it does not.
    """

    name: str
    op: str
    weight: str
    shape: tuple = ()
    rows: int = 0
    cols: int = 0
    groups: int = 1
    source: str = ""
    shared_with: tuple = ()
    quantizable: bool = True
    reason: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Inspection:
    """A model as quantize sees it.

    Attributes:
        model: how it was named; inputs: its inputs; layers: every Conv, Gemm and MatMul
            (quantizable or not) and every layer-like op left alone, in graph order.
        weights: "quantized" (the parameters of the quantizable layers), "float" (the other
            floating-point parameters) and "float_by_op" (those by the op that reads them).
        notes: what was done to find them (weights computed from constants folded).
    """

    model: str
    inputs: list[InputRecord]
    layers: list[LayerRecord]
    weights: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def quantizable(self) -> list[LayerRecord]:
        return [l for l in self.layers if l.quantizable]

    @property
    def skipped(self) -> list[LayerRecord]:
        return [l for l in self.layers if not l.quantizable]

    def to_dict(self) -> dict:
        return {"model": self.model, "inputs": [i.to_dict() for i in self.inputs],
                "layers": [l.to_dict() for l in self.layers], "weights": self.weights, "notes": self.notes}


def inspect_model(model) -> Inspection:
    """Load a model and list what quantize would find (weights that constants compute folded)."""
    proto, name, _ = load(model)
    folded, scan, notes = scan_folded(proto)
    records = [LayerRecord(l.name, l.op, l.weight, l.shape, l.rows, l.cols, l.groups, l.source,
                           tuple(n for n, _, _ in l.uses)) for l in scan.layers]
    records += [LayerRecord(s.name, s.op, s.weight, quantizable=False, reason=s.reason) for s in scan.skipped]
    inputs = [InputRecord(s.name, tuple(s.shape), str(s.dtype)) for s in model_inputs(folded)]
    return Inspection(name, inputs, records, float_weights(scan, {l.weight for l in scan.layers}), notes)


def float_weights(scan, quantized: set, dropped: set = frozenset()) -> dict:
    """Parameter counts of a scan: those in ``quantized`` weights, and the rest by the op that reads
    them, leaving out the ``dropped`` ones (the parameters of BatchNorms folded into a Conv)."""
    by_op: Counter = Counter()
    done = 0
    for name, (op, size) in scan.constants.items():
        if name in quantized:
            done += size
        elif name not in dropped:
            by_op[op] += size
    return {"quantized": done, "float": sum(by_op.values()), "float_by_op": dict(by_op.most_common())}
