"""Samples into batches: re-cut to the model's batch, spread, and replayed for BatchNorm.

The source's chunks are re-cut to the batch the model takes; spread picks samples at even steps;
Replay keeps the first pass for BatchNorm's later ones.

Host memory holds one batch at a time (and, in a Replay, the kept pass).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from typing import Iterator

import numpy as np

from ..backend import Tuning
from ..config import CalibConfig
from ..errors import UserError, option
from ..types import InputSpec
from .images import ImageSource
from .sources import (ARRAY_EXTENSIONS, IMAGE_EXTENSIONS, ArraySource, MemorySource, RandomSource, Source,
                      list_files, memory_data)

# One source object per kind of data that is read from a path; data in memory gets its own.
SOURCES: dict[str, Source] = {"random": RandomSource(), "arrays": ArraySource(), "images": ImageSource()}


def detect_kind(source) -> str:
    """Which kind of source reads ``source``: "random", "images", "arrays" or "memory"."""
    if memory_data(source):
        return "memory"
    source = os.fspath(source)
    if source == "random":
        return "random"
    fix = "give a folder of images, .npy/.npz files, or 'random'"
    if os.path.isfile(source):
        if source.lower().endswith(ARRAY_EXTENSIONS):
            return "arrays"
        if source.lower().endswith(IMAGE_EXTENSIONS):
            return "images"
        raise UserError(f"{option('calibration', source)}: not an image, .npy or .npz file; {fix}")
    if not os.path.isdir(source):
        raise UserError(f"{option('calibration', source)}: no such file or folder; {fix}")
    names = sorted(os.listdir(source))
    if any(n.lower().endswith(ARRAY_EXTENSIONS) for n in names):
        return "arrays"
    if any(n.lower().endswith(IMAGE_EXTENSIONS) for n in names):
        return "images"
    raise UserError(f"{option('calibration', source)}: the folder holds no .jpg/.png/.bmp images "
                    f"and no .npy/.npz files; add calibration data or use {option('calibration', 'random')}")


def source_of(cfg: CalibConfig) -> Source:
    """The source that reads ``cfg.source``."""
    kind = detect_kind(cfg.source)
    return MemorySource(cfg.source) if kind == "memory" else SOURCES[kind]


# Options that apply to one kind of source only (the others are checked by source_kind).
RANDOM_ONLY = ("input_shapes",)
# Image options that apply to one resize mode only.
RESIZE_ONLY = {"crop_fraction": "crop", "pad_value": "letterbox", "pad_align": "letterbox"}


def source_kind(cfg: CalibConfig) -> str:
    """detect_kind of the source, after checking that the options given apply to it.

    Raises:
        UserError: an image option with arrays, random tensors or data in memory, or
            ``input_shapes`` with files, whose shapes are their own, or one for another resize mode.
    """
    kind = detect_kind(cfg.source)
    image = ", ".join(option(o) for o in cfg.given if o not in RANDOM_ONLY)
    if image and kind != "images":
        what = {"random": "draws random tensors", "arrays": "holds arrays, fed as they were saved",
                "memory": "is data in memory, fed as given"}[kind]
        if kind == "arrays" and os.path.isdir(cfg.source) and list_files(cfg.source, IMAGE_EXTENSIONS):
            raise UserError(f"{cfg.label}: the folder's .npy/.npz files are read, not its images; "
                            f"move the arrays out to calibrate on the images, or drop {image} to use the arrays")
        raise UserError(f"{cfg.label}: {what}, and {image} apply to image folders only; drop {image}")
    if any(o in RANDOM_ONLY for o in cfg.given) and kind != "random":
        raise UserError(f"{cfg.label}: {option('input_shapes')} sizes the tensors of "
                        f"{option('calibration', 'random')}, and these files have their own shapes; "
                        f"drop {option('input_shapes')}")
    for name, resize in RESIZE_ONLY.items():
        if name in cfg.given and cfg.image.resize != resize:
            raise UserError(f"{option(name)} applies to {option('resize', resize)} only, and the images are resized "
                            f"by {cfg.image.resize}; add {option('resize', resize)} or drop {option(name)}")
    return kind


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
    if kept is None and isinstance(calib, Replay) and samples is not None and _source_samples(cfg, inputs) is None:
        for _ in calib.batches(inputs):      # data in memory of unknown length: one pass, kept where it fits
            pass
        kept = calib.kept(inputs)
    if kept is not None:
        positions = [at for at_batch, _ in kept for at in at_batch]            # what the capture used
    else:
        total = _source_samples(cfg, inputs)
        if total is None:                   # an iterable in memory not kept: all of it
            return calib
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
    source_kind(cfg)
    source = source_of(cfg)
    picked = iter(cfg.pick) if source.picks and cfg.pick is not None else None
    wanted = set(cfg.pick) if cfg.pick is not None and picked is None else None
    if wanted is not None:
        limit = min(limit, max(wanted, default=-1) + 1)   # read no further than the last pick
    position = 0
    for chunk in source.chunks(cfg, inputs):
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


class Replay:
    """The calibration batches, read once and then replayed from memory.

    BatchNorm re-estimation runs the calibration data through four models after the
    capture's pass; each pass would otherwise decode the images (or draw the random
    tensors) again. The first complete pass keeps its batches, read-only, if they come
    to at most ``max_bytes``; later passes with the same inputs replay them. Past the
    limit every pass reads the source again, as :func:`batches` does.

    Args:
        cfg: the calibration source.
        max_bytes: the most the kept batches may take (see Tuning.replay_bytes: the detector's
            256 inputs of 3 x 416 x 416 are 532 MB; ResNet-50's 2,048 of 3 x 224 x 224, 1.2 GB,
            are read again).
    """

    def __init__(self, cfg: CalibConfig, max_bytes: int = Tuning.replay_bytes):
        self.cfg, self.max_bytes = cfg, max_bytes
        self.pick: tuple[int, ...] | None = None     # only these samples: see spread
        self._inputs, self._kept = None, None
        self._picked = None

    @property
    def label(self) -> str:
        return self.cfg.label

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


def planned_samples(calib: "CalibConfig | Replay", inputs: list[InputSpec]) -> int | None:
    """How many samples :func:`batches` will yield, read from file headers only (None if unknown)."""
    cfg = dataclasses.replace(calib.cfg, pick=calib.pick) if isinstance(calib, Replay) else calib
    n = _source_samples(cfg, inputs)
    if n is None:
        return None
    if cfg.pick is not None:
        n = sum(1 for i in cfg.pick if i < n)
    if any(s.fixed_batch for s in inputs):
        n -= n % batch_size_for(cfg, inputs)
    return n


def _source_samples(cfg: CalibConfig, inputs: list[InputSpec]) -> int | None:
    """How many samples the source holds, up to ``cfg.samples``, from file headers only (None:
    unknown, as for an iterable in memory)."""
    source_kind(cfg)
    n = source_of(cfg).count(cfg, inputs)
    if n is None:
        return None
    return n if cfg.samples is None else min(n, cfg.samples)


def describe(cfg: CalibConfig | None) -> dict | None:
    """The calibration settings as JSON-able values: the source (an absolute path, "random" or
    "in memory"), its kind, how many samples in which batches, and the options that shape its
    samples (the seed and shapes of random tensors, the pre-processing of images)."""
    if cfg is None:
        return None
    kind = detect_kind(cfg.source)
    source = {"memory": "in memory", "random": "random"}.get(kind) or os.path.abspath(os.fspath(cfg.source))
    d = {"source": source, "kind": kind, "samples": cfg.samples, "batch_size": cfg.batch_size}
    if kind == "random":
        d.update(seed=cfg.seed, shapes=dict(cfg.shapes))
    if kind == "images":
        d["image"] = dataclasses.asdict(cfg.image)
    return json.loads(json.dumps(d))     # tuples become lists, as they will be after a JSON round trip
