"""Frozen settings for a whole run, and the rules they must follow.

The API builds one QuantizeConfig from its arguments, :func:`check` refuses what no run could
do (the same rules whether the settings came from Python or the command line), and the
pipeline passes the config down. A leaf: nothing here reads a file or a model.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

from .errors import UserError, option
from .quant.activations import ACT_BITS, ACT_CALIBRATIONS
from .quant.grid import GridSpec
from .solvers.common import Damping
from .types import QUANTIZABLE_OPS

FORMATS = ("qdq", "fake")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "float32", "float64")
BN_MODES = ("match", "reestimate")
RESIZES = ("stretch", "letterbox", "crop")
# Methods that sweep no columns in an order (--order does not apply).
METHODS_WITHOUT_ORDER = ("rtn", "obq")


@dataclass(frozen=True)
class ImageOptions:
    """How images become input tensors (defaults: RGB, x/255, stretch to the model's size, NCHW).

    Args:
        size: (height, width), or None to take the model's fixed spatial size.
        resize: "stretch", "letterbox" (keep aspect, pad) or "crop" (resize the short
            side, centre-crop).
        crop_fraction: for "crop", the share of the resized image that the crop keeps
            (ImageNet's resize-256-crop-224 is 0.875; default 1.0).
        pad_value: letterbox padding in pixel units (0-255), e.g. 114 for YOLO.
        pad_align: "center" or "topleft" (PP-OCR right-pads).
        channel_order: "rgb" or "bgr".
        scale: multiply the pixels (0-255) by this (None: 1/255 for a float input, 1 for an
            integer input such as uint8, which takes the pixels themselves).
        mean, std: per channel, applied after scale: (x*scale - mean) / std.
        layout: "nchw", "nhwc", or None to infer it from the model input.
    """

    size: tuple[int, int] | None = None
    resize: str = "stretch"
    crop_fraction: float = 1.0
    pad_value: float = 0.0
    pad_align: str = "center"
    channel_order: str = "rgb"
    scale: float | None = None
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    layout: str | None = None


# Image pre-processing of common exporters; explicit options override a preset.
IMAGE_PRESETS = {
    "imagenet": dict(resize="crop", crop_fraction=0.875, channel_order="rgb", scale=1 / 255,
                     mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
    "yolo": dict(resize="letterbox", pad_value=114.0, channel_order="rgb", scale=1 / 255),
    "yolox": dict(resize="letterbox", pad_value=114.0, pad_align="topleft", channel_order="bgr", scale=1.0),
    "ppocr": dict(resize="letterbox", pad_value=127.5, pad_align="topleft", channel_order="bgr",
                  scale=1 / 255, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
}
# The Python names of the image options (the keys of ``preprocess``).
IMAGE_KEYS = ("preset",) + tuple(ImageOptions.__dataclass_fields__)


@dataclass(frozen=True)
class CalibConfig:
    """Where the calibration data comes from and how much of it to use.

    Args:
        source: a folder of images, a folder/file of .npy/.npz, "random", or data in memory:
            a dict of arrays keyed by input name, an array (a single-input model), an iterable
            of such dicts (one batch each), an object with onnxruntime's ``get_next()``, or a
            callable that returns a new iterable for each pass (see calibration.sources).
        samples: use at most this many samples (None: all; random: 8).
        batch_size: samples per run where the model's batch dimension is dynamic.
        image: image pre-processing.
        shapes: sizes for dynamic dimensions of random inputs, by input name.
        seed: random seed for the "random" source.
        pick: only the samples at these positions of the source (counted from 0, after the
            ``samples`` cut), in order; see calibration.batches.spread.
        given: the options the user set for one kind of source (Python names: "mean",
            "input_shapes", ...), so that one set for another kind is an error rather than
            silently unused.
    """

    source: object = "random"
    samples: int | None = None
    batch_size: int = 8
    image: ImageOptions = field(default_factory=ImageOptions)
    shapes: dict = field(default_factory=dict)
    seed: int = 0
    pick: tuple[int, ...] | None = None
    given: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        """How messages name the source: ``calibration=PATH`` (``--calib PATH``), or the option
        alone for data in memory."""
        if isinstance(self.source, str):
            return option("calibration", self.source)
        return option("calibration") + " (in memory)"


@dataclass(frozen=True)
class SolveConfig:
    """How each layer is solved.

    Args:
        method: a registered solver ("fastobq", "gptq", "obq", "rtn").
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
# 0.7636 and 0.0747.
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
    """Everything one quantization run does, in one value (see api.quantize for each setting).

    Args:
        model: the input model: a path (never overwritten) or an onnx.ModelProto.
        output: the output model path (written atomically), or None to write nothing.
        calib: calibration data, or None (only RTN without BN re-estimation runs without it).
        solve: the solver settings.
        format: "qdq" (integer weights + DequantizeLinear) or "fake" (float weights on the grid).
        opset: convert the model to this opset first (None: what the format and bits need).
        bn: BatchNorm re-estimation.
        device: "auto", "cpu" or "cuda" for the Hessians and the solver.
        exclude: glob patterns of layer names to leave in float.
        op_types: quantize only layers of these ops (of "Conv", "Gemm", "MatMul"); empty: all.
        layer_bits: (glob, bits) pairs: layers whose name or weight matches a glob get that bit
            width instead of ``solve.grid.bits``; the first matching pair wins.
        layer_group_size: (glob, group size) pairs, the same way for ``solve.grid.group_size``
            (0: one scale per output channel).
        report: write the JSON report here (None: no file).
        hessians: read the Hessians from this file (written by ``save_hessians``), or take these
            (a Hessians from api.capture), instead of capturing them; ``calib`` is then needed
            only for BN re-estimation.
        save_hessians: also write the captured Hessians to this file.
        act_bits: also quantize every quantized layer's input activation to this many bits
            (8: INT8, one scale per tensor, zero-point 0), as QuantizeLinear/DequantizeLinear
            before the layer; None: weights only.
        act_calib: how each activation scale comes from the calibration data (see
            quant.activations: "max", "percentile" or "mse"; None: "mse" with ``act_bits``).
        act_exclude: glob patterns of layers whose inputs stay in float with ``act_bits``
            (their weights are still quantized).
        overwrite: replace an existing output, report or Hessian file (else an error).
    """

    model: object
    output: str | None
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
    hessians: object = None
    save_hessians: str | None = None
    act_bits: int | None = None
    act_calib: str | None = None
    act_exclude: tuple[str, ...] = ()
    overwrite: bool = False

    @property
    def grouped(self) -> bool:
        """Whether any layer may get a scale per group of inputs (QDQ then needs opset 21)."""
        return self.solve.grid.group_size > 0 or any(g > 0 for _, g in self.layer_group_size)

    @property
    def hessians_name(self) -> str | None:
        """How messages and the report name ``hessians``: its path, or "(captured)" for a value."""
        return self.hessians if self.hessians is None or isinstance(self.hessians, str) else "(captured)"

    @property
    def activation_calibration(self) -> str:
        """How the activation scales are set: ``act_calib``, "mse" by default."""
        return self.act_calib or "mse"


def check(cfg: QuantizeConfig, methods, orders) -> None:
    """Refuse settings that no run can carry out, naming the option and the fix.

    Args:
        cfg: the settings.
        methods: the registered method names; orders: the column orders.

    Raises:
        UserError: a value out of its range or choices, or options that contradict each other.
    """
    solve, grid = cfg.solve, cfg.solve.grid
    choose("method", solve.method, methods)
    if solve.order is not None:
        choose("order", solve.order, orders)
    for name, value, choices in (("format", cfg.format, FORMATS), ("device", cfg.device, DEVICES),
                                 ("precision", solve.precision, PRECISIONS), ("bn_mode", cfg.bn.mode, BN_MODES),
                                 ("scale_search", grid.search, ("minmax", "mse"))):
        choose(name, value, choices)
    whole("bits", grid.bits, 2, 8)
    whole("block", solve.block, 1)
    if grid.group_size:
        whole("group_size", grid.group_size, 1)
    if cfg.opset is not None:
        whole("opset", cfg.opset, 7, 30)
    positive("damp", solve.damp.value)
    if cfg.bn.samples is not None:
        whole("bn_samples", cfg.bn.samples, 1)
    if cfg.act_bits is not None:
        choose("act_bits", cfg.act_bits, ACT_BITS)
    if cfg.act_calib is not None:
        choose("act_calib", cfg.act_calib, ACT_CALIBRATIONS)
    for name, patterns in (("exclude", cfg.exclude), ("act_exclude", cfg.act_exclude),
                           ("layer_bits", [g for g, _ in cfg.layer_bits]),
                           ("layer_group_size", [g for g, _ in cfg.layer_group_size])):
        for pattern in patterns:
            if not isinstance(pattern, str) or not pattern.strip():
                raise UserError(f"{option(name)} {pattern!r}: give a glob of layer or weight names, e.g. 'Conv_1*' "
                                "(onnxobq inspect lists them)")
    for glob, bits in cfg.layer_bits:
        whole("layer_bits", bits, 2, 8, f"{glob}=")
    for glob, size in cfg.layer_group_size:
        whole("layer_group_size", size, 0, None, f"{glob}=")
    for op in cfg.op_types:
        choose("op_types", op, QUANTIZABLE_OPS)
    _check_clashes(cfg)


def _check_clashes(cfg: QuantizeConfig) -> None:
    """Options that contradict each other."""
    method = cfg.solve.method
    if cfg.solve.order is not None and method in METHODS_WITHOUT_ORDER:
        raise UserError(f"{option('method', method)} has no column order; drop {option('order')}")
    if cfg.act_exclude and cfg.act_bits is None:
        raise UserError(f"{option('act_exclude', cfg.act_exclude[0])} keeps some layer inputs out of "
                        f"{option('act_bits')}; give {option('act_bits', 8)} or drop {option('act_exclude')}")
    if cfg.act_calib is not None and cfg.act_bits is None:
        raise UserError(f"{option('act_calib', cfg.act_calib)} sets the scales of {option('act_bits')}; give "
                        f"{option('act_bits', 8)} or drop {option('act_calib')}")
    if cfg.solve.grid.narrow and not cfg.solve.grid.symmetric:
        raise UserError(f"{option('narrow_range')} needs a symmetric grid; drop {option('symmetric', False)}")
    if cfg.save_hessians is not None and cfg.hessians is not None:
        raise UserError(f"{option('save_hessians', cfg.save_hessians)}: the Hessians come from "
                        f"{option('hessians', cfg.hessians_name)} already; give one of the two")


def choose(name: str, value, choices) -> None:
    """Refuse a value that is not one of ``choices``."""
    if value not in choices:
        raise UserError(f"{option(name, value)}: not one of {', '.join(map(str, choices))}; give one of them")


def whole(name: str, value, low: int, high: int | None = None, prefix: str = "") -> None:
    """Refuse a value that is not a whole number from ``low`` to ``high`` (None: no bound)."""
    if (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low
            or (high is not None and value > high)):
        bounds = f"from {low} to {high}" if high is not None else f"of {low} or more"
        raise UserError(f"{option(name, f'{prefix}{value}')}: give a whole number {bounds}")


def positive(name: str, value) -> None:
    """Refuse a value that is not a finite number above 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise UserError(f"{option(name, value)}: give a finite number above 0")
