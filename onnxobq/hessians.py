"""Save captured Hessians to a file and load them back, to skip the capture.

The Hessians depend only on the float model and the calibration data, not on the
bit width, the method or the grid, so one capture can serve a whole sweep of
settings (``--save-hessians`` once, then ``--hessians``). The file is an ``.npz``:
one array per Hessian and its row count, and a JSON header with the model's
digest and the calibration settings, which are checked on loading; and, where the capture
counted them (--act-bits), each layer input's histogram of |x|.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import zipfile

import numpy as np

from .backend import to_numpy
from .calibration import CalibConfig
from .capture import Captured
from .errors import UserError, cannot_read
from .graph.io import external_data_files, write_atomically
from .graph.layers import Layer
from .quant.activations import HISTOGRAM_BINS, AbsHistogram

# Version 2: the layers' keys name the other uses of a shared weight (Layer.uses), so the keys
# of version-1 files no longer match any layer.
FORMAT = "onnxobq-hessians/2"


def model_digest(path: str) -> str:
    """sha256 of the model file and of the external data files it names."""
    h = hashlib.sha256()
    for name in [path, *external_data_files(path)]:
        with open(name, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
    return h.hexdigest()


def calib_description(calib: CalibConfig) -> dict:
    """The calibration settings as JSON-able values, with a file or folder source made absolute."""
    d = dataclasses.asdict(calib)
    d.pop("pick", None)            # BN's choice of samples, not the Hessians'; absent from older files
    d.pop("given", None)           # which options were typed; their values are in the rest
    if d["source"] != "random":
        d["source"] = os.path.abspath(d["source"])
    return json.loads(json.dumps(d))   # tuples become lists, as they will be after loading


def save(path: str, captured: Captured, layers: list[Layer], model_path: str, calib: CalibConfig) -> None:
    """Write every layer's Hessian to ``path`` (.npz), atomically."""
    keys = list(dict.fromkeys(layer.hessian_key for layer in layers))
    header = {"format": FORMAT, "model": os.path.basename(model_path), "model_sha256": model_digest(model_path),
              "calib": calib_description(calib), "samples": captured.samples,
              "keys": [repr(k) for k in keys]}
    ranges = list(captured.ranges.items())         # the layer inputs' |x| histograms, for --act-bits
    header["ranges"] = [{"tensor": name, "top": h.top, "amax": h.amax} for name, h in ranges]
    arrays = {"header": np.array(json.dumps(header))}
    for i, key in enumerate(keys):
        arrays[f"h{i}"] = to_numpy(captured.hessians[key])
        arrays[f"rows{i}"] = np.array(captured.rows[key], dtype=np.int64)
    for i, (_, hist) in enumerate(ranges):
        arrays[f"act{i}"] = hist.counts
    write_atomically(path, lambda f: np.savez(f, **arrays), binary=True)


def load(path: str, layers: list[Layer], model_path: str, calib: CalibConfig | None, xp) -> Captured:
    """Read the Hessians of ``layers`` from a file written by :func:`save`.

    Raises:
        UserError: the file is missing or not a Hessian file, or it was captured from
            another model, other calibration settings or fewer layers.
    """
    again = "capture them again with --save-hessians"
    if not os.path.isfile(path):
        raise UserError(f"--hessians {path}: no such file; give a file written by --save-hessians")
    not_ours = UserError(f"--hessians {path}: not a Hessian file of this onnxobq version; {again}")
    try:
        npz = np.load(path, allow_pickle=False)
    except PermissionError as exc:
        raise cannot_read(f"--hessians {path}", exc) from None
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
        if header["model_sha256"] != model_digest(model_path):
            raise UserError(f"--hessians {path}: captured from another model ({header['model']}), "
                            f"not {model_path}; {again}")
        if calib is not None and calib_description(calib) != header["calib"]:
            raise UserError(f"--hessians {path}: captured with other calibration settings "
                            f"(--calib {header['calib']['source']}, {header['samples']} samples); "
                            f"give the same --calib options, or {again}")
        index = {k: i for i, k in enumerate(header["keys"])}
        hessians, rows = {}, {}
        for layer in layers:          # read only the Hessians these layers use
            key = layer.hessian_key
            i = index.get(repr(key))
            if i is None:
                raise UserError(f"--hessians {path}: has no Hessian for layer {layer.name} "
                                f"(saved with other --exclude or --op-types?); {again}")
            if key not in hessians:
                H, n = _arrays(npz, i, layer)
                if H is None:
                    raise UserError(f"--hessians {path}: damaged (the Hessian of layer {layer.name} is missing "
                                    f"or not {layer.groups} x {layer.cols} x {layer.cols} floats); {again}")
                hessians[key], rows[key] = xp.asarray(H), n
        ranges = _ranges(npz, header.get("ranges", []))
        if ranges is None:
            raise UserError(f"--hessians {path}: damaged (its activation ranges); {again}")
    return Captured(hessians, rows, header["samples"], ranges=ranges)


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


def _arrays(npz, i: int, layer: Layer):
    """Hessian i of the file and its row count, checked against the layer; (None, None) if
    they are missing or do not fit."""
    try:
        H, n = npz[f"h{i}"], npz[f"rows{i}"]
    except (KeyError, ValueError, OSError, zipfile.BadZipFile):
        return None, None
    if (H.shape != (layer.groups, layer.cols, layer.cols) or not np.issubdtype(H.dtype, np.floating)
            or n.shape != () or not np.issubdtype(n.dtype, np.integer)):
        return None, None
    return H, int(n)
