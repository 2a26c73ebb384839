"""Calibration data: a folder of images, .npy/.npz arrays, or random tensors, as batches of feeds.

Every source yields *chunks*: dicts from input name to an array whose first axis
counts samples. :func:`batches` re-cuts the chunks into the batch size the model
takes (its fixed batch dimension, or ``--batch-size`` where that is dynamic), so
host memory holds one batch at a time.
"""
from __future__ import annotations

import copy
import dataclasses
import glob
import math
import os
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from .errors import UserError, cannot_read

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
ARRAY_EXTENSIONS = (".npy", ".npz")


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


@dataclass(frozen=True)
class CalibConfig:
    """Where the calibration data comes from and how much of it to use.

    Args:
        source: a folder of images, a folder/file of .npy/.npz, or "random".
        samples: use at most this many samples (None: all; random: 8).
        batch_size: samples per run where the model's batch dimension is dynamic.
        image: image pre-processing.
        shapes: sizes for dynamic dimensions of random inputs, by input name.
        seed: random seed for the "random" source.
        pick: only the samples at these positions of the source (counted from 0, after the
            ``samples`` cut), in order; see :func:`spread`.
        given: the options the user set for one kind of source (``--mean``, ``--input-shape``,
            ...), so that one set for another kind is an error rather than silently unused.
    """

    source: str = "random"
    samples: int | None = None
    batch_size: int = 8
    image: ImageOptions = field(default_factory=ImageOptions)
    shapes: dict = field(default_factory=dict)
    seed: int = 0
    pick: tuple[int, ...] | None = None
    given: tuple[str, ...] = ()


# ----------------------------------------------------------------------------- sources

def detect_kind(source: str) -> str:
    """Which registered source reads ``source``: "random", "images" or "arrays"."""
    if source == "random":
        return "random"
    if os.path.isfile(source):
        if source.lower().endswith(ARRAY_EXTENSIONS):
            return "arrays"
        if source.lower().endswith(IMAGE_EXTENSIONS):
            return "images"
        raise UserError(f"--calib {source}: not an image, .npy or .npz file; "
                        "give a folder of images, .npy/.npz files, or 'random'")
    if not os.path.isdir(source):
        raise UserError(f"--calib {source}: no such file or folder; "
                        "give a folder of images, .npy/.npz files, or 'random'")
    names = sorted(os.listdir(source))
    if any(n.lower().endswith(ARRAY_EXTENSIONS) for n in names):
        return "arrays"
    if any(n.lower().endswith(IMAGE_EXTENSIONS) for n in names):
        return "images"
    raise UserError(f"--calib {source}: the folder holds no .jpg/.png/.bmp images "
                    "and no .npy/.npz files; add calibration data or use --calib random")


# Options that apply to one kind of source only (the others are checked by source_kind).
RANDOM_ONLY = ("--input-shape",)
# Image options that apply to one --resize mode only.
RESIZE_ONLY = {"--crop-fraction": "crop", "--pad-value": "letterbox", "--pad-align": "letterbox"}


def source_kind(cfg: CalibConfig) -> str:
    """detect_kind of the source, after checking that the options given apply to it.

    Raises:
        UserError: an image option with arrays or random tensors, or --input-shape with
            files, whose shapes are their own, or one for another --resize mode.
    """
    kind = detect_kind(cfg.source)
    image = [o for o in cfg.given if o not in RANDOM_ONLY]
    if image and kind != "images":
        what = "draws random tensors" if kind == "random" else "holds arrays, fed as they were saved"
        if kind == "arrays" and os.path.isdir(cfg.source) and _list_files(cfg.source, IMAGE_EXTENSIONS):
            raise UserError(f"--calib {cfg.source}: the folder's .npy/.npz files are read, not its images; "
                            "move the arrays out to calibrate on the images, or drop "
                            f"{', '.join(image)} to use the arrays")
        raise UserError(f"--calib {cfg.source}: {what}, and {', '.join(image)} apply to image folders "
                        f"only; drop {', '.join(image)}")
    if any(o in RANDOM_ONLY for o in cfg.given) and kind != "random":
        raise UserError(f"--calib {cfg.source}: --input-shape sizes the tensors of --calib random, and these "
                        "files have their own shapes; drop --input-shape")
    for flag, resize in RESIZE_ONLY.items():
        if flag in cfg.given and cfg.image.resize != resize:
            raise UserError(f"{flag} applies to --resize {resize} only, and the images are resized by "
                            f"{cfg.image.resize}; add --resize {resize} or drop {flag}")
    return kind


def _list_files(source: str, extensions) -> list[str]:
    if os.path.isfile(source):
        return [source]
    return sorted(p for p in glob.glob(os.path.join(source, "*"))
                  if p.lower().endswith(extensions) and os.path.isfile(p))


def random_samples(cfg: CalibConfig, inputs: list[InputSpec]) -> int:
    """How many random samples to draw: ``cfg.samples``, else 8 (at least one fixed batch)."""
    if cfg.samples is not None:
        return cfg.samples
    fixed = [s.fixed_batch for s in inputs if s.fixed_batch is not None]
    return max([8] + fixed)


def random_shapes(cfg: CalibConfig, inputs: list[InputSpec]) -> dict:
    """Per input, the shape of one random sample (no batch axis), dynamic dims from ``cfg.shapes``."""
    names = [s.name for s in inputs]
    unknown = [n for n in cfg.shapes if n not in names]
    if unknown:
        raise UserError(f"--input-shape {unknown[0]}=...: the model has no input '{unknown[0]}'; "
                        f"its inputs are {', '.join(names)}")
    shapes = {}
    for spec in inputs:
        dims = list(spec.shape[1:])
        example = "x".join("1" if i == 0 else (str(d) if d is not None else "?")
                           for i, d in enumerate(spec.shape))
        given = cfg.shapes.get(spec.name)
        if given is not None:
            if len(given) == len(spec.shape):
                given = given[1:]
            if len(given) != len(spec.shape) - 1:
                raise UserError(f"--input-shape {spec.name}={'x'.join(map(str, cfg.shapes[spec.name]))}: "
                                f"input '{spec.name}' has rank {len(spec.shape)} {_fmt_shape(spec.shape)}; "
                                f"give all {len(spec.shape)} dimensions, e.g. {spec.name}={example}")
            for axis, (want, got) in enumerate(zip(spec.shape[1:], given), start=1):
                if (want is not None and want != got) and len(cfg.shapes[spec.name]) < len(spec.shape):
                    raise UserError(f"--input-shape {spec.name}={'x'.join(map(str, cfg.shapes[spec.name]))}: "
                                    f"read as one sample without the batch axis, it does not fit input "
                                    f"'{spec.name}' {_fmt_shape(spec.shape)}; give all {len(spec.shape)} "
                                    f"dimensions, e.g. {spec.name}={example}")
                if got < 1 or (want is not None and want != got):
                    raise UserError(f"--input-shape {spec.name}={'x'.join(map(str, cfg.shapes[spec.name]))}: "
                                    f"input '{spec.name}' is {_fmt_shape(spec.shape)} (axis {axis} must be "
                                    f"{want if want is not None else 'at least 1'}); match the model's fixed "
                                    "dimensions")
            dims = list(given)
        if any(d is None for d in dims):
            raise UserError(f"input '{spec.name}' has dynamic dimensions {_fmt_shape(spec.shape)} and "
                            f"--calib random needs sizes; give them with --input-shape {spec.name}={example}, "
                            "each ? a number")
        shapes[spec.name] = tuple(int(d) for d in dims)
    return shapes


def random_chunks(cfg: CalibConfig, inputs: list[InputSpec]) -> Iterator[dict]:
    """Seeded random tensors: standard normal for floats, 0/1 for integers and bools.

    float32 inputs draw float32 values (NumPy's float32 ziggurat): 256 inputs of 3 x 416 x 416
    (the YOLOX detector's) in chunks of 16 took 1.16 to 1.21 s against 1.53 to 1.72 s for
    float64 draws cast down, on the 2-core machine, and every pass over the data (the capture
    and BatchNorm's passes) draws them again."""
    rng = np.random.default_rng(cfg.seed)
    total = random_samples(cfg, inputs)
    shapes = random_shapes(cfg, inputs)
    check_batch_bytes(cfg, inputs, sum(math.prod(shapes[s.name]) * np.dtype(s.dtype).itemsize for s in inputs),
                      "give smaller --input-shape sizes")
    step = 16
    for start in range(0, total, step):
        n = min(step, total - start)
        chunk = {}
        for spec in inputs:
            shape = (n,) + shapes[spec.name]
            if spec.dtype in (np.float32, np.float64):   # drawn in that dtype, not cast from float64
                chunk[spec.name] = rng.standard_normal(shape, dtype=spec.dtype)
            elif np.issubdtype(spec.dtype, np.floating):
                chunk[spec.name] = rng.standard_normal(shape, dtype=np.float32).astype(spec.dtype)
            else:
                chunk[spec.name] = rng.integers(0, 2, size=shape).astype(spec.dtype)
        yield chunk


def array_chunks(cfg: CalibConfig, inputs: list[InputSpec]) -> Iterator[dict]:
    """Arrays from .npy (single-input models) or .npz files keyed by input name.

    Each array either includes the batch axis (same rank as the model input) or is
    one sample (rank one less).
    """
    names = [s.name for s in inputs]
    for path in _list_files(cfg.source, ARRAY_EXTENSIONS):
        try:
            data = np.load(path, allow_pickle=False)
            if isinstance(data, np.ndarray):
                arrays = None
            else:
                with data:
                    arrays = {k: data[k] for k in data.files}
        except PermissionError as exc:
            raise cannot_read(f"--calib {path}", exc) from None
        except Exception as exc:
            raise UserError(f"--calib {path}: cannot read it ({type(exc).__name__}); "
                            "give .npy/.npz files saved with numpy (no pickled objects)") from None
        if arrays is None:
            if len(inputs) != 1:
                raise UserError(f"--calib {path}: a .npy file feeds a single input, but the model "
                                f"has inputs {', '.join(names)}; use .npz files keyed by input name")
            arrays = {names[0]: data}
        else:
            missing = [n for n in names if n not in arrays]
            extra = [k for k in arrays if k not in names]
            if missing or extra:
                raise UserError(f"--calib {path}: keys {sorted(arrays)} do not match the model inputs "
                                f"{names}; name the .npz arrays after the inputs")
        yield {s.name: _as_batch(arrays[s.name], s, path) for s in inputs}


def image_chunks(cfg: CalibConfig, inputs: list[InputSpec]) -> Iterator[dict]:
    """Images, decoded with Pillow and pre-processed by ``cfg.image``, one per chunk."""
    if len(inputs) != 1:
        raise UserError(f"--calib {cfg.source}: images can feed only a single-input model; "
                        f"this one has {', '.join(s.name for s in inputs)}; use .npz files")
    spec = inputs[0]
    files = _list_files(cfg.source, IMAGE_EXTENSIONS)
    if not files:
        raise UserError(f"--calib {cfg.source}: no .jpg/.png/.bmp images found; add images")
    if cfg.pick is not None:          # one sample per file: the others are not decoded
        files = [files[i] for i in cfg.pick if i < len(files)]
    layout, channels, size = _image_geometry(spec, cfg.image)
    check_batch_bytes(cfg, inputs, channels * size[0] * size[1] * 4,
                      "give a smaller --size" if cfg.image.size else "use a machine with more memory")
    opts = cfg.image
    integer = not np.issubdtype(spec.dtype, np.floating)
    if opts.scale is None:
        opts = dataclasses.replace(opts, scale=1.0 if integer else 1.0 / 255.0)
    for path in files:
        x = preprocess_image(path, opts, layout, channels, size)[None]
        if integer:  # round and saturate, as an image decoder would, rather than truncate and wrap
            info = np.iinfo(spec.dtype) if spec.dtype != bool else None
            x = np.rint(x) if info is None else np.clip(np.rint(x), info.min, info.max)
        yield {spec.name: x.astype(spec.dtype)}


def check_batch_bytes(cfg: CalibConfig, inputs: list[InputSpec], sample_bytes: int, fix: str) -> None:
    """Refuse samples whose batch alone takes over a quarter of this machine's memory: the
    model's activations take several times more, and the kernel's OOM killer would end the run
    with no message."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    batch = batch_size_for(cfg, inputs)
    if sample_bytes * batch > memory // 4:
        if batch > 1 and all(s.fixed_batch is None for s in inputs):
            fix += ", or a smaller --batch-size"
        raise UserError(f"--calib {cfg.source}: a batch of {batch} sample{'s' if batch > 1 else ''} takes "
                        f"{sample_bytes * batch / 2 ** 30:,.1f} GiB, over a quarter of this machine's "
                        f"{memory / 2 ** 30:,.1f} GiB; {fix}")


SOURCES = {"random": random_chunks, "arrays": array_chunks, "images": image_chunks}
# Sources that apply CalibConfig.pick themselves, yielding only the picked samples.
PICKING_SOURCES = {"images"}


# ----------------------------------------------------------------------------- images

def _image_geometry(spec: InputSpec, opts: ImageOptions):
    """Layout, channel count and (H, W) of an image input."""
    if len(spec.shape) != 4:
        raise UserError(f"input '{spec.name}' has shape {_fmt_shape(spec.shape)}, not an image "
                        "(N, C, H, W or N, H, W, C); use .npy/.npz calibration data")
    layout = opts.layout
    if layout is None:
        layout = "nhwc" if spec.shape[3] in (1, 3) and spec.shape[1] not in (1, 3) else "nchw"
    channels = spec.shape[1] if layout == "nchw" else spec.shape[3]
    if channels not in (1, 3):
        raise UserError(f"input '{spec.name}' {_fmt_shape(spec.shape)} has "
                        f"{'?' if channels is None else channels} channels in {layout} layout, not 1 or 3; "
                        "set --layout, or use .npy/.npz calibration data")
    for what, values in (("--mean", opts.mean), ("--std", opts.std)):
        if len(values) not in (1, channels):
            raise UserError(f"{what} {','.join(f'{v:g}' for v in values)}: {len(values)} values, but input "
                            f"'{spec.name}' has {channels} channel{'s' if channels > 1 else ''}; "
                            + ("give 1 value" if channels == 1 else f"give 1 or {channels} values")
                            + " (an explicit option overrides --preset)")
    if any(v == 0 for v in opts.std):
        raise UserError(f"--std {','.join(f'{v:g}' for v in opts.std)}: a standard deviation of 0; "
                        "give non-zero values")
    hw = spec.shape[2:4] if layout == "nchw" else spec.shape[1:3]
    size = opts.size
    if size is None:
        if any(d is None for d in hw):
            raise UserError(f"input '{spec.name}' has a dynamic image size {_fmt_shape(spec.shape)}; "
                            "give one with --size HxW")
        size = (int(hw[0]), int(hw[1]))
    elif all(d is not None for d in hw) and tuple(size) != tuple(hw):
        raise UserError(f"--size {size[0]}x{size[1]} does not fit input '{spec.name}' "
                        f"{_fmt_shape(spec.shape)}; drop --size or match it")
    return layout, channels, size


def preprocess_image(path: str, opts: ImageOptions, layout: str, channels: int, size) -> np.ndarray:
    """Decode one image and turn it into a (C, H, W) or (H, W, C) float32 array."""
    from PIL import Image

    try:
        img = Image.open(path)
        img = img.convert("L" if channels == 1 else "RGB")
    except PermissionError as exc:
        raise cannot_read(f"--calib {path}", exc) from None
    except Exception as exc:
        raise UserError(f"--calib {path}: cannot decode the image ({type(exc).__name__}); "
                        "remove or replace the file") from None
    x = _resize(img, opts, size)
    if x.ndim == 2:
        x = x[..., None]        # (H, W, 1): mean/std broadcast over the channel, never the width
    if channels == 3 and opts.channel_order == "bgr":
        x = x[..., ::-1]
    x = x * (1.0 / 255.0 if opts.scale is None else opts.scale)
    x = (x - np.asarray(opts.mean, np.float32)) / np.asarray(opts.std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1) if layout == "nchw" else x, dtype=np.float32)


def _resize(img, opts: ImageOptions, size) -> np.ndarray:
    from PIL import Image

    h, w = size
    if opts.resize == "stretch":
        return np.asarray(img.resize((w, h), Image.BILINEAR), dtype=np.float32)
    if opts.resize == "crop":
        r = max(h / img.height, w / img.width) / opts.crop_fraction
        rw, rh = max(w, round(img.width * r)), max(h, round(img.height * r))
        img = img.resize((rw, rh), Image.BILINEAR)
        left, top = (rw - w) // 2, (rh - h) // 2
        return np.asarray(img.crop((left, top, left + w, top + h)), dtype=np.float32)
    r = min(h / img.height, w / img.width)
    rw, rh = max(1, round(img.width * r)), max(1, round(img.height * r))
    small = np.asarray(img.resize((rw, rh), Image.BILINEAR), dtype=np.float32)
    out = np.full((h, w) + small.shape[2:], opts.pad_value, dtype=np.float32)
    top, left = (0, 0) if opts.pad_align == "topleft" else ((h - rh) // 2, (w - rw) // 2)
    out[top:top + rh, left:left + rw] = small
    return out


# ----------------------------------------------------------------------------- batching

def _fmt_shape(shape) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _as_batch(a: np.ndarray, spec: InputSpec, where: str) -> np.ndarray:
    """Check an array against an input and give it a batch axis."""
    rank = len(spec.shape)
    one = _fmt_shape(spec.shape[1:])
    if a.ndim not in (rank, rank - 1):
        raise UserError(f"--calib {where}: input '{spec.name}' needs a batch {_fmt_shape(spec.shape)} or one "
                        f"sample {one}, got an array of shape {list(a.shape)}; save arrays of that shape")
    skip = 1 if a.ndim == rank else 0    # the array's batch axis, if it has one
    for axis, (want, have) in enumerate(zip(spec.shape[1:], a.shape[skip:]), start=skip):
        if want is not None and want != have:
            read = "a batch" if skip else "one sample"
            raise UserError(f"--calib {where}: input '{spec.name}' needs a batch {_fmt_shape(spec.shape)} or one "
                            f"sample {one}, got an array of shape {list(a.shape)} (read as {read}, its axis "
                            f"{axis} is {have} where the input needs {want}); save arrays of that shape")
    if a.ndim == rank - 1:
        a = a[None]
    want_float = np.issubdtype(spec.dtype, np.floating)
    if (want_float != np.issubdtype(a.dtype, np.floating) or (a.dtype == bool) != (spec.dtype == bool)
            or not (np.issubdtype(a.dtype, np.number) or a.dtype == bool)):
        raise UserError(f"--calib {where}: input '{spec.name}' needs {spec.dtype}, got {a.dtype}; "
                        f"save the array as {spec.dtype}")
    if want_float:
        bad = np.isnan(a).reshape(a.shape[0], -1).any(axis=1)
        if bad.any():      # infinities can be meant (attention masks); NaN never is
            raise UserError(f"--calib {where}: input '{spec.name}' holds NaN in {int(bad.sum())} of its "
                            f"{a.shape[0]} samples (the first at index {int(bad.argmax())}); "
                            "replace or drop those samples")
    return a.astype(spec.dtype, copy=False)


def batch_size_for(cfg: "CalibConfig | Replay", inputs: list[InputSpec]) -> int:
    """The model's fixed batch size where it has one, else ``cfg.batch_size`` (a Replay's source's)."""
    cfg = cfg.cfg if isinstance(cfg, Replay) else cfg
    fixed = {s.fixed_batch for s in inputs if s.fixed_batch is not None}
    if len(fixed) > 1:
        raise UserError(f"the model inputs fix different batch sizes {sorted(fixed)}; "
                        "onnxobq cannot batch them")
    return fixed.pop() if fixed else max(1, cfg.batch_size)


def feed_samples(feed: dict) -> int:
    """How many samples a batch of :func:`batches` holds."""
    return next(iter(feed.values())).shape[0]


def batches(calib: "CalibConfig | Replay", inputs: list[InputSpec]) -> Iterator[dict]:
    """Feeds for onnxruntime, ``batch_size_for`` samples each (a short last batch where
    the batch is dynamic; leftovers are dropped where the model fixes it), read from the
    source, or replayed from memory by a :class:`Replay`.

    Consecutive samples of different shapes (dynamic dims) go to different batches.
    """
    if isinstance(calib, Replay):
        return calib.batches(inputs)
    return (feed for _, feed in _read_batches(calib, inputs))


def spread(calib: "CalibConfig | Replay", samples: int | None, inputs: list[InputSpec]) -> "CalibConfig | Replay":
    """``calib`` cut to ``samples`` samples spread evenly over it (None, or at least as many as
    it has: all of them), rounded down to whole batches where the model fixes the batch (one
    batch at least).

    A calibration folder is often sorted by class or by kind (the first samples alike), so
    the samples are taken at even steps through it, not from its start. A Replay keeps
    serving them from the pass it kept. Where that pass has batches of several shapes under a
    fixed batch, whole batches of it are taken instead, so that the samples still fill some.
    """
    cfg = calib.cfg if isinstance(calib, Replay) else calib
    fixed = any(s.fixed_batch is not None for s in inputs)
    bs = batch_size_for(cfg, inputs)
    kept = calib.kept(inputs) if isinstance(calib, Replay) else None
    if kept is not None:
        positions = [at for at_batch, _ in kept for at in at_batch]            # what the capture used
    else:
        total = _source_samples(cfg, inputs)
        positions = range(total - total % bs if fixed else total)             # leftovers are dropped
    total = len(positions)
    if samples is None or samples >= total:
        return calib
    if fixed:
        samples = max(samples - samples % bs, bs)
        if samples >= total:
            return calib
    if fixed and kept is not None and len({_shapes(feed) for _, feed in kept}) > 1:
        # samples of other shapes never share a batch, so picks at even steps could fill none:
        # take whole batches of the capture's instead, at even steps through them
        n = samples // bs
        pick = tuple(at for j in range(n) for at in kept[j * len(kept) // n][0])
    else:
        pick = tuple(positions[i * total // samples] for i in range(samples))
    if isinstance(calib, Replay):
        cut = copy.copy(calib)
        cut.pick = pick
        return cut
    return dataclasses.replace(calib, pick=pick)


def _samples(cfg: CalibConfig, inputs: list[InputSpec]) -> Iterator[tuple[int, dict]]:
    """(position, sample) for each sample of the source (a batch axis of 1), the first
    ``cfg.samples`` of them, only those at ``cfg.pick`` where that is set."""
    limit = cfg.samples if cfg.samples is not None else math.inf
    kind = source_kind(cfg)
    picked = iter(cfg.pick) if kind in PICKING_SOURCES and cfg.pick is not None else None
    wanted = set(cfg.pick) if cfg.pick is not None and picked is None else None
    if wanted is not None:
        limit = min(limit, max(wanted, default=-1) + 1)   # read no further than the last pick
    position = 0
    for chunk in SOURCES[kind](cfg, inputs):
        for i in range(next(iter(chunk.values())).shape[0]):
            at = position if picked is None else next(picked)
            position += 1
            if at >= limit:
                return
            if wanted is None or at in wanted:
                yield at, {k: v[i:i + 1] for k, v in chunk.items()}
        if picked is None and position >= limit:
            return                                       # without reading the next chunk


def _batched(samples: Iterator[tuple[int, dict]], bs: int, fixed: bool) -> Iterator[tuple[list[int], dict]]:
    """Samples stacked into batches of ``bs``, each with its samples' positions: a new batch
    where the shapes change, and leftovers dropped where the model fixes the batch."""
    pending: list[tuple[int, dict]] = []
    for at, sample in samples:
        if pending and _shapes(pending[0][1]) != _shapes(sample):
            if not fixed:
                yield _stack(pending)
            pending = []
        pending.append((at, sample))
        if len(pending) == bs:
            yield _stack(pending)
            pending = []
    if pending and not fixed:
        yield _stack(pending)


def _batches_of(samples: Iterator[tuple[int, dict]], cfg: CalibConfig, inputs: list[InputSpec]):
    """(position, sample) pairs batched as :func:`batches` batches them for ``inputs``."""
    return _batched(samples, batch_size_for(cfg, inputs), any(s.fixed_batch is not None for s in inputs))


def _read_batches(cfg: CalibConfig, inputs: list[InputSpec]) -> Iterator[tuple[list[int], dict]]:
    """The batches of :func:`batches`, read from the source, each with its samples' positions."""
    return _batches_of(_samples(cfg, inputs), cfg, inputs)


# A Replay keeps the batches it reads up to this many bytes. The detector's 256 inputs of
# 3 x 416 x 416 are 532 MB; ResNet-50's 2,048 of 3 x 224 x 224 (1.2 GB) are read again.
REPLAY_BYTES = 1 << 30


class Replay:
    """The calibration batches, read once and then replayed from memory.

    BatchNorm re-estimation runs the calibration data through four models after the
    capture's pass; each pass would otherwise decode the images (or draw the random
    tensors) again. The first complete pass keeps its batches, read-only, if they come
    to at most ``max_bytes``; later passes with the same inputs replay them. Past the
    limit every pass reads the source again, as :func:`batches` does.

    Args:
        cfg: the calibration source.
        max_bytes: the most the kept batches may take (default REPLAY_BYTES).
    """

    def __init__(self, cfg: CalibConfig, max_bytes: int | None = None):
        self.cfg, self.max_bytes = cfg, REPLAY_BYTES if max_bytes is None else max_bytes
        self.pick: tuple[int, ...] | None = None     # only these samples: see spread
        self._inputs, self._kept = None, None
        self._picked = None

    @property
    def source(self) -> str:
        return self.cfg.source

    def kept(self, inputs: list[InputSpec]) -> list | None:
        """The kept whole pass for ``inputs`` as (positions, batch) pairs, or None."""
        return self._kept if self._kept is not None and self._inputs == tuple(inputs) else None

    def batches(self, inputs: list[InputSpec]) -> Iterator[dict]:
        """The batches of :func:`batches` for ``inputs``: the kept whole pass, or this copy's kept
        picked pass, where there is one for the same inputs; else read (a pick of the whole pass
        re-batched from it), and kept where it fits."""
        key = (tuple(inputs), self.pick)
        if self._picked is not None and self._picked[0] == key:
            yield from self._picked[1]
            return
        whole = self.kept(inputs)
        if whole is not None and self.pick is None:
            yield from (feed for _, feed in whole)
            return
        if whole is not None:
            wanted = set(self.pick)
            samples = ((at, {k: v[i:i + 1] for k, v in feed.items()})
                       for positions, feed in whole for i, at in enumerate(positions) if at in wanted)
            got = _batches_of(samples, self.cfg, inputs)
        else:
            got = _read_batches(dataclasses.replace(self.cfg, pick=self.pick), inputs)
        kept, size = [], 0
        for positions, feed in got:
            if kept is not None:
                size += sum(a.nbytes for a in feed.values())
                kept = kept if size <= self.max_bytes else None
            if kept is not None:
                for a in feed.values():
                    a.flags.writeable = False   # a consumer that writes to a batch fails loudly
                kept.append((positions, feed))
            yield feed
        if kept is not None and self.pick is None:
            self._inputs, self._kept = tuple(inputs), kept
        elif kept is not None:                          # a picked pass, kept by this copy only
            self._picked = (key, [feed for _, feed in kept])


def _shapes(sample: dict) -> tuple:
    return tuple(v.shape for v in sample.values())


def _stack(samples: list[tuple[int, dict]]) -> tuple[list[int], dict]:
    return [at for at, _ in samples], {k: np.concatenate([s[k] for _, s in samples]) for k in samples[0][1]}


def planned_samples(cfg: CalibConfig, inputs: list[InputSpec]) -> int | None:
    """How many samples :func:`batches` will yield, read from file headers only (None if unknown)."""
    n = _source_samples(cfg, inputs)
    if cfg.pick is not None:
        n = sum(1 for i in cfg.pick if i < n)
    if any(s.fixed_batch for s in inputs):
        n -= n % batch_size_for(cfg, inputs)
    return n


def _source_samples(cfg: CalibConfig, inputs: list[InputSpec]) -> int:
    """How many samples the source holds, up to ``cfg.samples``, from file headers only."""
    kind = source_kind(cfg)
    if kind == "random":
        n = random_samples(cfg, inputs)
    elif kind == "images":
        n = len(_list_files(cfg.source, IMAGE_EXTENSIONS))
    else:
        n = sum(_leading_dim(p, inputs[0]) for p in _list_files(cfg.source, ARRAY_EXTENSIONS))
    return n if cfg.samples is None else min(n, cfg.samples)


def _leading_dim(path: str, spec: InputSpec) -> int:
    """Samples in one .npy/.npz file, from the array header of the first input."""
    import zipfile

    def from_header(f):
        version = np.lib.format.read_magic(f)
        read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                else np.lib.format.read_array_header_2_0)
        shape = read(f)[0]
        return shape[0] if len(shape) == len(spec.shape) else 1
    try:
        if path.lower().endswith(".npy"):
            with open(path, "rb") as f:
                return from_header(f)
        with zipfile.ZipFile(path) as z, z.open(spec.name + ".npy") as f:
            return from_header(f)
    except Exception:
        return 0  # unreadable here: batches() reports it properly
