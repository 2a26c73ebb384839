"""The public API: quantize, capture, inspect and compare.

The command line, the scripts and users all call these; each checks its arguments the same
way whoever calls.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, replace
from inspect import signature

from .config import (DEFAULT_BN_SAMPLES, DEVICES, IMAGE_KEYS, IMAGE_PRESETS, RESIZES, BNConfig, CalibConfig,
                     ImageOptions, QuantizeConfig, SolveConfig, check, choose, whole)
from .errors import UserError, option
from .quant import GridSpec
from .solvers import METHODS, ORDERS, Damping


def quantize(model, output: str | None = None, *, calibration=None, samples: int | None = None,
             batch_size: int = 8, preprocess=None, input_shapes: dict | None = None, seed: int = 0,
             bits: int = 8, method: str = "fastobq", order: str | None = None, damp: float = 0.01,
             damp_mode: str = "relative", block: int = 128, symmetric: bool = True, narrow_range: bool = False,
             scale_search: str = "minmax", group_size: int | None = None, format: str = "qdq",
             opset: int | None = None, act_bits: int | None = None, act_calib: str | None = None,
             act_exclude=(), bn_reestimate: bool = True, bn_mode: str = "match", bn_fold: bool = True,
             bn_correct: bool = True, bn_samples: int | None = DEFAULT_BN_SAMPLES, exclude=(), op_types=(),
             layer_bits=(), layer_group_size=(), device: str = "auto", precision: str = "auto",
             report: str | None = None, hessians=None, save_hessians: str | None = None, overwrite: bool = False,
             progress=None):
    """Quantize the weights of every Conv, Gemm and MatMul of an ONNX model with Hessian-based rounding.

    The layer inputs are captured on the calibration data with onnxruntime, each layer's
    Hessian H = 2XX^T/N is summed from them, and each weight is rounded column by column with
    the error of the columns already rounded compensated (FastOBQ: most sensitive columns
    first, one inverse Hessian shared by all rows). BatchNorm statistics are then re-estimated
    on the quantized model and kept where they lower its output error.

    Args:
        model: the float model: a path to an .onnx file (never overwritten; external data is
            read from beside it), or an onnx.ModelProto.
        output: where to write the quantized model, atomically (weights past 2 GB go to
            ``<output>.data``). None: write nothing and return the model as
            ``Report.quantized_model``.
        calibration: the data the layers' inputs are captured on (see onnxobq.calibration):
            a folder of .jpg/.png/.bmp images, a .npy/.npz file or folder (arrays keyed by input
            name, with or without a batch axis), ``"random"`` for a smoke run, a dict of arrays
            keyed by input name, an array (single-input models), an iterable of such dicts (one
            batch each), an object with onnxruntime's ``get_next()``, or a callable returning a
            new iterable for each pass. Data is streamed one batch at a time. Needed by every
            method but "rtn" and by BatchNorm re-estimation.
        samples: use at most this many calibration samples (default: all; 8 for "random").
        batch_size: samples per onnxruntime run where the model's batch dimension is dynamic
            (a fixed batch, e.g. 1, is always respected). Default 8.
        preprocess: how images become tensors: a preset name ("imagenet", "yolo", "yolox",
            "ppocr"), or a dict of ImageOptions fields with an optional "preset" that they
            override (e.g. ``{"preset": "yolo", "size": (640, 640)}``). Images only.
        input_shapes: sizes of dynamic input dimensions for ``"random"``, e.g.
            ``{"x": (1, 3, 224, 224)}``.
        seed: the seed of ``"random"``. Default 0.
        bits: the weight bit width, 2 to 8. Default 8.
        method: "fastobq" (default), "gptq" (the same sweep in natural order), "obq" (exact
            OBQ, one inverse Hessian per row: slow) or "rtn" (round to nearest, no data needed).
        order: the column order (see onnxobq.solvers.orders): "sensi_des" (FastOBQ's default),
            "none" (GPTQ's), "act" (GPTQ's act-order), and the paper's ablation orders.
        damp: added to diag(H) before it is inverted. Default 0.01.
        damp_mode: "relative" (default: damp * mean(diag H), as GPTQ) or "absolute".
        block: columns per lazy block update. Default 128.
        symmetric: zero-point 0 and a signed grid (default, what TensorRT needs), or False for
            a per-channel zero-point and an unsigned grid.
        narrow_range: a signed grid without its most negative code, e.g. [-127, 127].
        scale_search: "minmax" (default: each channel's range) or "mse" (OBQ's search over
            shrunk ranges).
        group_size: one scale per this many consecutive inputs of each output channel
            (DequantizeLinear's block_size, opset 21) instead of one per channel.
        format: "qdq" (default: integer weights feeding DequantizeLinear, for TensorRT and
            onnxruntime) or "fake" (float weights on the grid, the same graph).
        opset: convert the model to this opset first. Default: what the output needs (13 for
            QDQ, 21 for groups, and 21 at 4 bits and below, where it stores the codes as INT4,
            weight-only).
        act_bits: 8 to also quantize each quantized layer's input activation (INT8, one scale
            per tensor, zero-point 0, QuantizeLinear/DequantizeLinear before the layer:
            TensorRT's explicit INT8). Default None: weights only.
        act_calib: how each activation scale comes from the calibration data: "mse" (default),
            "max" or "percentile".
        act_exclude: globs of layers whose inputs stay in float with act_bits.
        bn_reestimate: re-estimate BatchNorm statistics on the quantized model, kept only where
            the output error drops by 1% or more. Default True.
        bn_mode: "match" (default: the float model's per-channel output statistics) or
            "reestimate" (the quantized model's own, as the paper).
        bn_fold: fold re-estimated BatchNormalization nodes into the Conv before them.
        bn_correct: correct each Conv with no BatchNormalization after it, per channel.
        bn_samples: run the BatchNorm passes on this many calibration samples spread through
            them (default 128; None: all).
        exclude: globs of layer, weight or node names to leave in float (``inspect`` lists them).
        op_types: quantize only layers of these ops ("Conv", "Gemm", "MatMul"; default all).
        layer_bits: (glob, bits) pairs or a dict: layers that match get that width instead of
            ``bits``; the first match wins.
        layer_group_size: (glob, size) pairs or a dict, the same for ``group_size`` (0: one
            scale per output channel).
        device: "auto" (default: CuPy on a GPU when present), "cpu" or "cuda".
        precision: the solver's arithmetic: "auto" (float64 on the CPU, float32 on a GPU),
            "float32" or "float64".
        report: also write the report as JSON to this path.
        hessians: the Hessians to use instead of capturing them: a Hessians value from
            ``capture`` or a file written by ``save_hessians``, of the same model (and, where
            they came from files, the same calibration settings). ``calibration`` is still read
            for BatchNorm re-estimation.
        save_hessians: also write the captured Hessians to this .npz file.
        overwrite: replace existing output, report and Hessian files (default: an error).
        progress: an object with start(what, total), advance(n) and finish() for progress bars.

    Returns:
        Report: per-layer errors and times, the BatchNorm outcome, what stayed in float, the
        files written, the versions and the model's sha256 (see onnxobq.report.Report).

    Raises:
        UserError: a bad file, option or calibration data, with a one-line message that names
            the parameter and the fix. Nothing is written then.
    """
    cfg = quantize_config(locals())
    _check_files(cfg)
    from .pipeline import run
    return run(cfg, progress)


def capture(model, calibration, *, samples: int | None = None, batch_size: int = 8, preprocess=None,
            input_shapes: dict | None = None, seed: int = 0, exclude=(), op_types=(), act_ranges: bool = False,
            device: str = "auto", precision: str = "auto", progress=None):
    """Capture every layer's Hessian once, to quantize with several settings (``hessians=``).

    The Hessians depend only on the model and the calibration data, so one capture serves
    every bit width, method, order and grid.

    Args:
        model, calibration, samples, batch_size, preprocess, input_shapes, seed, exclude,
            op_types, device, precision: as for quantize.
        act_ranges: also count each layer input's |x|, which act_bits needs.
        progress: as for quantize.

    Returns:
        Hessians: pass it to ``quantize(..., hessians=h)``; ``h.save(path)`` writes it as a file
        that ``hessians=path`` (``--hessians``) reads.
    """
    cfg = quantize_config({**QUANTIZE_DEFAULTS, "model": model, "calibration": calibration, "samples": samples,
                           "batch_size": batch_size, "preprocess": preprocess, "input_shapes": input_shapes,
                           "seed": seed, "exclude": exclude, "op_types": op_types, "device": device,
                           "precision": precision, "bn_reestimate": False, "act_bits": 8 if act_ranges else None,
                           "format": "fake"})      # "fake": the model's own opset (the Hessians do not depend on it)
    if cfg.calib is None:
        raise UserError(f"{option('calibration')}: give the data to capture on, e.g. "
                        f"{option('calibration', 'images/')} or {option('calibration', 'random')}")
    from .pipeline import capture_only
    return capture_only(cfg, progress)


def inspect(model):
    """List the layers that quantize would find, and those it would leave in float.

    Args:
        model: a path or an onnx.ModelProto.

    Returns:
        Inspection: the model's inputs (name, shape, dtype), its layers (each with its weight,
        shape, d_row x d_col, groups, where the weight lives, and why it stays in float where
        it does), the parameters left in float by op, and notes.
    """
    from .inspection import inspect_model
    return inspect_model(model)


def compare(float_model, quant_model, calibration, *, samples: int | None = None, batch_size: int = 8,
            preprocess=None, input_shapes: dict | None = None, seed: int = 0, device: str = "cpu", progress=None):
    """Run a float model and its quantized version on the same data and measure how far apart
    their outputs are.

    Args:
        float_model, quant_model: paths or onnx.ModelProtos with the same inputs and outputs.
        calibration, samples, batch_size, preprocess, input_shapes, seed: the data, as for
            quantize. Use data the model was not quantized on: the result warns otherwise.
        device: onnxruntime's device: "cpu" (default), "cuda" (needs onnxruntime-gpu) or "auto".
        progress: as for quantize.

    Returns:
        Comparison: per output, the SQNR in dB, the mean cosine similarity and the top-1
        agreement (classifier-like outputs); the sample count and pre-processing used; warnings.
    """
    calib = calibration_config(calibration, samples, batch_size, preprocess, input_shapes, seed)
    if calib is None:
        raise UserError(f"{option('calibration')}: give the data to compare on, e.g. "
                        f"{option('calibration', 'images/')} or {option('calibration', 'random')}")
    choose("device", device, DEVICES)
    from .agreement import compare_models
    from .backend import choose_device
    if progress:
        progress.start("compare", None)
    try:
        # onnxruntime's device alone: compare solves nothing, so it never needs CuPy
        return compare_models(float_model, quant_model, calib, replace(choose_device("cpu"), runtime=device),
                              progress.advance if progress else None)
    finally:
        if progress:
            progress.finish()


# quantize's arguments and their defaults, by name.
QUANTIZE_DEFAULTS = {name: p.default for name, p in signature(quantize).parameters.items() if name != "progress"}


def quantize_config(args: dict) -> QuantizeConfig:
    """The QuantizeConfig of quantize's arguments (``args``, by name), checked (config.check)."""
    a = {**QUANTIZE_DEFAULTS, **{k: v for k, v in args.items() if k != "progress"}}
    choose("damp_mode", a["damp_mode"], ("relative", "absolute"))
    if a["group_size"] is not None:
        whole("group_size", a["group_size"], 1)
    path = lambda v: None if v is None else os.fspath(v)   # noqa: E731
    cfg = QuantizeConfig(
        model=os.fspath(a["model"]) if isinstance(a["model"], os.PathLike) else a["model"],
        output=path(a["output"]),
        calib=calibration_config(a["calibration"], a["samples"], a["batch_size"], a["preprocess"],
                                 a["input_shapes"], a["seed"]),
        solve=SolveConfig(method=a["method"], order=a["order"], block=a["block"],
                          damp=Damping(a["damp"], relative=a["damp_mode"] == "relative"),
                          grid=GridSpec(bits=a["bits"], symmetric=a["symmetric"], narrow=a["narrow_range"],
                                        search=a["scale_search"], group_size=a["group_size"] or 0),
                          precision=a["precision"]),
        format=a["format"], opset=a["opset"],
        bn=BNConfig(reestimate=a["bn_reestimate"], mode=a["bn_mode"], fold=a["bn_fold"],
                    correct_folded=a["bn_correct"], samples=a["bn_samples"]),
        device=a["device"], exclude=_globs(a["exclude"]), op_types=tuple(dict.fromkeys(_globs(a["op_types"]))),
        layer_bits=_pairs(a["layer_bits"], "layer_bits"),
        layer_group_size=_pairs(a["layer_group_size"], "layer_group_size"),
        report=path(a["report"]),
        hessians=path(a["hessians"]) if isinstance(a["hessians"], (str, os.PathLike)) else a["hessians"],
        save_hessians=path(a["save_hessians"]), act_bits=a["act_bits"], act_calib=a["act_calib"],
        act_exclude=_globs(a["act_exclude"]), overwrite=a["overwrite"])
    check(cfg, METHODS, ORDERS)
    return cfg


def calibration_config(calibration, samples=None, batch_size=8, preprocess=None, input_shapes=None,
                       seed=0) -> CalibConfig | None:
    """The CalibConfig of the calibration arguments (None without data), checked."""
    from .calibration import in_memory

    given = []
    image = _image_options(preprocess, given)
    if input_shapes:
        given.append("input_shapes")
    if calibration is None:
        return None
    if samples is not None:
        whole("samples", samples, 1)
    whole("batch_size", batch_size, 1)
    whole("seed", seed, 0)
    source = os.fspath(calibration) if isinstance(calibration, os.PathLike) else in_memory(calibration)
    return CalibConfig(source=source, samples=samples, batch_size=batch_size, image=image,
                       shapes=_shapes(input_shapes or {}), seed=seed, given=tuple(given))


def _image_options(preprocess, given: list) -> ImageOptions:
    """ImageOptions from a preset name, a dict (its "preset" overridden by the other keys) or
    ImageOptions; ``given`` collects the options set, for the check against the kind of data."""
    if preprocess is None or isinstance(preprocess, ImageOptions):
        if preprocess is not None:
            given.extend(k for k, v in asdict(preprocess).items() if v != getattr(ImageOptions(), k))
        return preprocess or ImageOptions()
    options = {"preset": preprocess} if isinstance(preprocess, str) else dict(preprocess)
    unknown = [k for k in options if k not in IMAGE_KEYS]
    if unknown:
        raise UserError(f"{option('preprocess')}: {unknown[0]!r} is not an image option; give a preset name or a "
                        f"dict of {', '.join(IMAGE_KEYS)}")
    preset = options.pop("preset", None)
    if preset is not None:
        choose("preset", preset, sorted(IMAGE_PRESETS))
        given.append("preset")
    _check_image_values(options)
    given.extend(options)
    merged = {**IMAGE_PRESETS.get(preset, {}), **options}
    for key in ("mean", "std"):
        if key in merged:
            merged[key] = tuple(float(v) for v in (merged[key] if hasattr(merged[key], "__len__") else [merged[key]]))
    if merged.get("size") is not None:
        merged["size"] = tuple(int(v) for v in merged["size"])
    return ImageOptions(**merged)


def _check_image_values(options: dict) -> None:
    """Refuse image option values out of their ranges or choices."""
    for name, choices in (("resize", RESIZES), ("pad_align", ("center", "topleft")),
                          ("channel_order", ("rgb", "bgr")), ("layout", ("nchw", "nhwc", None))):
        if name in options:
            choose(name, options[name], choices)
    size = options.get("size")
    if size is not None and (len(size) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1
                                                     for v in size)):
        raise UserError(f"{option('size', size)}: give a positive (height, width), e.g. (640, 640)")
    if "crop_fraction" in options and not (_finite(options["crop_fraction"]) and 0 < options["crop_fraction"] <= 1):
        raise UserError(f"{option('crop_fraction', options['crop_fraction'])}: give a number in (0, 1]")
    for name in ("pad_value", "scale"):
        if options.get(name) is not None and not _finite(options[name]):
            raise UserError(f"{option(name, options[name])}: give a finite number")
    if options.get("scale") == 0:
        raise UserError(f"{option('scale', 0)}: give a finite number other than 0")
    for name in ("mean", "std"):
        values = options.get(name)
        values = values if hasattr(values, "__len__") else [values]
        if name in options and (not values or not all(_finite(v) for v in values)):
            raise UserError(f"{option(name, options[name])}: give finite numbers, e.g. (0.5, 0.5, 0.5)")


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _shapes(input_shapes: dict) -> dict:
    """{input name: dims}, each a tuple of positive ints."""
    out = {}
    for name, dims in dict(input_shapes).items():
        dims = tuple(dims) if isinstance(dims, (tuple, list)) else (dims,)
        if not name or not dims or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in dims):
            example = (name or "x") + "=1x3x224x224"
            raise UserError(f"{option('input_shapes', f'{name}={dims}')}: give positive sizes, e.g. "
                            f"{option('input_shapes', example)}")
        out[name] = dims
    return out


def _globs(values) -> tuple:
    return (values,) if isinstance(values, str) else tuple(values)


def _pairs(values, name: str) -> tuple:
    """(glob, value) pairs from a dict or pairs."""
    items = list(values.items()) if isinstance(values, dict) else list(values) if not isinstance(values, str) else None
    if items is None or not all(isinstance(item, (tuple, list)) and len(item) == 2 for item in items):
        raise UserError(f"{option(name)}: give a dict {{glob: value}} or (glob, value) pairs, e.g. {{'conv1': 8}}")
    return tuple((str(g), n) for g, n in items)


def _check_files(cfg: QuantizeConfig) -> None:
    """The output paths' rules (files.check_outputs), before any work."""
    from .files import check_outputs
    from .graph.io import external_data_files

    model_files = [] if not isinstance(cfg.model, str) else [cfg.model] + (
        external_data_files(cfg.model) if os.path.isfile(cfg.model) else [])
    source = cfg.calib.source if cfg.calib is not None and isinstance(cfg.calib.source, str) else None
    check_outputs({"output": cfg.output, "report": cfg.report, "save_hessians": cfg.save_hessians},
                  {"calibration": source, "hessians": cfg.hessians if isinstance(cfg.hessians, str) else None},
                  model_files, cfg.overwrite)
