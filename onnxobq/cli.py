"""Command line: ``onnxobq quantize | inspect | compare``. Options -> config -> pipeline; no math."""
from __future__ import annotations

import json
import math
import os
import sys

import click

from . import pipeline
from .config import (DEFAULT_BN_SAMPLES, DEVICES, FORMATS, IMAGE_PRESETS, METHOD_NAMES, OP_TYPES, ORDERS, PRECISIONS,
                     BNConfig, CalibConfig, Damping, GridSpec, ImageOptions, QuantizeConfig, SolveConfig)
from .errors import UserError
from .quant.activations import ACT_BITS, ACT_CALIBRATIONS, PERCENTILE


METHODS_WITHOUT_ORDER = {"rtn", "obq"}


class SamplesOrAll(click.ParamType):
    """A positive sample count, or ``all`` (None)."""

    name = "N|all"

    def convert(self, value, param, ctx):
        if value is None or isinstance(value, int):
            return value
        if str(value).lower() == "all":
            return None
        try:
            n = int(value)
        except ValueError:
            n = 0
        if n < 1:
            self.fail(f"{value!r} is not a positive number or 'all'", param, ctx)
        return n


class GlobBits(click.ParamType):
    """GLOB=BITS: a layer-name glob and a bit width of 2 to 8, as (glob, bits); or, with
    ``what="group"``, GLOB=N with a group size N of 0 (per channel) or more."""

    def __init__(self, what: str = "bits"):
        self.what = what
        self.name = "GLOB=BITS" if what == "bits" else "GLOB=N"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        glob, sep, n = str(value).rpartition("=")
        example = "'conv1=8'" if self.what == "bits" else "'*MatMul*=128'"
        if not sep or not glob.strip():
            self.fail(f"{value!r}: give {self.name}, e.g. {example}", param, ctx)
        whole = n.strip().isascii() and n.strip().isdigit()
        if self.what == "bits" and (not whole or not 2 <= int(n) <= 8):
            self.fail(f"{value!r}: the bit width must be a whole number from 2 to 8", param, ctx)
        if self.what == "group" and not whole:
            self.fail(f"{value!r}: the group size must be a whole number (0: one scale per output channel)",
                      param, ctx)
        return glob, int(n)


class Glob(click.ParamType):
    """A layer-name glob that is not blank (a blank one would match nothing, silently)."""

    name = "GLOB"

    def convert(self, value, param, ctx):
        if not str(value).strip():
            self.fail(f"{value!r}: give a glob of layer or weight names, e.g. 'Conv_1*' (onnxobq inspect lists "
                      "them)", param, ctx)
        return str(value)


class OpTypes(click.ParamType):
    """A comma-separated list of the ops onnxobq quantizes, e.g. "MatMul,Gemm"."""

    name = "OPS"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        ops = tuple(dict.fromkeys(op.strip() for op in str(value).split(",") if op.strip()))
        bad = [op for op in ops if op not in OP_TYPES]
        if bad or not ops:
            what = f"{', '.join(bad)} is not an op onnxobq quantizes; " if bad and len(ops) > 1 else ""
            self.fail(f"{value!r}: {what}give a comma-separated list of {', '.join(OP_TYPES)}", param, ctx)
        return ops


class Finite(click.ParamType):
    """A finite float (click's float and FloatRange let NaN and inf through), optionally
    above 0 or other than 0."""

    name = "float"

    def __init__(self, positive: bool = False, nonzero: bool = False):
        self.positive, self.nonzero = positive, nonzero

    def convert(self, value, param, ctx):
        try:
            x = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(x) or (self.positive and x <= 0) or (self.nonzero and x == 0):
            self.fail(f"{value!r} is not a finite number" + (" above 0" if self.positive else
                                                              " other than 0" if self.nonzero else ""), param, ctx)
        return x


class BarProgress(pipeline.Progress):
    """tqdm bars on stderr for the calibration batches and the layers."""

    open_bars: set = set()  # closed by main() before it prints an error, so the error has its own line

    def __init__(self, enabled: bool):
        self.enabled, self.bar = enabled, None

    def start(self, what, total):
        if self.enabled:
            from tqdm import tqdm
            self.finish()
            # disable=None: no bars where stderr is not a terminal (logs, pipes), so that an
            # error there is the only line on stderr
            self.bar = tqdm(total=total, desc=what, unit="sample" if what != "layers" else "layer",
                            file=sys.stderr, dynamic_ncols=True, leave=False, disable=None)
            BarProgress.open_bars.add(self)

    def advance(self, n=1):
        if self.bar is not None:
            self.bar.update(n)

    def finish(self):
        BarProgress.open_bars.discard(self)
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    @classmethod
    def close_all(cls):
        for bar in list(cls.open_bars):
            bar.finish()


def _floats(text: str | None, what: str):
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if not values or not all(math.isfinite(v) for v in values):
        raise click.BadParameter(f"{text!r}: give comma-separated finite numbers, e.g. 0.5,0.5,0.5",
                                 param_hint=what)
    return values


def _size(text: str | None):
    if text is None:
        return None
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise click.BadParameter(f"{text!r}: give HxW, e.g. 640x640", param_hint="--size") from None
    if h < 1 or w < 1:
        raise click.BadParameter(f"{text!r}: give a positive HxW, e.g. 640x640", param_hint="--size")
    return h, w


def _shapes(items) -> dict:
    shapes = {}
    for item in items:
        name, _, dims = item.rpartition("=")
        try:
            shapes[name] = tuple(int(d) for d in dims.lower().replace(",", "x").split("x"))
        except ValueError:
            raise click.BadParameter(f"{item!r}: give NAME=1x3x224x224", param_hint="--input-shape") from None
        if not name:
            raise click.BadParameter(f"{item!r}: give NAME=1x3x224x224", param_hint="--input-shape")
        if any(d < 1 for d in shapes[name]):
            raise click.BadParameter(f"{item!r}: give positive sizes, e.g. {name}=1x3x224x224",
                                     param_hint="--input-shape")
    return shapes


def calib_options(f):
    """Options shared by every command that reads calibration data."""
    opts = [
        click.option("--calib", metavar="PATH|random",
                     help="Calibration data: a folder of .jpg/.png/.bmp images, a .npy/.npz file or folder "
                          "(arrays keyed by input name), or 'random' for a smoke run."),
        click.option("--samples", type=click.IntRange(min=1), help="Use at most N samples (default: all; random: 8)."),
        click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
                     help="Samples per run where the model's batch dimension is dynamic "
                          "(a fixed batch, e.g. 1, is always respected)."),
        click.option("--preset", type=click.Choice(sorted(IMAGE_PRESETS)),
                     help="Image pre-processing of a common exporter; the options below override it."),
        click.option("--size", help="Image size HxW (default: the model input's fixed size)."),
        click.option("--resize", type=click.Choice(["stretch", "letterbox", "crop"]),
                     help="stretch (default), letterbox (keep aspect, pad) or crop (short side, centre crop)."),
        click.option("--crop-fraction", type=click.FloatRange(0, 1, min_open=True),
                     help="For --resize crop: the share of the resized image kept (0.875 = resize 256, crop 224)."),
        click.option("--pad-value", type=Finite(), help="Letterbox padding in pixel units 0-255 (default 0)."),
        click.option("--pad-align", type=click.Choice(["center", "topleft"]), help="Letterbox placement (default center)."),
        click.option("--channel-order", type=click.Choice(["rgb", "bgr"]), help="Channel order (default rgb)."),
        click.option("--scale", "pixel_scale", type=Finite(nonzero=True),
                     help="Multiply pixels 0-255 by this (default 1/255; 1 for an integer input)."),
        click.option("--mean", help="Per-channel mean subtracted after scaling, e.g. 0.485,0.456,0.406 (default 0)."),
        click.option("--std", help="Per-channel std divided after the mean (default 1)."),
        click.option("--layout", type=click.Choice(["nchw", "nhwc"]), help="Image tensor layout (default: from the model)."),
        click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME=DIMS",
                     help="Shape of a dynamic input for --calib random, e.g. x=1x3x224x224. Repeatable."),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed of --calib random."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


# The image options of calib_options, by the keyword click gives each.
IMAGE_FLAGS = {"--preset": "preset", "--size": "size", "--resize": "resize", "--crop-fraction": "crop_fraction",
               "--pad-value": "pad_value", "--pad-align": "pad_align", "--channel-order": "channel_order",
               "--scale": "pixel_scale", "--mean": "mean", "--std": "std", "--layout": "layout"}


def calib_config(kw) -> CalibConfig | None:
    if kw["calib"] is None:
        return None
    image = dict(IMAGE_PRESETS.get(kw["preset"], {}))
    given = dict(size=_size(kw["size"]), resize=kw["resize"], crop_fraction=kw["crop_fraction"],
                 pad_value=kw["pad_value"],
                 pad_align=kw["pad_align"], channel_order=kw["channel_order"], scale=kw["pixel_scale"],
                 mean=_floats(kw["mean"], "--mean"), std=_floats(kw["std"], "--std"), layout=kw["layout"])
    image.update({k: v for k, v in given.items() if v is not None})
    typed = [flag for flag, key in IMAGE_FLAGS.items() if kw[key] is not None]
    if kw["input_shapes"]:
        typed.append("--input-shape")
    return CalibConfig(source=kw["calib"], samples=kw["samples"], batch_size=kw["batch_size"],
                       image=ImageOptions(**image), shapes=_shapes(kw["input_shapes"]), seed=kw["seed"],
                       given=tuple(typed))


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="onnxobq")
def cli():
    """onnxobq: Hessian-based (FastOBQ) post-training weight quantization of ONNX models."""


@cli.command()
@click.argument("model")
@click.option("-o", "--output", help="Output model (default: MODEL's name + .w<bits>.<format>.onnx, beside it).")
@click.option("--bits", type=click.IntRange(2, 8), default=8, show_default=True, help="Weight bit width.")
@click.option("--method", type=click.Choice(METHOD_NAMES), default="fastobq", show_default=True,
              help="fastobq: sensitivity-ordered columns, shared inverse Hessian; gptq: natural order; "
                   "obq: exact OBQ, one inverse Hessian and greedy order per row (slow: the baseline); "
                   "rtn: round to nearest (no calibration needed).")
@click.option("--order", type=click.Choice(ORDERS),
              help="Column order (default: sensi_des for fastobq, none for gptq; act = GPTQ act-order).")
@click.option("--damp", type=Finite(positive=True), default=0.01, show_default=True,
              help="Damping added to the Hessian's diagonal.")
@click.option("--damp-mode", type=click.Choice(["relative", "absolute"]), default="relative", show_default=True,
              help="relative: damp * mean(diag H) (GPTQ); absolute: damp itself (the paper uses 0.1).")
@click.option("--block", type=click.IntRange(min=1), default=128, show_default=True, help="Columns per lazy block.")
@click.option("--symmetric/--asymmetric", default=True, show_default=True,
              help="Zero-point 0 with a signed grid (TensorRT), or a per-channel zero-point.")
@click.option("--narrow-range", is_flag=True, help="Signed range without its most negative code, e.g. [-127, 127].")
@click.option("--scale-search", type=click.Choice(["minmax", "mse"]), default="minmax", show_default=True,
              help="Per-channel scale from the range, or OBQ's search over shrunk ranges.")
@click.option("--group-size", type=click.IntRange(min=1), metavar="N",
              help="One scale per N consecutive inputs of each output channel (GPTQ's groups; in QDQ, "
                   "DequantizeLinear's block_size, opset 21). Default: one scale per output channel.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="qdq", show_default=True,
              help="qdq: integer weights + DequantizeLinear (TensorRT, onnxruntime); "
                   "fake: float weights on the grid, same graph.")
@click.option("--opset", type=click.IntRange(7, 30), help="Convert the model to this opset first "
              "(qdq needs 13+; 21+ stores weights of 4 bits and below as INT4).")
@click.option("--act-bits", type=click.Choice([str(b) for b in ACT_BITS]),
              help="Also quantize each quantized layer's input activation: 8 = INT8, one scale per tensor, "
                   "zero-point 0, as QuantizeLinear/DequantizeLinear before the layer (TensorRT's explicit "
                   "INT8). Default: weights only.")
@click.option("--act-calib", type=click.Choice(ACT_CALIBRATIONS),
              help="How --act-bits sets each scale from the calibration data: mse (default): the clipping point "
                   f"of least squared error; max: max |x|; percentile: the {PERCENTILE}th percentile of |x|.")
@click.option("--act-exclude", multiple=True, type=Glob(),
              help="With --act-bits, keep the inputs of layers whose name or weight matches in float (their "
                   "weights are still quantized). Repeatable.")
@calib_options
@click.option("--bn-reestimate/--no-bn-reestimate", default=True, show_default=True,
              help="Re-estimate BatchNorm statistics on the quantized model (kept only if the output error drops).")
@click.option("--bn-mode", type=click.Choice(["match", "reestimate"]), default="match", show_default=True,
              help="match: statistics that make each BN output match the float model's on the calibration "
                   "data; reestimate: the quantized model's own statistics (the paper; needs calibration "
                   "data that looks like the training data).")
@click.option("--bn-fold/--no-bn-fold", default=True, show_default=True,
              help="Fold re-estimated BatchNormalization nodes into the Conv before them.")
@click.option("--bn-correct/--no-bn-correct", default=True, show_default=True,
              help="For Convs with no BatchNormalization after them, match each channel's output mean/std "
                   "to the float model.")
@click.option("--bn-samples", type=SamplesOrAll(), default=str(DEFAULT_BN_SAMPLES), show_default=True, metavar="N|all",
              help="Run the BN passes on N calibration samples at even steps through them (whole batches where "
                   "the model fixes one), or on all of them.")
@click.option("--exclude", multiple=True, type=Glob(), help="Leave layers whose name or weight matches in float. Repeatable.")
@click.option("--op-types", type=OpTypes(), multiple=True, help="Quantize only layers of these ops, e.g. "
              "'MatMul,Gemm' (default: Conv, Gemm and MatMul); the others stay in float. Repeatable.")
@click.option("--layer-bits", multiple=True, type=GlobBits(),
              help="Give layers whose name or weight matches GLOB this bit width instead of --bits, e.g. "
                   "'conv1=8'. Repeatable; the first match wins.")
@click.option("--layer-group-size", multiple=True, type=GlobBits("group"),
              help="Give layers whose name or weight matches GLOB this group size instead of --group-size "
                   "(0: one scale per output channel), e.g. '*MatMul*=128'. Repeatable; the first match wins.")
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True,
              help="Where Hessians and solver run: auto uses CuPy on a GPU when present.")
@click.option("--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True,
              help="Solver arithmetic (auto: float64 on the CPU, float32 on a GPU).")
@click.option("--report", "report_path", help="Also write the report as JSON here.")
@click.option("--save-hessians", metavar="FILE.npz",
              help="Also save the captured Hessians here, to reuse them with --hessians.")
@click.option("--hessians", "hessians_path", metavar="FILE.npz",
              help="Use Hessians saved by --save-hessians from the same model and --calib options "
                   "instead of capturing them (--calib is still read for BN re-estimation).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars and no table.")
def quantize(model, output, bits, method, order, damp, damp_mode, block, symmetric, narrow_range,
             scale_search, group_size, fmt, opset, act_bits, act_calib, act_exclude, bn_reestimate, bn_mode, bn_fold, bn_correct, bn_samples,
             exclude, op_types, layer_bits, layer_group_size, device, precision, report_path, save_hessians, hessians_path, quiet, **calib_kw):
    """Quantize the weights of every Conv, Gemm and MatMul of MODEL (and, with --act-bits, their inputs)."""
    if order is not None and METHODS_WITHOUT_ORDER.intersection({method}):
        raise click.BadParameter(f"--method {method} has no column order; drop --order",
                                 param_hint="--order")
    if act_exclude and act_bits is None:
        raise click.BadParameter(f"--act-exclude {act_exclude[0]} keeps some layer inputs out of --act-bits; give "
                                 "--act-bits 8 or drop --act-exclude", param_hint="--act-exclude")
    if act_calib is not None and act_bits is None:
        raise click.BadParameter(f"--act-calib {act_calib} sets the scales of --act-bits; give --act-bits 8 "
                                 "or drop --act-calib", param_hint="--act-calib")
    if narrow_range and not symmetric:
        raise click.BadParameter("--narrow-range needs a symmetric grid; drop --asymmetric",
                                 param_hint="--narrow-range")
    if output is None:
        stem = os.path.splitext(model)[0]
        groups = "" if group_size is None else f"g{group_size}"
        output = f"{stem}.w{bits}{groups}{'' if act_bits is None else 'a' + act_bits}.{fmt}.onnx"
    for option, path in (("--report", report_path), ("--save-hessians", save_hessians)):
        if path is not None:
            _check_side_file(path, option, model, output)
    _check_clashes({"--output": output, "--report": report_path, "--save-hessians": save_hessians},
                   {"--calib": calib_kw["calib"], "--hessians": hessians_path})
    cfg = QuantizeConfig(
        model=model, output=output, calib=calib_config(calib_kw),
        solve=SolveConfig(method=method, order=order, block=block,
                          damp=Damping(damp, relative=damp_mode == "relative"),
                          grid=GridSpec(bits=bits, symmetric=symmetric, narrow=narrow_range, search=scale_search,
                                       group_size=group_size or 0),
                          precision=precision),
        format=fmt, opset=opset,
        bn=BNConfig(reestimate=bn_reestimate, mode=bn_mode, fold=bn_fold, correct_folded=bn_correct,
                     samples=bn_samples),
        device=device, exclude=tuple(exclude), op_types=tuple(dict.fromkeys(op for ops in op_types for op in ops)), layer_bits=tuple(layer_bits),
        layer_group_size=tuple(layer_group_size), report=report_path,
        hessians=hessians_path, save_hessians=save_hessians, act_bits=None if act_bits is None else int(act_bits),
        act_calib=act_calib or "mse", act_exclude=tuple(act_exclude))
    report = pipeline.run(cfg, BarProgress(not quiet))
    if not quiet:
        click.echo(pipeline.layer_table(report))
        click.echo()
    for line in pipeline.summary_lines(report):
        if not quiet or line.startswith("wrote"):
            click.echo(line)


def _check_side_file(path: str, option: str, model: str, output: str) -> None:
    """Refuse a --report or --save-hessians path that would overwrite the input or output model,
    or cannot be written."""
    example = "hessians.npz" if option == "--save-hessians" else "report.json"
    real = os.path.realpath(path)
    for other, what in ((model, "the input model"), (output, "the output model"),
                        (output + ".data", "the output model's data")):
        if real == os.path.realpath(other):
            raise click.BadParameter(f"{path}: this is {what}; give another file, e.g. {example}",
                                     param_hint=option)
    if os.path.isdir(real):
        raise click.BadParameter(f"{path}: is a folder; give a file name, e.g. {example}", param_hint=option)
    if os.path.exists(real) and not os.path.isfile(real):
        raise click.BadParameter(f"{path}: is not a regular file (a device or a pipe), which the atomic rename "
                                 f"would replace; give a file name, e.g. {example}", param_hint=option)
    parent = os.path.dirname(real)
    if not os.path.isdir(parent):
        raise click.BadParameter(f"{path}: folder {parent} does not exist; create it first", param_hint=option)


def _check_clashes(written: dict, read: dict) -> None:
    """Refuse a file that the run writes where it reads another input (--calib's file,
    --hessians), or that two options would both write."""
    seen = {}
    for option, path in written.items():
        if path is None:
            continue
        real = os.path.realpath(path)
        for other, source in read.items():
            if source is not None and os.path.isfile(source) and real == os.path.realpath(source):
                raise click.BadParameter(f"{path}: this is the {other} file, an input; give another path",
                                         param_hint=option)
        if real in seen:
            raise click.BadParameter(f"{path}: {seen[real]} writes there too; give two different files",
                                     param_hint=option)
        seen[real] = option


@cli.command()
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="Print the table as JSON.")
def inspect(model, as_json):
    """List the layers onnxobq would quantize, and those it would leave in float."""
    scan, notes = pipeline.inspect_model(model)
    if as_json:
        from dataclasses import asdict
        click.echo(json.dumps({"layers": [asdict(l) for l in scan.layers],
                               "skipped": [asdict(s) for s in scan.skipped], "notes": notes}, indent=2, default=str))
        return
    rows = [("layer", "op", "weight", "weight shape", "d_row x d_col", "groups", "weight lives in")]
    for l in scan.layers:       # (--exclude and the other globs match the layer, weight and sharing nodes' names)
        source = l.source + (f" (also {', '.join(name for name, _, _ in l.uses)})" if l.uses else "")
        rows.append((l.name, l.op, l.weight, "x".join(map(str, l.shape)), f"{l.rows}x{l.cols}", str(l.groups), source))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    click.echo("\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows[:1]))
    click.echo("  ".join("-" * w for w in widths))
    click.echo("\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows[1:]))
    params = sum(l.groups * l.rows * l.cols for l in scan.layers)
    by_op = {}
    for l in scan.layers:
        by_op[l.op] = by_op.get(l.op, 0) + 1
    click.echo(f"\n{len(scan.layers)} quantizable layers (" + ", ".join(f"{n} {op}" for op, n in by_op.items())
               + f"), {params:,} weights; {len(scan.skipped)} left in float")
    for s in scan.skipped:
        click.echo(f"skipped: {s.name} ({s.op}): {s.reason}")
    for note in notes:
        click.echo(f"note: {note}")


@cli.command()
@click.argument("float_model")
@click.argument("quant_model")
@calib_options
@click.option("--device", type=click.Choice(DEVICES), default="cpu", show_default=True,
              help="onnxruntime device (cuda needs onnxruntime-gpu).")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
def compare(float_model, quant_model, device, as_json, **calib_kw):
    """Compare FLOAT_MODEL with QUANT_MODEL on calibration data: SQNR, cosine, top-1 agreement."""
    calib = calib_config(calib_kw)
    if calib is None:
        raise click.BadParameter("give the data to compare on, e.g. --calib images/ or --calib random",
                                 param_hint="--calib")
    results = pipeline.compare(float_model, quant_model, calib, device, BarProgress(not as_json))
    if as_json:
        click.echo(json.dumps(results, indent=2))
        return
    click.echo(f"{'output':30s} {'SQNR dB':>9s} {'cosine':>9s} {'top-1 agree':>12s}")
    for r in results:
        top1 = "-" if r["top1_agreement"] is None else f"{r['top1_agreement']:.4f}"
        click.echo(f"{r['output'][:30]:30s} {r['sqnr_db']:9.2f} {r['cosine']:9.5f} {top1:>12s}")
    if any(r["top1_agreement"] is not None for r in results):
        click.echo("top-1 agree: how often the argmax over the last axis is the same; it is shown for 2-D "
                   "outputs and probabilities, and means something for classifier outputs only")


def main(argv=None) -> int:
    """Entry point: every user error is one line on stderr with exit status 2."""
    if not (sys.argv[1:] if argv is None else argv):
        click.echo(cli.get_help(click.Context(cli, info_name="onnxobq")))   # no command: the help, as click shows it
        return 0
    try:
        cli.main(args=argv, prog_name="onnxobq", standalone_mode=False)
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.exceptions.Abort:
        BarProgress.close_all()
        click.echo("onnxobq: aborted", err=True)
        return 130
    except click.ClickException as e:
        BarProgress.close_all()
        click.echo(f"onnxobq: error: {_one_line(e.format_message())}", err=True)
        return 2
    except UserError as e:
        BarProgress.close_all()
        click.echo(f"onnxobq: error: {_one_line(str(e))}", err=True)
        return 2
    except MemoryError:
        BarProgress.close_all()
        click.echo("onnxobq: error: out of memory; use fewer --samples, a smaller --batch-size, "
                   "or a machine with more memory", err=True)
        return 2
    except OSError as e:  # a file system problem with a path the user gave: permissions, disk full, ...
        BarProgress.close_all()
        where = f"{e.filename}: " if e.filename else ""
        click.echo(f"onnxobq: error: {where}{_one_line(e.strerror or str(e))}; "
                   "check the path, its permissions and the free disk space", err=True)
        return 2
    except KeyboardInterrupt:
        BarProgress.close_all()
        click.echo("onnxobq: interrupted", err=True)
        return 130
    finally:
        BarProgress.close_all()
    return 0


def _one_line(text: str) -> str:
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
