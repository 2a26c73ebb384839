"""Calibration sources: one protocol, one class per kind of data.

Every source yields *chunks*: dicts from input name to an array whose first axis counts
samples (calibration.batches re-cuts them into the model's batches). A source also says how
many samples it holds without reading them where it can, whether it can skip to picked samples
(so that images not picked are never decoded), and whether it can be read again.
"""
from __future__ import annotations

import glob
import math
import os
from collections.abc import Iterable, Iterator
from typing import Protocol

import numpy as np

from ..config import CalibConfig
from ..errors import UserError, cannot_read, option
from ..types import InputSpec, fmt_shape

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
ARRAY_EXTENSIONS = (".npy", ".npz")


class Source(Protocol):
    """What every kind of calibration data implements.

    Attributes:
        kind: "images", "arrays", "random" or "memory".
        picks: chunks() honours ``cfg.pick`` itself, yielding only the picked samples.
        rereadable: a second pass reads the same samples again (a one-shot iterator does not).
    """

    kind: str
    picks: bool
    rereadable: bool

    def chunks(self, cfg: CalibConfig, inputs: list[InputSpec]) -> Iterator[dict]:
        """The samples, as dicts of arrays keyed by input name, with a batch axis."""

    def count(self, cfg: CalibConfig, inputs: list[InputSpec]) -> int | None:
        """How many samples the source holds (before ``cfg.samples``), without reading them;
        None where that cannot be known."""


def list_files(source: str, extensions) -> list[str]:
    """The files of a folder with these extensions, in name order (or the file itself)."""
    if os.path.isfile(source):
        return [source]
    return sorted(p for p in glob.glob(os.path.join(source, "*"))
                  if p.lower().endswith(extensions) and os.path.isfile(p))


def check_batch_bytes(cfg: CalibConfig, inputs: list[InputSpec], sample_bytes: int, fix: str) -> None:
    """Refuse samples whose batch alone takes over a quarter of this machine's memory: the
    model's activations take several times more, and the kernel's OOM killer would end the run
    with no message."""
    from .batching import batch_size_for

    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    batch = batch_size_for(cfg, inputs)
    if sample_bytes * batch > memory // 4:
        if batch > 1 and all(s.fixed_batch is None for s in inputs):
            fix += f", or a smaller {option('batch_size')}"
        raise UserError(f"{cfg.label}: a batch of {batch} sample{'s' if batch > 1 else ''} takes "
                        f"{sample_bytes * batch / 2 ** 30:,.1f} GiB, over a quarter of this machine's "
                        f"{memory / 2 ** 30:,.1f} GiB; {fix}")


def as_batch(a, spec: InputSpec, where: str) -> np.ndarray:
    """Check an array against an input and give it a batch axis (``where`` names it in errors)."""
    if not isinstance(a, np.ndarray):
        raise UserError(f"{where}: input '{spec.name}' is a {type(a).__name__}, not a NumPy array; "
                        "give NumPy arrays")
    rank = len(spec.shape)
    one = fmt_shape(spec.shape[1:])
    if a.ndim not in (rank, rank - 1):
        raise UserError(f"{where}: input '{spec.name}' needs a batch {fmt_shape(spec.shape)} or one "
                        f"sample {one}, got an array of shape {list(a.shape)}; save arrays of that shape")
    skip = 1 if a.ndim == rank else 0    # the array's batch axis, if it has one
    for axis, (want, have) in enumerate(zip(spec.shape[1:], a.shape[skip:]), start=skip):
        if want is not None and want != have:
            read = "a batch" if skip else "one sample"
            raise UserError(f"{where}: input '{spec.name}' needs a batch {fmt_shape(spec.shape)} or one "
                            f"sample {one}, got an array of shape {list(a.shape)} (read as {read}, its axis "
                            f"{axis} is {have} where the input needs {want}); save arrays of that shape")
    if a.ndim == rank - 1:
        a = a[None]
    if a.shape[0] == 0:
        raise UserError(f"{where}: input '{spec.name}' has no samples (an array of shape {list(a.shape)}); "
                        "give at least one sample")
    want_float = np.issubdtype(spec.dtype, np.floating)
    if (want_float != np.issubdtype(a.dtype, np.floating) or (a.dtype == bool) != (spec.dtype == bool)
            or not (np.issubdtype(a.dtype, np.number) or a.dtype == bool)):
        raise UserError(f"{where}: input '{spec.name}' needs {spec.dtype}, got {a.dtype}; "
                        f"save the array as {spec.dtype}")
    if want_float:
        bad = np.isnan(a).reshape(a.shape[0], -1).any(axis=1)
        if bad.any():      # infinities can be meant (attention masks); NaN never is
            raise UserError(f"{where}: input '{spec.name}' holds NaN in {int(bad.sum())} of its "
                            f"{a.shape[0]} samples (the first at index {int(bad.argmax())}); "
                            "replace or drop those samples")
    return a.astype(spec.dtype, copy=False)


def keyed(arrays: dict, inputs: list[InputSpec], where: str, fix: str) -> dict:
    """A chunk from arrays keyed by input name, each checked against its input."""
    names = [s.name for s in inputs]
    if sorted(arrays) != sorted(names):
        raise UserError(f"{where}: keys {sorted(arrays)} do not match the model inputs {names}; {fix}")
    chunk = {s.name: as_batch(arrays[s.name], s, where) for s in inputs}
    counts = {name: len(a) for name, a in chunk.items()}
    if len(set(counts.values())) > 1:
        given = ", ".join(f"'{name}' {n}" for name, n in counts.items())
        raise UserError(f"{where}: the inputs have different numbers of samples ({given}); "
                        "give every input the same samples")
    return chunk


# ----------------------------------------------------------------------------- random

class RandomSource:
    """Seeded random tensors: standard normal for floats, 0/1 for integers and bools."""

    kind, picks, rereadable = "random", False, True

    @staticmethod
    def samples(cfg: CalibConfig, inputs: list[InputSpec]) -> int:
        """How many to draw: ``cfg.samples``, else 8 (at least one fixed batch)."""
        if cfg.samples is not None:
            return cfg.samples
        fixed = [s.fixed_batch for s in inputs if s.fixed_batch is not None]
        return max([8] + fixed)

    def count(self, cfg: CalibConfig, inputs: list[InputSpec]) -> int:
        return self.samples(cfg, inputs)

    def chunks(self, cfg: CalibConfig, inputs: list[InputSpec]) -> Iterator[dict]:
        """float32 inputs draw float32 values (NumPy's float32 ziggurat): 256 inputs of
        3 x 416 x 416 in chunks of 16 took 1.16 to 1.21 s against 1.53 to 1.72 s for float64
        draws cast down, on the 2-core machine, and every pass over the data draws them again."""
        rng = np.random.default_rng(cfg.seed)
        total = self.samples(cfg, inputs)
        shapes = random_shapes(cfg, inputs)
        check_batch_bytes(cfg, inputs, sum(math.prod(shapes[s.name]) * np.dtype(s.dtype).itemsize for s in inputs),
                          f"give smaller {option('input_shapes')} sizes")
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


def random_shapes(cfg: CalibConfig, inputs: list[InputSpec]) -> dict:
    """Per input, the shape of one random sample (no batch axis), dynamic dims from ``cfg.shapes``."""
    names = [s.name for s in inputs]
    unknown = [n for n in cfg.shapes if n not in names]
    if unknown:
        raise UserError(f"{option('input_shapes', unknown[0] + '=...')}: the model has no input '{unknown[0]}'; "
                        f"its inputs are {', '.join(names)}")
    shapes = {}
    for spec in inputs:
        dims = list(spec.shape[1:])
        given = cfg.shapes.get(spec.name)
        if given is not None:
            dims = _given_dims(spec, given)
        if any(d is None for d in dims):
            raise UserError(f"input '{spec.name}' has dynamic dimensions {fmt_shape(spec.shape)} and "
                            f"{cfg.label} needs sizes; give them with "
                            f"{option('input_shapes', spec.name + '=' + _example(spec))}, each ? a number")
        shapes[spec.name] = tuple(int(d) for d in dims)
    return shapes


def _example(spec: InputSpec) -> str:
    return "x".join("1" if i == 0 else (str(d) if d is not None else "?") for i, d in enumerate(spec.shape))


def _given_dims(spec: InputSpec, typed: tuple) -> list[int]:
    """The sample dimensions an ``input_shapes`` entry gives an input (with or without its batch)."""
    given = typed[1:] if len(typed) == len(spec.shape) else typed
    shown = option("input_shapes", f"{spec.name}={'x'.join(map(str, typed))}")
    example = option("input_shapes", f"{spec.name}={_example(spec)}")
    if len(given) != len(spec.shape) - 1:
        raise UserError(f"{shown}: input '{spec.name}' has rank {len(spec.shape)} {fmt_shape(spec.shape)}; "
                        f"give all {len(spec.shape)} dimensions, e.g. {example}")
    for axis, (want, got) in enumerate(zip(spec.shape[1:], given), start=1):
        if (want is not None and want != got) and len(typed) < len(spec.shape):
            raise UserError(f"{shown}: read as one sample without the batch axis, it does not fit input "
                            f"'{spec.name}' {fmt_shape(spec.shape)}; give all {len(spec.shape)} "
                            f"dimensions, e.g. {example}")
        if got < 1 or (want is not None and want != got):
            raise UserError(f"{shown}: input '{spec.name}' is {fmt_shape(spec.shape)} (axis {axis} must be "
                            f"{want if want is not None else 'at least 1'}); match the model's fixed "
                            "dimensions")
    return list(given)


# ----------------------------------------------------------------------------- arrays

class ArraySource:
    """Arrays from .npy (single-input models) or .npz files keyed by input name, in name order.

    Each array either includes the batch axis (same rank as the model input) or is one sample
    (rank one less)."""

    kind, picks, rereadable = "arrays", False, True

    def chunks(self, cfg: CalibConfig, inputs: list[InputSpec]) -> Iterator[dict]:
        names = [s.name for s in inputs]
        for path in list_files(cfg.source, ARRAY_EXTENSIONS):
            where = option("calibration", path)
            try:
                data = np.load(path, allow_pickle=False)
                if isinstance(data, np.ndarray):
                    arrays = None
                else:
                    with data:
                        arrays = {k: data[k] for k in data.files}
            except PermissionError as exc:
                raise cannot_read(where, exc) from None
            except Exception as exc:
                raise UserError(f"{where}: cannot read it ({type(exc).__name__}); "
                                "give .npy/.npz files saved with numpy (no pickled objects)") from None
            if arrays is None:
                if len(inputs) != 1:
                    raise UserError(f"{where}: a .npy file feeds a single input, but the model "
                                    f"has inputs {', '.join(names)}; use .npz files keyed by input name")
                arrays = {names[0]: data}
            yield keyed(arrays, inputs, where, "name the .npz arrays after the inputs")

    def count(self, cfg: CalibConfig, inputs: list[InputSpec]) -> int:
        return sum(_leading_dim(p, inputs[0]) for p in list_files(cfg.source, ARRAY_EXTENSIONS))


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


# ----------------------------------------------------------------------------- in memory

class MemorySource:
    """Data given in memory, streamed as given.

    ``cfg.source`` may be a dict of arrays keyed by input name (one batch), an array (for a
    single-input model), an iterable of such dicts (one batch each: a list, a generator, a
    ``torch.utils.data.DataLoader`` of dicts of NumPy arrays), an object with onnxruntime's
    ``CalibrationDataReader`` protocol (``get_next()`` returns a dict, then None; ``rewind()``,
    where it has one, starts it over), or a callable that returns a new iterable each time it
    is called (one call per pass over the data). A one-shot iterator is read once; the
    passes after the first replay what calibration.Replay kept of it.
    """

    kind, picks = "memory", False

    def __init__(self, source):
        self.source = source

    @property
    def rereadable(self) -> bool:
        return not isinstance(self.source, OneShot)

    def count(self, cfg: CalibConfig, inputs: list[InputSpec]) -> int | None:
        s = self.source
        if isinstance(s, np.ndarray):
            return s.shape[0] if s.ndim == len(inputs[0].shape) else 1
        if isinstance(s, dict) and inputs and isinstance(s.get(inputs[0].name), np.ndarray):
            a = s[inputs[0].name]
            return a.shape[0] if a.ndim == len(inputs[0].shape) else 1
        return None

    def chunks(self, cfg: CalibConfig, inputs: list[InputSpec]) -> Iterator[dict]:
        where = cfg.label
        for i, item in enumerate(self._items(inputs)):
            if isinstance(item, np.ndarray) and len(inputs) == 1:
                item = {inputs[0].name: item}
            if not isinstance(item, dict):
                raise UserError(f"{where}: item {i} is a {type(item).__name__}, not a dict of arrays keyed by "
                                f"input name; give dicts such as {{'{inputs[0].name}': array}}")
            yield keyed(item, inputs, f"{where} item {i}", "key the arrays by the model's input names")

    def _items(self, inputs: list[InputSpec]):
        s = self.source
        if isinstance(s, OneShot):
            return s.take()
        if isinstance(s, dict):
            return [s]
        if isinstance(s, np.ndarray):
            if len(inputs) != 1:
                raise UserError(f"{option('calibration')}: an array feeds a single input, but the model has "
                                f"inputs {', '.join(x.name for x in inputs)}; give a dict keyed by input name")
            return [s]
        if hasattr(s, "get_next"):
            if hasattr(s, "rewind"):
                s.rewind()
            return iter(s.get_next, None)
        if callable(s):
            return s()
        return s


def memory_data(source) -> bool:
    """Whether a calibration source is data in memory rather than a path or "random"."""
    return not isinstance(source, (str, os.PathLike))


class OneShot:
    """Data in memory that can be read once: an iterator (a generator, say), or a reader with
    ``get_next()`` and no ``rewind()``. The first pass reads it; a later one, where
    calibration.Replay could not keep the first, is an error that says what to give instead."""

    def __init__(self, data):
        self.data = data
        self.read = False

    def take(self):
        if self.read:
            raise UserError(f"{option('calibration')} (in memory): an iterator can be read only once, and the "
                            "BatchNorm passes need the data again (it is over what onnxobq keeps in memory); "
                            f"give a list or a callable that returns a new iterator, or {option('bn_reestimate', False)}")
        self.read = True
        return iter(self.data.get_next, None) if hasattr(self.data, "get_next") else self.data


def in_memory(data):
    """``data`` as a CalibConfig source: one-shot iterators and readers wrapped in OneShot, the
    rest as given."""
    if isinstance(data, (str, os.PathLike, dict, np.ndarray, OneShot)) or callable(data):
        return data
    if hasattr(data, "get_next"):
        return data if hasattr(data, "rewind") else OneShot(data)
    if not isinstance(data, Iterable):
        raise UserError(f"{option('calibration')}: a {type(data).__name__} is not calibration data; give a path, "
                        "'random', a dict of arrays keyed by input name, an iterable of such dicts, or a reader "
                        "with get_next()")
    return OneShot(data) if isinstance(data, Iterator) else data
