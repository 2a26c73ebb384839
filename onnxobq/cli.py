"""Command line: ``onnxobq quantize | inspect | compare``. Flags -> the Python API -> bars and tables.

click parses each flag into the API's argument (a flag of the wrong type fails there, in click's
words); every rule about the settings, the files and the data is the API's, its messages spelled
with the flags (FLAGS); the results are shown as tables and a summary.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys

import click

from . import api
from .config import DEFAULT_BN_SAMPLES, DEVICES, FORMATS, IMAGE_PRESETS, PRECISIONS
from .errors import UserError, spelled_as
from .files import default_output
from .pipeline import Progress
from .quant.activations import ACT_BITS, ACT_CALIBRATIONS, PERCENTILE
from .report import layer_table, summary_lines, weights_line
from .solvers import METHODS, ORDERS
from .types import QUANTIZABLE_OPS as OP_TYPES, fmt_shape

METHOD_NAMES = tuple(sorted(METHODS))
# The flag of each Python parameter, for the API's messages (errors.option); a boolean's other
# flag and a special value are keyed "name=value".
FLAGS = {name: "--" + name.replace("_", "-") for name in (
    "output", "samples", "batch_size", "preset", "size", "resize", "crop_fraction", "pad_value", "pad_align",
    "channel_order", "scale", "mean", "std", "layout", "seed", "bits", "method", "order", "damp", "damp_mode",
    "block", "symmetric", "narrow_range", "scale_search", "group_size", "format", "opset", "act_bits",
    "act_calib", "act_exclude", "bn_reestimate", "bn_mode", "bn_fold", "bn_correct", "bn_samples", "exclude",
    "op_types", "layer_bits", "layer_group_size", "device", "precision", "report", "hessians", "save_hessians",
    "overwrite")} | {"calibration": "--calib", "input_shapes": "--input-shape", "preprocess": "--preset",
                     "symmetric=False": "--asymmetric", "bn_reestimate=False": "--no-bn-reestimate",
                     "bn_samples=None": "--bn-samples all", "model": "MODEL"}


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


class BarProgress(Progress):
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
            self.bar = tqdm(total=total, desc=what, unit="layer" if what == "layers" else "sample",
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




# The image options of calib_options, by the keyword click gives each, and their API names.
IMAGE_FLAGS = {"preset": "preset", "size": "size", "resize": "resize", "crop_fraction": "crop_fraction",
               "pad_value": "pad_value", "pad_align": "pad_align", "channel_order": "channel_order",
               "pixel_scale": "scale", "mean": "mean", "std": "std", "layout": "layout"}


def calibration_args(kw) -> dict:
    """The API's calibration arguments from calib_options' flags."""
    given = {"size": _size(kw["size"]), "mean": _floats(kw["mean"], "--mean"), "std": _floats(kw["std"], "--std")}
    preprocess = {name: given.get(key, kw[key]) for key, name in IMAGE_FLAGS.items() if kw[key] is not None}
    return dict(calibration=kw["calib"], samples=kw["samples"], batch_size=kw["batch_size"],
                preprocess=preprocess or None, input_shapes=_shapes(kw["input_shapes"]) or None, seed=kw["seed"])


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="onnxobq")
def cli():
    """onnxobq: Hessian-based (FastOBQ) post-training weight quantization of ONNX models."""


@cli.command()
@click.argument("model")
@click.option("-o", "--output", help="Output model (default: beside MODEL, named for the settings, e.g. "
              "MODEL.w4.fastobq.qdq.onnx).")
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
@click.option("--overwrite", is_flag=True, help="Replace existing output, report and Hessian files (else an error).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars and no table.")
def quantize(model, output, bits, method, order, damp, damp_mode, block, symmetric, narrow_range, scale_search,
             group_size, fmt, opset, act_bits, act_calib, act_exclude, bn_reestimate, bn_mode, bn_fold, bn_correct,
             bn_samples, exclude, op_types, layer_bits, layer_group_size, device, precision, report_path,
             save_hessians, hessians_path, overwrite, quiet, **calib_kw):
    """Quantize the weights of every Conv, Gemm and MatMul of MODEL (and, with --act-bits, their inputs)."""
    act_bits = None if act_bits is None else int(act_bits)
    if output is None:
        output = default_output(model, bits, method, fmt, group_size, act_bits, calib_kw["calib"] == "random")
    report = api.quantize(
        model, output, **calibration_args(calib_kw), bits=bits, method=method, order=order, damp=damp,
        damp_mode=damp_mode, block=block, symmetric=symmetric, narrow_range=narrow_range, scale_search=scale_search,
        group_size=group_size, format=fmt, opset=opset, act_bits=act_bits, act_calib=act_calib,
        act_exclude=act_exclude, bn_reestimate=bn_reestimate, bn_mode=bn_mode, bn_fold=bn_fold,
        bn_correct=bn_correct, bn_samples=bn_samples, exclude=exclude,
        op_types=tuple(op for ops in op_types for op in ops), layer_bits=layer_bits,
        layer_group_size=layer_group_size, device=device, precision=precision, report=report_path,
        hessians=hessians_path, save_hessians=save_hessians, overwrite=overwrite, progress=BarProgress(not quiet))
    try:
        if not quiet:
            click.echo(layer_table(report))
            click.echo()
        for line in summary_lines(report):
            if not quiet or line.startswith("wrote"):
                click.echo(line)
    except BrokenPipeError:     # the reader stopped (| head): the run itself is done
        raise
    except OSError as exc:      # stdout on a full disk, say: a run that reports failure leaves no output
        for path in [*report.outputs, report_path, save_hessians]:
            if path and os.path.exists(path):
                os.unlink(path)
        raise UserError(f"standard output: cannot write the summary ({exc.strerror or type(exc).__name__}); "
                        "nothing was kept: send the output where it can be written, or give -q") from None


@cli.command()
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="Print the table as JSON.")
def inspect(model, as_json):
    """List the model's inputs and the layers onnxobq would quantize, and those it would leave in float."""
    found = api.inspect(model)
    if as_json:
        click.echo(json.dumps(found.to_dict(), indent=2, default=str))
        return
    rows = [("layer", "op", "weight", "weight shape", "d_row x d_col", "groups", "weight lives in")]
    for l in found.quantizable:     # (--exclude and the other globs match the layer, weight and sharing nodes' names)
        source = l.source + (f" (also {', '.join(l.shared_with)})" if l.shared_with else "")
        rows.append((l.name, l.op, l.weight, "x".join(map(str, l.shape)), f"{l.rows}x{l.cols}", str(l.groups), source))
    click.echo(_table(rows))
    by_op = {}
    for l in found.quantizable:
        by_op[l.op] = by_op.get(l.op, 0) + 1
    params = sum(l.groups * l.rows * l.cols for l in found.quantizable)
    click.echo(f"\n{len(found.quantizable)} quantizable layers (" + ", ".join(f"{n} {op}" for op, n in by_op.items())
               + f"), {params:,} weights; {len(found.skipped)} left in float")
    click.echo(weights_line(found.weights))
    click.echo("inputs: " + "; ".join(f"{i.name} {fmt_shape(i.shape)} {i.dtype}" for i in found.inputs)
               + " (give --size or --input-shape for a dynamic ?)" * any(None in i.shape for i in found.inputs))
    for s in found.skipped:
        click.echo(f"skipped: {s.name} ({s.op}): {s.reason}")
    for note in found.notes:
        click.echo(f"note: {note}")


def _table(rows) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


@cli.command()
@click.argument("float_model")
@click.argument("quant_model")
@calib_options
@click.option("--device", type=click.Choice(DEVICES), default="cpu", show_default=True,
              help="onnxruntime device (cuda needs onnxruntime-gpu).")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
def compare(float_model, quant_model, device, as_json, **calib_kw):
    """Compare FLOAT_MODEL with QUANT_MODEL on calibration data: SQNR, cosine, top-1 agreement."""
    result = api.compare(float_model, quant_model, **calibration_args(calib_kw), device=device,
                         progress=BarProgress(not as_json))
    if as_json:
        click.echo(json.dumps([a.to_dict() for a in result.outputs], indent=2))
        return
    click.echo(f"{'output':30s} {'SQNR dB':>9s} {'cosine':>9s} {'top-1 agree':>12s}")
    for r in result.outputs:
        top1 = "-" if r.top1_agreement is None else f"{r.top1_agreement:.4f}"
        click.echo(f"{r.output[:30]:30s} {r.sqnr_db:9.2f} {r.cosine:9.5f} {top1:>12s}")
    if any(r.top1_agreement is not None for r in result.outputs):
        click.echo("top-1 agree: how often the argmax over the last axis is the same; it is shown for 2-D "
                   "outputs and probabilities, and means something for classifier outputs only")
    click.echo(f"on {result.samples} samples of {_described(result.calibration)}")
    for warning in result.warnings:
        click.echo(f"warning: {warning}")


def _described(calibration: dict) -> str:
    """The data compare ran on, in words: the source, and the pre-processing of images."""
    if calibration["kind"] == "random":
        return f"--calib random --seed {calibration['seed']}"
    text = f"--calib {calibration['source']}"
    if calibration["kind"] == "images":
        image, default = calibration["image"], api.ImageOptions()
        changed = {k: v for k, v in image.items() if v != _plain(getattr(default, k))}
        text += " (images: " + (", ".join(f"{k}={v}" for k, v in changed.items()) or "the default stretch, RGB, x/255") + ")"
    return text


def _plain(v):
    return list(v) if isinstance(v, tuple) else v


def main(argv=None) -> int:
    """Entry point: every user error is one line on stderr with exit status 2."""
    if not (sys.argv[1:] if argv is None else argv):
        click.echo(cli.get_help(click.Context(cli, info_name="onnxobq")))   # no command: the help, as click shows it
        return 0
    try:
        # click's own main would turn Ctrl-C into Abort after a blank line on stderr
        with spelled_as(FLAGS), cli.make_context("onnxobq", list(sys.argv[1:] if argv is None else argv)) as ctx:
            cli.invoke(ctx)
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.exceptions.Abort:       # a prompt's Ctrl-C or end of input
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
    except BrokenPipeError:      # the reader of stdout stopped (onnxobq inspect | head): as head expects
        _quiet_stdout()
        return 0
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
    except KeyboardInterrupt as e:      # Ctrl-C, or SIGTERM (__main__.Terminated)
        BarProgress.close_all()
        terminated = type(e).__name__ == "Terminated"
        click.echo(f"onnxobq: {'terminated' if terminated else 'interrupted'}", err=True)
        return 143 if terminated else 130
    finally:
        BarProgress.close_all()
    return 0


def _quiet_stdout() -> None:
    """Point stdout at /dev/null, so that Python's flush at exit does not fail on the closed pipe."""
    with contextlib.suppress(OSError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


def _one_line(text: str) -> str:
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
