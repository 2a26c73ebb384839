"""Images as calibration data: decoded with Pillow, resized and normalised as the model's exporter did."""
from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy as np

from ..config import CalibConfig, ImageOptions
from ..errors import UserError, cannot_read, option
from ..types import InputSpec
from ..types import fmt_shape
from .sources import IMAGE_EXTENSIONS, check_batch_bytes, list_files


class ImageSource:
    """A folder of .jpg/.png/.bmp images (or one image), in name order, one sample each, pre-processed
    by ``cfg.image``. Only the picked files are decoded (``cfg.pick``)."""

    kind, picks, rereadable = "images", True, True

    def count(self, cfg: CalibConfig, inputs: list[InputSpec]) -> int:
        return len(list_files(cfg.source, IMAGE_EXTENSIONS))

    def chunks(self, cfg: CalibConfig, inputs: list[InputSpec]) -> Iterator[dict]:
        if len(inputs) != 1:
            raise UserError(f"{cfg.label}: images can feed only a single-input model; "
                            f"this one has {', '.join(s.name for s in inputs)}; use .npz files")
        spec = inputs[0]
        files = list_files(cfg.source, IMAGE_EXTENSIONS)
        if not files:
            raise UserError(f"{cfg.label}: no .jpg/.png/.bmp images found; add images")
        if cfg.pick is not None:          # one sample per file: the others are not decoded
            files = [files[i] for i in cfg.pick if i < len(files)]
        layout, channels, size = image_geometry(spec, cfg.image)
        check_batch_bytes(cfg, inputs, channels * size[0] * size[1] * 4,
                          f"give a smaller {option('size')}" if cfg.image.size else "use a machine with more memory")
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


def image_geometry(spec: InputSpec, opts: ImageOptions):
    """Layout, channel count and (H, W) of an image input."""
    if len(spec.shape) != 4:
        raise UserError(f"input '{spec.name}' has shape {fmt_shape(spec.shape)}, not an image "
                        "(N, C, H, W or N, H, W, C); use .npy/.npz calibration data")
    layout = opts.layout
    if layout is None:
        layout = "nhwc" if spec.shape[3] in (1, 3) and spec.shape[1] not in (1, 3) else "nchw"
    channels = spec.shape[1] if layout == "nchw" else spec.shape[3]
    if channels not in (1, 3):
        raise UserError(f"input '{spec.name}' {fmt_shape(spec.shape)} has "
                        f"{'?' if channels is None else channels} channels in {layout} layout, not 1 or 3; "
                        f"set {option('layout')}, or use .npy/.npz calibration data")
    for what, values in (("mean", opts.mean), ("std", opts.std)):
        if len(values) not in (1, channels):
            raise UserError(f"{option(what, ','.join(f'{v:g}' for v in values))}: {len(values)} values, but input "
                            f"'{spec.name}' has {channels} channel{'s' if channels > 1 else ''}; "
                            + ("give 1 value" if channels == 1 else f"give 1 or {channels} values")
                            + f" (an explicit option overrides {option('preset')})")
    if any(v == 0 for v in opts.std):
        raise UserError(f"{option('std', ','.join(f'{v:g}' for v in opts.std))}: a standard deviation of 0; "
                        "give non-zero values")
    hw = spec.shape[2:4] if layout == "nchw" else spec.shape[1:3]
    size = opts.size
    if size is None:
        if any(d is None for d in hw):
            raise UserError(f"input '{spec.name}' has a dynamic image size {fmt_shape(spec.shape)}; "
                            f"give one with {option('size', 'HxW')}")
        size = (int(hw[0]), int(hw[1]))
    elif all(d is not None for d in hw) and tuple(size) != tuple(hw):
        raise UserError(f"{option('size', f'{size[0]}x{size[1]}')} does not fit input '{spec.name}' "
                        f"{fmt_shape(spec.shape)}; drop {option('size')} or match it")
    return layout, channels, size


def preprocess_image(path: str, opts: ImageOptions, layout: str, channels: int, size) -> np.ndarray:
    """Decode one image and turn it into a (C, H, W) or (H, W, C) float32 array."""
    from PIL import Image

    try:
        img = Image.open(path)
        img = _as_eight_bit_range(img, path) if img.mode in WIDE_MODES else img.convert("L" if channels == 1 else "RGB")
    except PermissionError as exc:
        raise cannot_read(option("calibration", path), exc) from None
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"{option('calibration', path)}: cannot decode the image ({type(exc).__name__}); "
                        "remove or replace the file") from None
    x = _resize(img, opts, size)
    if x.ndim == 2:
        x = x[..., None]        # (H, W, 1): mean/std broadcast over the channel, never the width
    if x.shape[2] != channels:  # a 16-bit grey image for a colour input
        x = np.repeat(x, channels, axis=2)
    if channels == 3 and opts.channel_order == "bgr":
        x = x[..., ::-1]
    x = x * (1.0 / 255.0 if opts.scale is None else opts.scale)
    x = (x - np.asarray(opts.mean, np.float32)) / np.asarray(opts.std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1) if layout == "nchw" else x, dtype=np.float32)


# Pillow's modes for one channel of more than 8 bits (16-bit PNGs open as I;16 or I). Its
# convert("L") would clip their values at 255 (96% of a 16-bit image's pixels saturated).
WIDE_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def _as_eight_bit_range(img, path: str):
    """A 16-bit grey image as a float image on 0..255 (its values / 257), as its 8-bit version
    would have them."""
    from PIL import Image

    a = np.asarray(img, dtype=np.float32)
    if img.mode == "F" or a.min() < 0 or a.max() > 65535:
        raise UserError(f"{option('calibration', path)}: a {'float' if img.mode == 'F' else '32-bit integer'} image "
                        f"(values from {a.min():g} to {a.max():g}), whose range is unknown; save the images as 8- or "
                        "16-bit PNG or JPEG")
    return Image.fromarray(a / 257.0, mode="F")


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
