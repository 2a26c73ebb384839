"""Seeded synthetic text lines for the OCR benchmarks and the quickstart data.

The text is short English phrases (2-5 consecutive words) taken from the
docstrings of a fixed list of CPython standard-library modules. The modules
are split into two disjoint halves, ``"eval"`` and ``"calib"``, so that
calibration text never overlaps evaluation text.

Lines are rendered with PIL in the DejaVu fonts at 24-40 px, dark text on a
light background. The "hard" variant is downscaled 0.35-0.6x, blurred
(Gaussian radius 0.3-1.0), given Gaussian noise (sigma 4-14) and JPEG-encoded
at quality 20-50 (see docs/benchmarks.md, the recognizer's data).

Everything is deterministic given a seed: line ``i`` of a set with seed ``s``
is drawn from ``numpy.random.default_rng((s, i))``, so a longer set starts
with the lines of a shorter one, and the clean and hard sets made with the
same seed hold the same text and rendering (the hard one is degraded).

Note that docstrings change between Python versions, so the exact phrases
(not the procedure) depend on the interpreter version.
"""

from __future__ import annotations

import importlib
import io
import re
import warnings
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

#: Standard-library modules whose docstrings form the corpus (sorted, fixed).
#: All are pure-ASCII English prose and exist from Python 3.10 onwards.
CORPUS_MODULES = (
    "argparse", "ast", "calendar", "cmd", "codeop", "collections", "colorsys",
    "configparser", "copy", "csv", "dbm", "difflib", "doctest", "encodings",
    "fileinput", "ftplib", "gc", "getopt", "gettext", "hashlib", "heapq",
    "inspect", "io", "json", "linecache", "marshal", "mimetypes", "os", "pdb",
    "pickle", "plistlib", "pyclbr", "pydoc", "random", "re", "rlcompleter",
    "sched", "shelve", "site", "smtplib", "socket", "socketserver", "sqlite3",
    "ssl", "statistics", "string", "struct", "subprocess", "tempfile",
    "timeit", "tokenize", "typing", "unittest", "uuid", "wave", "zipimport",
)

#: DejaVu faces used for rendering (file names in ``FONT_DIR``).
FONT_FILES = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf",
    "DejaVuSans-BoldOblique.ttf", "DejaVuSansCondensed.ttf",
    "DejaVuSansCondensed-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf",
    "DejaVuSerif-Italic.ttf", "DejaVuSerifCondensed.ttf",
    "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf",
)

FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")

_WORD = re.compile(r"[A-Za-z]+(?:['-][A-Za-z]+)*")
_STRIP = "\"'`()[]{}<>,.;:!?*"


def docstring_words(module_name: str) -> list[str]:
    """Return the ASCII words of one module's docstring, in order.

    Surrounding punctuation is stripped from each whitespace-separated token,
    and only plain words (letters, with inner apostrophes or hyphens) are kept.

    Args:
        module_name: Name of a standard-library module.

    Returns:
        The list of kept words; empty if the module has no docstring.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        doc = importlib.import_module(module_name).__doc__ or ""
    words = []
    for token in doc.split():
        token = token.strip(_STRIP)
        if token.isascii() and _WORD.fullmatch(token):
            words.append(token)
    return words


def split_modules(modules: tuple[str, ...] = CORPUS_MODULES) -> dict[str, tuple[str, ...]]:
    """Split the corpus modules into two disjoint sources.

    Modules at even positions of the sorted list go to ``"eval"``, those at
    odd positions to ``"calib"``.

    Args:
        modules: Module names.

    Returns:
        ``{"eval": (...), "calib": (...)}``.
    """
    ordered = tuple(sorted(modules))
    return {"eval": ordered[0::2], "calib": ordered[1::2]}


@lru_cache(maxsize=None)
def corpus(source: str) -> tuple[tuple[str, ...], ...]:
    """Return the word lists of one corpus source, one tuple per module.

    Args:
        source: ``"eval"`` or ``"calib"``.

    Returns:
        A tuple of word tuples (modules with fewer than 5 words are dropped).
    """
    if source not in ("eval", "calib"):
        raise ValueError(f"source must be 'eval' or 'calib', not {source!r}")
    texts = (tuple(docstring_words(m)) for m in split_modules()[source])
    return tuple(t for t in texts if len(t) >= 5)


def sample_phrase(rng: np.random.Generator, source: str) -> str:
    """Draw a phrase of 2-5 consecutive words from one corpus source.

    Every start position in the source is equally likely; a phrase never
    spans two modules.

    Args:
        rng: Random generator.
        source: ``"eval"`` or ``"calib"``.

    Returns:
        The words joined by single spaces.
    """
    texts = corpus(source)
    n_words = int(rng.integers(2, 6))
    counts = np.array([len(t) - n_words + 1 for t in texts], dtype=np.float64)
    text = texts[int(rng.choice(len(texts), p=counts / counts.sum()))]
    start = int(rng.integers(0, len(text) - n_words + 1))
    return " ".join(text[start:start + n_words])


@lru_cache(maxsize=None)
def _font(path: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, size)


def font_paths(font_dir: Path = FONT_DIR) -> list[Path]:
    """Return the paths of the rendering fonts.

    Args:
        font_dir: Folder that holds the DejaVu ``.ttf`` files.

    Returns:
        Paths of the fonts in ``FONT_FILES`` (in that order).

    Raises:
        FileNotFoundError: If a font is missing.
    """
    paths = [Path(font_dir) / name for name in FONT_FILES]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"DejaVu fonts not found: {missing[0]} (Debian/Ubuntu: apt-get install fonts-dejavu-core fonts-dejavu-extra)")
    return paths


def render_line(text: str, rng: np.random.Generator, fonts: list[Path] | None = None) -> np.ndarray:
    """Render one line of dark text on a light background.

    The font is drawn from ``fonts``, the size from 24-40 px, the margins from
    2-8 px horizontally and 2-6 px vertically. The line height is the font's
    ascent plus descent, so it does not depend on the letters.

    Args:
        text: The text to draw.
        rng: Random generator.
        fonts: Font paths (default: ``font_paths()``).

    Returns:
        An RGB ``uint8`` array of shape (H, W, 3).
    """
    fonts = fonts or font_paths()
    font = _font(str(fonts[int(rng.integers(len(fonts)))]), int(rng.integers(24, 41)))
    ascent, descent = font.getmetrics()
    left, _, right, _ = font.getbbox(text)
    mx, my = int(rng.integers(2, 9)), int(rng.integers(2, 7))
    background = tuple(int(v) for v in rng.integers(200, 256, size=3))
    ink = tuple(int(v) for v in rng.integers(0, 70, size=3))
    image = Image.new("RGB", (right - left + 2 * mx, ascent + descent + 2 * my), background)
    ImageDraw.Draw(image).text((mx - left, my), text, font=font, fill=ink)
    return np.asarray(image)


def degrade(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Apply the "hard" degradation to a rendered line.

    Downscale by 0.35-0.6 (bilinear), Gaussian blur with radius 0.3-1.0,
    additive Gaussian noise with sigma 4-14, then JPEG at quality 20-50.
    The result stays at the reduced size.

    Args:
        image: RGB ``uint8`` array (H, W, 3).
        rng: Random generator.

    Returns:
        The degraded RGB ``uint8`` array (smaller than the input).
    """
    scale = rng.uniform(0.35, 0.6)
    h, w = image.shape[:2]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    pil = Image.fromarray(image).resize(size, Image.BILINEAR)
    pil = pil.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.3, 1.0)))
    noisy = np.asarray(pil, dtype=np.float64) + rng.normal(0.0, rng.uniform(4, 14), (size[1], size[0], 3))
    pil = Image.fromarray(np.clip(np.rint(noisy), 0, 255).astype(np.uint8))
    buffer = io.BytesIO()
    pil.save(buffer, format="JPEG", quality=int(rng.integers(20, 51)))
    buffer.seek(0)
    return np.asarray(Image.open(buffer).convert("RGB"))


def make_line(seed: int, index: int, source: str, hard: bool = False) -> tuple[np.ndarray, str]:
    """Make line ``index`` of the set with the given seed.

    The text and rendering use ``default_rng((seed, index))``; the
    degradation uses ``default_rng((seed, index, 1))``, so the clean and hard
    versions of a line share text, font and layout.

    Args:
        seed: Seed of the set.
        index: Line number within the set.
        source: Corpus source, ``"eval"`` or ``"calib"``.
        hard: Whether to apply ``degrade``.

    Returns:
        ``(image, label)``: RGB ``uint8`` array (H, W, 3) and its text.
    """
    rng = np.random.default_rng((seed, index))
    label = sample_phrase(rng, source)
    image = render_line(label, rng)
    if hard:
        image = degrade(image, np.random.default_rng((seed, index, 1)))
    return image, label


def make_lines(n: int, seed: int, source: str, hard: bool = False,
               start: int = 0) -> list[tuple[np.ndarray, str]]:
    """Make ``n`` lines of a seeded set.

    Args:
        n: Number of lines.
        seed: Seed of the set.
        source: Corpus source, ``"eval"`` or ``"calib"``.
        hard: Whether to apply the "hard" degradation.
        start: Index of the first line.

    Returns:
        A list of ``(image, label)`` pairs (see ``make_line``).
    """
    return [make_line(seed, i, source, hard) for i in range(start, start + n)]


if __name__ == "__main__":
    for src in ("eval", "calib"):
        print(src, sum(len(t) for t in corpus(src)), "words:", " | ".join(
            make_line(0, i, src)[1] for i in range(5)))
