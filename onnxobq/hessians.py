"""Captured Hessians as a value to reuse: in memory, or in an .npz file.

The Hessians depend only on the float model and the calibration data, not on the bit width,
the method or the grid, so one capture can serve a whole sweep of settings
(``capture`` once, then ``quantize(..., hessians=h)``; or ``--save-hessians`` once, then
``--hessians``). A Hessians value carries the model's digest and the calibration settings,
which are checked where it is used. The file is an ``.npz``: one array per Hessian and its
row count, a JSON header with the digest and the settings, and, where the capture counted
them (act_bits), each layer input's histogram of |x|.
"""
from __future__ import annotations

import hashlib
import json
import os
import zipfile
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx

from .backend import is_cupy, to_numpy
from .errors import UserError, cannot_read, option
from .files import write_atomically
from .graph.io import external_data_files
from .quant.activations import HISTOGRAM_BINS, AbsHistogram
from .types import Captured, Layer

# Version 3: the calibration settings name the kind of source (and data in memory).
FORMAT = "onnxobq-hessians/3"


def model_digest(model) -> str:
    """sha256 of a model file and the external data files it names, or of a model in memory
    (its serialisation; past 2 GiB, its nodes and its tensors' bytes)."""
    h = hashlib.sha256()
    if isinstance(model, onnx.ModelProto):
        try:
            h.update(model.SerializeToString(deterministic=True))
        except ValueError:
            for part in [*model.graph.node, *model.graph.initializer]:
                h.update(part.SerializeToString(deterministic=True))
        return h.hexdigest()
    for name in [model, *external_data_files(model)]:
        with open(name, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
    return h.hexdigest()


@dataclass
class Hessians:
    """Every captured layer's Hessian H = 2XX^T/N, with what they were captured from.

    Attributes:
        model: the model's file name (or "model (in memory)"); model_sha256: its digest.
        calibration: the calibration settings (calibration.describe).
        samples: the calibration samples they came from.
        keys: the repr of each layer key captured (Layer.hessian_key), in graph order.
        read: ``read(key)`` -> (H, rows) of one of ``keys`` (an array in memory, or read from a file).
        ranges: each layer input's |x| histogram by tensor name, where they were counted (act_bits).
    """

    model: str
    model_sha256: str
    calibration: dict | None
    samples: int
    keys: list
    read: Callable
    ranges: dict = field(default_factory=dict)

    @classmethod
    def of(cls, captured: Captured, model: str, model_sha256: str, calibration: dict | None) -> "Hessians":
        """A capture as a value, keyed as a file keys it."""
        by_key = {repr(k): (H, captured.rows[k]) for k, H in captured.hessians.items()}
        return cls(model, model_sha256, calibration, captured.samples, list(by_key), by_key.get, captured.ranges)

    def __repr__(self) -> str:
        return (f"Hessians({len(self.keys)} layers of {self.model}, {self.samples} samples"
                f"{', with activation ranges' if self.ranges else ''})")

    def save(self, path: str) -> None:
        """Write the Hessians to ``path`` (.npz), atomically (an existing file is replaced)."""
        ranges = list(self.ranges.items())     # the layer inputs' |x| histograms, for act_bits
        header = {"format": FORMAT, "model": self.model, "model_sha256": self.model_sha256,
                  "calib": self.calibration, "samples": self.samples, "keys": self.keys,
                  "ranges": [{"tensor": name, "top": h.top, "amax": h.amax} for name, h in ranges]}
        arrays = {"header": np.array(json.dumps(header))}
        for i, key in enumerate(self.keys):
            H, rows = self.read(key)
            arrays[f"h{i}"], arrays[f"rows{i}"] = to_numpy(H), np.array(rows, dtype=np.int64)
        for i, (_, hist) in enumerate(ranges):
            arrays[f"act{i}"] = hist.counts
        write_atomically(path, lambda f: np.savez(f, **arrays), binary=True)

    def for_run(self, layers: list[Layer], digest: str, model_name: str, calibration: dict | None, xp,
                where: str | None = None) -> Captured:
        """The Hessians of ``layers`` on ``xp`` (keyed by hessian_key), checked against the run's
        model and its calibration settings (not where either is data in memory).

        Raises:
            UserError: they come from another model or other calibration settings, or lack a
                layer, or one is damaged (``where`` names them: the file, or the captured value).
        """
        again = f"capture them again with {option('save_hessians') if where else 'onnxobq.capture'}"
        where = where or option("hessians") + " (captured)"
        if digest != self.model_sha256:
            raise UserError(f"{where}: captured from another model ({self.model}), not {model_name}; {again}")
        saved = self.calibration
        if (calibration is not None and saved is not None and "in memory" not in (calibration["source"],
                                                                                   saved["source"])
                and calibration != saved):
            raise UserError(f"{where}: captured with other calibration settings "
                            f"({option('calibration', saved['source'])}, {self.samples} samples); "
                            f"give the same {option('calibration')} options, or {again}")
        hessians, rows = {}, {}
        for layer in layers:          # read only the Hessians these layers use
            key = repr(layer.hessian_key)
            if key not in self.keys:
                raise UserError(f"{where}: has no Hessian for layer {layer.name} (saved with other "
                                f"{option('exclude')} or {option('op_types')}?); {again}")
            if layer.hessian_key not in hessians:
                H, n = self.read(key)
                if H is None or H.shape != (layer.groups, layer.cols, layer.cols):
                    raise UserError(f"{where}: damaged (the Hessian of layer {layer.name} is missing or not "
                                    f"{layer.groups} x {layer.cols} x {layer.cols} floats); {again}")
                H = H if is_cupy(xp) else to_numpy(H)     # captured on a GPU, solved on the CPU
                hessians[layer.hessian_key], rows[layer.hessian_key] = xp.asarray(H), n
        return Captured(hessians, rows, self.samples, ranges=dict(self.ranges))


def from_file(path: str, layers: list[Layer], digest: str, model_name: str, calibration: dict | None, xp) -> Captured:
    """The Hessians of ``layers`` from a file written by Hessians.save (checked as by
    Hessians.for_run), reading only those.

    Raises:
        UserError: the file is missing, unreadable, not a Hessian file of this version, or
            damaged; or see Hessians.for_run.
    """
    where = option("hessians", path)
    again = f"capture them again with {option('save_hessians')}"
    if not os.path.isfile(path):
        raise UserError(f"{where}: no such file; give a file written by {option('save_hessians')}")
    not_ours = UserError(f"{where}: not a Hessian file of this onnxobq version; {again}")
    try:
        npz = np.load(path, allow_pickle=False)
    except PermissionError as exc:
        raise cannot_read(where, exc) from None
    except (OSError, ValueError, zipfile.BadZipFile):
        raise not_ours from None
    with npz:
        try:
            header = json.loads(str(npz["header"]))
        except (ValueError, KeyError):
            raise not_ours from None
        if (not isinstance(header, dict) or header.get("format") != FORMAT
                or not {"model", "model_sha256", "calib", "samples", "keys"} <= set(header)):
            raise not_ours
        index = {k: i for i, k in enumerate(header["keys"])}
        ranges = _ranges(npz, header.get("ranges", []))
        if ranges is None:
            raise UserError(f"{where}: damaged (its activation ranges); {again}")
        saved = Hessians(header["model"], header["model_sha256"], header["calib"], header["samples"],
                         header["keys"], lambda key: _arrays(npz, index[key]), ranges)
        return saved.for_run(layers, digest, model_name, calibration, xp, where)


def _ranges(npz, listed) -> dict | None:
    """The activation histograms of the file by tensor name; None if they are damaged."""
    ranges = {}
    try:
        for i, item in enumerate(listed):
            counts = npz[f"act{i}"]
            if counts.shape != (HISTOGRAM_BINS,) or not np.issubdtype(counts.dtype, np.integer):
                return None
            ranges[str(item["tensor"])] = AbsHistogram(counts.astype(np.int64), float(item["top"]), float(item["amax"]))
    except (KeyError, TypeError, ValueError, OSError, zipfile.BadZipFile):
        return None
    return ranges


def _arrays(npz, i: int):
    """Hessian i of the file and its row count; (None, None) if they are missing or malformed."""
    try:
        H, n = npz[f"h{i}"], npz[f"rows{i}"]
    except (KeyError, ValueError, OSError, zipfile.BadZipFile):
        return None, None
    if not np.issubdtype(H.dtype, np.floating) or n.shape != () or not np.issubdtype(n.dtype, np.integer):
        return None, None
    return H, int(n)
