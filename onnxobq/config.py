"""Frozen settings for a whole run. The CLI builds one QuantizeConfig and passes it down."""
from __future__ import annotations

from dataclasses import dataclass, field

from .calibration import CalibConfig, ImageOptions  # noqa: F401  (re-exported for the CLI)
from .graph.layers import QUANTIZABLE_OPS as OP_TYPES
from .quant import GridSpec
from .solvers import METHODS, ORDERS, Damping

METHOD_NAMES = tuple(sorted(METHODS))
__all__ = ["BNConfig", "CalibConfig", "Damping", "GridSpec", "ImageOptions", "QuantizeConfig",
           "SolveConfig", "DEVICES", "FORMATS", "IMAGE_PRESETS", "METHOD_NAMES", "OP_TYPES", "ORDERS", "PRECISIONS"]

FORMATS = ("qdq", "fake")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "float32", "float64")


@dataclass(frozen=True)
class SolveConfig:
    """How each layer is solved.

    Args:
        method: a registered solver ("fastobq", "gptq", "rtn").
        order: a column order (see solvers.orders), or None for the method's default.
        block: columns per lazy block.
        damp: Hessian damping.
        grid: the per-channel grid.
        precision: arithmetic of the sweep; "auto" is float64 on the CPU, float32 on a GPU.
    """

    method: str = "fastobq"
    order: str | None = None
    block: int = 128
    damp: Damping = field(default_factory=Damping)
    grid: GridSpec = field(default_factory=GridSpec)
    precision: str = "auto"


# The BN passes' samples by default. Per-channel statistics settle on far fewer samples than
# the Hessians need, and each pass costs a forward pass per sample. With 256 calibration
# samples at W4, FastOBQ, 128 spread through them against all 256 (scripts/bn_samples_bench.py,
# 2 cores): the YOLOX detector's AP50:95 0.7624 against 0.7626 (BN stage 31.6 s against 66.0 s),
# the PP-OCRv4 recognizer's hard CER 0.0722 against 0.0717 (39.8 s against 103.8 s); with 64,
# 0.7636 and 0.0747. See the README's BatchNorm section.
DEFAULT_BN_SAMPLES = 128


@dataclass(frozen=True)
class BNConfig:
    """BatchNorm re-estimation after quantization (the paper's section 6.1).

    Args:
        reestimate: on by default.
        fold: fold explicit BatchNormalization nodes that follow a quantized Conv into it.
        correct_folded: match per-channel output mean/std to the float model for Convs
            with no BatchNormalization after them (BN already folded by the exporter).
        mode: "match" (default: statistics that make each BN's output match the float
            model's on the calibration data) or "reestimate" (the paper: the quantized
            model's own statistics, right only where the calibration data has the
            statistics the BN was trained on).
        samples: run the BN passes on only this many calibration samples, taken at even steps
            through them (None: all of them, the ones the Hessians came from); see
            DEFAULT_BN_SAMPLES. Each of the four passes is a forward pass over them.
    """

    reestimate: bool = True
    mode: str = "match"
    fold: bool = True
    correct_folded: bool = True
    samples: int | None = DEFAULT_BN_SAMPLES


@dataclass(frozen=True)
class QuantizeConfig:
    """Everything ``onnxobq quantize`` does, in one value.

    Args:
        model: input model path (never overwritten).
        output: output model path (written atomically).
        calib: calibration data, or None (only RTN without BN re-estimation runs without it).
        solve: the solver settings.
        format: "qdq" (integer weights + DequantizeLinear) or "fake" (float weights on the grid).
        opset: convert the model to this opset first (None: only what the format needs).
        bn: BatchNorm re-estimation.
        device: "auto", "cpu" or "cuda" for the Hessians and the solver.
        exclude: glob patterns of layer names to leave in float.
        op_types: quantize only layers of these ops (of "Conv", "Gemm", "MatMul"); empty: all.
        layer_bits: (glob, bits) pairs: layers whose name or weight matches a glob get that bit
            width instead of ``solve.grid.bits``; the first matching pair wins.
        layer_group_size: (glob, group size) pairs, the same way for ``solve.grid.group_size``
            (0: one scale per output channel).
        report: write the JSON report here (None: no file).
        hessians: read the Hessians from this file (written by ``save_hessians``) instead
            of capturing them; ``calib`` is then needed only for BN re-estimation.
        save_hessians: also write the captured Hessians to this file.
        act_bits: also quantize every quantized layer's input activation to this many bits
            (8: INT8, one scale per tensor, zero-point 0), as QuantizeLinear/DequantizeLinear
            before the layer; None: weights only.
        act_calib: how each activation scale comes from the calibration data (see
            quant.activations: "max", "percentile" or "mse").
        act_exclude: glob patterns of layers whose inputs stay in float with ``act_bits``
            (their weights are still quantized).
    """

    model: str
    output: str
    calib: CalibConfig | None = None
    solve: SolveConfig = field(default_factory=SolveConfig)
    format: str = "qdq"
    opset: int | None = None
    bn: BNConfig = field(default_factory=BNConfig)
    device: str = "auto"
    exclude: tuple[str, ...] = ()
    op_types: tuple[str, ...] = ()
    layer_bits: tuple[tuple[str, int], ...] = ()
    layer_group_size: tuple[tuple[str, int], ...] = ()
    report: str | None = None
    hessians: str | None = None
    save_hessians: str | None = None
    act_bits: int | None = None
    act_calib: str = "mse"
    act_exclude: tuple[str, ...] = ()

    @property
    def grouped(self) -> bool:
        """Whether any layer may get a scale per group of inputs (QDQ then needs opset 21)."""
        return self.solve.grid.group_size > 0 or any(g > 0 for _, g in self.layer_group_size)


# Image pre-processing of common exporters; explicit options override a preset.
IMAGE_PRESETS = {
    "imagenet": dict(resize="crop", crop_fraction=0.875, channel_order="rgb", scale=1 / 255,
                     mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
    "yolo": dict(resize="letterbox", pad_value=114.0, channel_order="rgb", scale=1 / 255),
    "yolox": dict(resize="letterbox", pad_value=114.0, pad_align="topleft", channel_order="bgr", scale=1.0),
    "ppocr": dict(resize="letterbox", pad_value=127.5, pad_align="topleft", channel_order="bgr",
                  scale=1 / 255, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
}
