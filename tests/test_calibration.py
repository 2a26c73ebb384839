"""Calibration data with known answers: images -> tensors, arrays, batching, random, presets."""
import json

import numpy as np
import onnx
import pytest
from onnx import helper
from PIL import Image

from onnxobq import agreement
from onnxobq.agreement import Comparison
from onnxobq.calibration import (CalibConfig, ImageOptions, Replay, batch_size_for, batches, describe,
                                 planned_samples, spread)
from onnxobq.types import InputSpec
from onnxobq.runtime import model_inputs
from onnxobq.cli import main
from onnxobq.config import IMAGE_PRESETS
from onnxobq.errors import UserError
from onnxobq.graph import load_model

import builders

F32 = np.dtype(np.float32)


def spec(shape, dtype=F32, name="x"):
    return InputSpec(name, tuple(shape), np.dtype(dtype))


def feed(source, shape, dtype=F32, **image):
    """All batches of ``source`` for one input ``x`` of ``shape`` (dynamic batch, batch_size 64)."""
    cfg = CalibConfig(source=str(source), batch_size=64, image=ImageOptions(**image))
    return [b["x"] for b in batches(cfg, [spec(shape, dtype)])]


def one(source, shape, **image):
    (x,) = feed(source, shape, **image)
    return x


def save(folder, name, pixels):
    """Write a uint8 (H, W, 3) or (H, W) array as an image file and return its path."""
    folder.mkdir(exist_ok=True)
    path = folder / name
    extra = {"quality": 95} if name.endswith((".jpg", ".jpeg")) else {}
    Image.fromarray(np.asarray(pixels, np.uint8)).save(path, **extra)
    return path


def columns(h, w):
    """(h, w, 3) uint8 whose pixel (i, j) is (10 j + i, 100 + j, 250 - 20 j): every column different."""
    i, j = np.mgrid[0:h, 0:w]
    return np.stack([10 * j + i, 100 + j, 250 - 20 * j], axis=-1).astype(np.uint8)


def solid(h, w, rgb):
    return np.broadcast_to(np.asarray(rgb, np.uint8), (h, w, 3)).copy()


def chw(pixels):
    """What the default options produce: RGB / 255, NCHW, with the batch axis."""
    return (np.asarray(pixels, np.float32) * np.float32(1 / 255)).transpose(2, 0, 1)[None]


# ----------------------------------------------------------------------------- images

@pytest.mark.parametrize("ext", ["png", "bmp"])
def test_lossless_image_at_the_models_size_is_exact(tmp_path, ext):
    px = columns(2, 3)
    save(tmp_path, f"a.{ext}", px)
    x = one(tmp_path, [None, 3, 2, 3])
    assert x.dtype == np.float32 and x.shape == (1, 3, 2, 3)
    np.testing.assert_allclose(x, chw(px), rtol=1e-6)
    assert x[0, 0, 1, 2] == pytest.approx(21 / 255) and x[0, 2, 0, 1] == pytest.approx(230 / 255)


def test_jpeg_decodes_to_within_compression_error(tmp_path):
    save(tmp_path, "a.jpg", solid(8, 8, (200, 100, 50)))
    x = one(tmp_path, [1, 3, 8, 8], scale=1.0)
    assert np.abs(x - np.array([200, 100, 50], np.float32)[None, :, None, None]).max() <= 3


def test_stretch_ignores_the_aspect_ratio(tmp_path):
    # every column is constant down the image, so a vertical-only stretch is exact
    px = np.repeat(columns(1, 8), 2, axis=0)                       # (2, 8)
    save(tmp_path, "a.png", px)
    x = one(tmp_path, [None, 3, 5, 8], scale=1.0)
    np.testing.assert_array_equal(x[0], np.repeat(px[:1], 5, axis=0).transpose(2, 0, 1).astype(np.float32))
    save(tmp_path / "s", "a.png", solid(3, 7, (9, 99, 199)))       # a solid colour stays itself at any size
    x = one(tmp_path / "s", [None, 3, 4, 4], scale=1.0)
    np.testing.assert_array_equal(x[0], np.broadcast_to(np.float32([9, 99, 199])[:, None, None], (3, 4, 4)))


@pytest.mark.parametrize("align,rows", [("center", slice(3, 5)), ("topleft", slice(0, 2))])
def test_letterbox_pads_rows(tmp_path, align, rows):
    px = np.repeat(columns(1, 8), 2, axis=0)                       # (2, 8): fits 8x8 without resizing
    save(tmp_path, "a.png", px)
    x = one(tmp_path, [None, 3, 8, 8], resize="letterbox", pad_value=114, pad_align=align, scale=1.0)[0]
    want = np.full((3, 8, 8), 114, np.float32)
    want[:, rows] = px.transpose(2, 0, 1)
    np.testing.assert_array_equal(x, want)


@pytest.mark.parametrize("align,cols", [("center", slice(1, 3)), ("topleft", slice(0, 2))])
def test_letterbox_scales_up_and_pads_columns(tmp_path, align, cols):
    save(tmp_path, "a.png", solid(2, 1, (30, 60, 90)))             # (2, 1) -> x2 -> (4, 2) in a 4x4
    x = one(tmp_path, [None, 3, 4, 4], resize="letterbox", pad_value=7, pad_align=align, scale=1.0)[0]
    want = np.full((3, 4, 4), 7, np.float32)
    want[:, :, cols] = np.float32([30, 60, 90])[:, None, None]
    np.testing.assert_array_equal(x, want)


def test_letterbox_pad_value_goes_through_scale_mean_std(tmp_path):
    save(tmp_path, "a.png", solid(2, 4, (255, 255, 255)))
    x = one(tmp_path, [None, 3, 4, 4], resize="letterbox", pad_value=51, scale=1 / 255,
            mean=(0.1, 0.2, 0.3), std=(0.5, 0.5, 0.5))[0]
    np.testing.assert_allclose(x[:, 0, 0], [(0.2 - 0.1) / 0.5, 0.0, (0.2 - 0.3) / 0.5], atol=1e-6)
    np.testing.assert_allclose(x[:, 1, 0], [1.8, 1.6, 1.4], atol=1e-6)


def test_crop_takes_the_centre(tmp_path):
    px = columns(4, 8)
    save(tmp_path, "a.png", px)
    x = one(tmp_path, [None, 3, 4, 4], resize="crop", scale=1.0)[0]   # short side already 4: no resize
    np.testing.assert_array_equal(x, px[:, 2:6].transpose(2, 0, 1).astype(np.float32))


def test_crop_resizes_the_short_side_first(tmp_path):
    px = columns(4, 8)
    save(tmp_path, "a.png", px)
    x = one(tmp_path, [None, 3, 2, 2], resize="crop", scale=1.0)[0]   # 4x8 -> 2x4 -> columns 1, 2
    half = np.asarray(Image.fromarray(px).resize((4, 2), Image.BILINEAR), np.float32)
    np.testing.assert_array_equal(x, half[:, 1:3].transpose(2, 0, 1))


def test_rgb_bgr_scale_mean_std(tmp_path):
    save(tmp_path, "a.png", solid(2, 2, (50, 60, 70)))
    rgb = one(tmp_path, [None, 3, 2, 2], scale=1.0, mean=(10, 20, 30), std=(2, 4, 5))
    np.testing.assert_allclose(rgb[0, :, 0, 0], [20, 10, 8])
    # BGR flips the pixels first; mean/std are in the model's channel order
    bgr = one(tmp_path, [None, 3, 2, 2], channel_order="bgr", scale=1.0, mean=(10, 20, 30), std=(2, 4, 5))
    np.testing.assert_allclose(bgr[0, :, 0, 0], [30, 10, 4])
    x = one(tmp_path, [None, 3, 2, 2], scale=0.5, mean=(1,), std=(4,))
    np.testing.assert_allclose(x[0, :, 1, 1], [6.0, 7.25, 8.5])


def test_nchw_and_nhwc(tmp_path):
    px = columns(2, 4)
    save(tmp_path, "a.png", px)
    nchw = one(tmp_path, [None, 3, 2, 4], scale=1.0)
    nhwc = one(tmp_path, [None, 2, 4, 3], scale=1.0)             # inferred from the trailing 3
    assert nchw.shape == (1, 3, 2, 4) and nhwc.shape == (1, 2, 4, 3)
    np.testing.assert_array_equal(nhwc[0], px.astype(np.float32))
    np.testing.assert_array_equal(nchw[0], px.transpose(2, 0, 1).astype(np.float32))
    save(tmp_path / "sq", "a.png", columns(3, 3))                # 3x3x3: ambiguous, nchw unless told
    forced = one(tmp_path / "sq", [None, 3, 3, 3], layout="nhwc", scale=1.0)
    np.testing.assert_array_equal(forced[0], columns(3, 3).astype(np.float32))
    default = one(tmp_path / "sq", [None, 3, 3, 3], scale=1.0)
    np.testing.assert_array_equal(default[0], columns(3, 3).transpose(2, 0, 1).astype(np.float32))


@pytest.mark.parametrize("shape", [[None, 1, 2, 3], [None, 2, 3, 1]])
def test_grayscale_model(tmp_path, shape):
    gray = np.array([[0, 10, 20], [30, 40, 255]], np.uint8)
    save(tmp_path, "a.png", gray)                                          # an L image
    save(tmp_path, "b.png", np.stack([gray] * 3, axis=-1))                 # a grey RGB image: same L
    save(tmp_path, "c.png", solid(2, 3, (255, 0, 0)))                      # pure red: L = 76
    x = one(tmp_path, shape, scale=1.0, mean=(5,), std=(5,))
    assert x.shape == (3,) + tuple(shape[1:])
    want = (gray.astype(np.float32) - 5) / 5
    np.testing.assert_array_equal(x[0].reshape(2, 3), want)
    np.testing.assert_array_equal(x[1].reshape(2, 3), want)
    np.testing.assert_array_equal(x[2].reshape(2, 3), np.full((2, 3), (76 - 5) / 5, np.float32))


def test_grayscale_with_a_width_of_three_is_not_normalised_across_the_width(tmp_path, flags):
    """Was: a 3-value mean broadcast over the width axis of a (H, 3) grey image."""
    save(tmp_path, "a.png", np.full((2, 3), 100, np.uint8))
    with pytest.raises(UserError, match=r"--mean 1,2,3: 3 values, but input 'x' has 1 channel; give 1 value"):
        one(tmp_path, [None, 1, 2, 3], scale=1.0, mean=(1, 2, 3))


def test_images_in_name_order_and_a_single_file(tmp_path):
    for i, name in enumerate(["b.png", "a.bmp", "c.jpeg", "skip.txt"]):
        if name.endswith("txt"):
            (tmp_path / name).write_text("not an image")
        else:
            save(tmp_path, name, solid(2, 2, (10 * (i + 1), 0, 0)))
    x = one(tmp_path, [None, 3, 2, 2], scale=1.0)
    np.testing.assert_allclose(x[:, 0, 0, 0], [20, 10, 30], atol=3)   # a.bmp, b.png, c.jpeg
    assert one(tmp_path / "b.png", [None, 3, 2, 2], scale=1.0)[0, 0, 0, 0] == 10


def test_size_for_a_dynamic_image_input(tmp_path, flags):
    save(tmp_path, "a.png", solid(3, 5, (1, 2, 3)))
    x = one(tmp_path, [None, 3, None, None], size=(4, 6), scale=1.0)
    assert x.shape == (1, 3, 4, 6) and (x[0, 2] == 3).all()
    with pytest.raises(UserError, match=r"dynamic image size \[\?, 3, \?, \?\]; give one with --size HxW"):
        one(tmp_path, [None, 3, None, None])
    with pytest.raises(UserError, match=r"--size 4x6 does not fit input 'x' \[\?, 3, 2, 2\]"):
        one(tmp_path, [None, 3, 2, 2], size=(4, 6))


# ----------------------------------------------------------------------------- arrays

def test_npy_with_and_without_a_batch_axis(tmp_path):
    data = np.arange(4 * 3 * 2 * 2, dtype=np.float32).reshape(4, 3, 2, 2)
    np.save(tmp_path / "batch.npy", data)
    np.save(tmp_path / "single.npy", data[0])
    (x,) = feed(tmp_path / "batch.npy", [None, 3, 2, 2])
    np.testing.assert_array_equal(x, data)
    (x,) = feed(tmp_path / "single.npy", [None, 3, 2, 2])
    np.testing.assert_array_equal(x, data[:1])


def test_folder_of_arrays_in_name_order(tmp_path):
    r = np.random.default_rng(0)
    a, b, c = (r.standard_normal(s).astype(np.float64) for s in [(2, 3), (3,), (3, 3)])
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", b)                    # one sample, no batch axis
    np.savez(tmp_path / "c.npz", x=c)
    (tmp_path / "notes.txt").write_text("skip me")
    (x,) = feed(tmp_path, [None, 3])
    assert x.dtype == np.float32                      # cast to the input's dtype
    np.testing.assert_allclose(x, np.concatenate([a, b[None], c]).astype(np.float32))
    cfg = CalibConfig(source=str(tmp_path))
    assert planned_samples(cfg, [spec([None, 3])]) == 6


def test_npz_feeds_several_inputs(tmp_path):
    x = np.arange(6, dtype=np.float32).reshape(3, 2)
    ids = np.array([[1], [0], [1]], np.int32)
    np.savez(tmp_path / "d.npz", x=x, ids=ids)
    cfg = CalibConfig(source=str(tmp_path / "d.npz"), batch_size=2)
    got = list(batches(cfg, [spec([None, 2]), spec([None, 1], np.int64, "ids")]))
    assert [b["x"].shape[0] for b in got] == [2, 1]
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in got]), x)
    assert all(b["ids"].dtype == np.int64 for b in got)
    np.testing.assert_array_equal(np.concatenate([b["ids"] for b in got])[:, 0], [1, 0, 1])


# ----------------------------------------------------------------------------- batching

def samples_file(tmp_path, n, shape=(3,)):
    data = (np.arange(n)[:, None] * np.ones(shape).reshape(1, -1)).reshape((n,) + shape).astype(np.float32)
    np.save(tmp_path / "d.npy", data)
    return str(tmp_path / "d.npy"), data


def firsts(got):
    """The sample numbers in each batch (each sample is filled with its index)."""
    return [b["x"].reshape(len(b["x"]), -1)[:, 0].astype(int).tolist() for b in got]


def test_fixed_batch_of_one_feeds_one_sample_at_a_time(tmp_path):
    source, _ = samples_file(tmp_path, 5)
    cfg = CalibConfig(source=source, batch_size=8)
    inputs = [spec([1, 3])]
    assert batch_size_for(cfg, inputs) == 1
    assert firsts(batches(cfg, inputs)) == [[0], [1], [2], [3], [4]]
    assert planned_samples(cfg, inputs) == 5


def test_fixed_batch_gets_full_groups_and_drops_leftovers(tmp_path):
    source, _ = samples_file(tmp_path, 5)
    cfg = CalibConfig(source=source, batch_size=8)
    inputs = [spec([2, 3])]
    assert firsts(batches(cfg, inputs)) == [[0, 1], [2, 3]]
    assert planned_samples(cfg, inputs) == 4
    cfg = CalibConfig(source=source, samples=3)
    assert firsts(batches(cfg, inputs)) == [[0, 1]]
    assert planned_samples(cfg, inputs) == 2


def test_dynamic_batch_uses_batch_size_with_a_short_last_batch(tmp_path):
    source, _ = samples_file(tmp_path, 5)
    inputs = [spec([None, 3])]
    cfg = CalibConfig(source=source, batch_size=2)
    assert firsts(batches(cfg, inputs)) == [[0, 1], [2, 3], [4]]
    assert planned_samples(cfg, inputs) == 5
    cfg = CalibConfig(source=source, batch_size=2, samples=3)
    assert firsts(batches(cfg, inputs)) == [[0, 1], [2]]
    assert planned_samples(cfg, inputs) == 3
    cfg = CalibConfig(source=source, batch_size=64, samples=100)
    assert firsts(batches(cfg, inputs)) == [[0, 1, 2, 3, 4]]
    assert planned_samples(cfg, inputs) == 5


def test_inputs_that_fix_different_batches_are_refused():
    cfg = CalibConfig(source="random")
    with pytest.raises(UserError, match=r"fix different batch sizes \[1, 2\]"):
        batch_size_for(cfg, [spec([1, 3]), spec([2, 3], name="y")])


def test_samples_of_different_shapes_are_never_stacked(tmp_path):
    def fill(n, hw, start):
        return (np.arange(start, start + n, dtype=np.float32)[:, None, None, None]
                * np.ones((1, 1) + hw, np.float32))
    np.save(tmp_path / "a.npy", fill(3, (2, 2), 0))
    np.save(tmp_path / "b.npy", fill(2, (3, 3), 3))
    np.save(tmp_path / "c.npy", fill(1, (2, 2), 5)[0])   # one sample without a batch axis
    dynamic = [spec([None, 1, None, None])]
    got = list(batches(CalibConfig(source=str(tmp_path), batch_size=8), dynamic))
    assert [b["x"].shape for b in got] == [(3, 1, 2, 2), (2, 1, 3, 3), (1, 1, 2, 2)]
    assert firsts(got) == [[0, 1, 2], [3, 4], [5]]
    fixed = [spec([2, 1, None, None])]                   # a fixed batch: leftovers of each shape dropped
    got = list(batches(CalibConfig(source=str(tmp_path)), fixed))
    assert [b["x"].shape for b in got] == [(2, 1, 2, 2), (2, 1, 3, 3)]
    assert firsts(got) == [[0, 1], [3, 4]]


# ----------------------------------------------------------------------------- replay

def test_replay_reads_the_source_once_and_gives_the_same_batches(tmp_path, monkeypatch):
    source, _ = samples_file(tmp_path, 5)
    cfg, inputs = CalibConfig(source=source, batch_size=2), [spec([None, 3])]
    want = list(batches(cfg, inputs))
    reads = builders.counted_reads(monkeypatch)
    replay = Replay(cfg)
    passes = [list(batches(replay, inputs)) for _ in range(3)]
    assert len(reads) == 1
    for got in passes:
        assert firsts(got) == [[0, 1], [2, 3], [4]]
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a["x"], b["x"])
    with pytest.raises(ValueError, match="read-only"):
        passes[1][0]["x"][0, 0] = 7     # a consumer may not change what later passes see


def test_replay_past_its_limit_reads_every_pass(tmp_path, monkeypatch):
    source, _ = samples_file(tmp_path, 5)
    cfg, inputs = CalibConfig(source=source, batch_size=2), [spec([None, 3])]
    reads = builders.counted_reads(monkeypatch)
    replay = Replay(cfg, max_bytes=4 * 3 * 4)            # the first two batches fit, the third does not
    passes = [firsts(batches(replay, inputs)) for _ in range(3)]
    assert len(reads) == 3 and passes == [[[0, 1], [2, 3], [4]]] * 3


def test_replay_keeps_only_a_complete_pass_for_the_same_inputs(tmp_path, monkeypatch):
    source, _ = samples_file(tmp_path, 5)
    cfg = CalibConfig(source=source, batch_size=2)
    reads = builders.counted_reads(monkeypatch)
    replay = Replay(cfg)
    first = next(iter(batches(replay, [spec([None, 3])])))   # a pass left after one batch
    assert firsts([first]) == [[0, 1]]
    assert firsts(batches(replay, [spec([None, 3])])) == [[0, 1], [2, 3], [4]]
    assert len(reads) == 2
    assert firsts(batches(replay, [spec([1, 3])])) == [[0], [1], [2], [3], [4]]  # other inputs: read again
    assert len(reads) == 3


@pytest.mark.parametrize("shape, samples, limit, want", [
    ([None, 3], None, 4, [[0, 2], [5, 7]]),          # 10 samples, 4 of them at even steps: i * 10 // 4
    ([None, 3], 6, 3, [[0, 2], [4]]),                # spread over the --samples cut of 6
    ([3, 3], None, 4, [[0, 3, 6]]),                  # a fixed batch of 3: rounded down to 3 samples
    ([None, 3], None, 1, [[0]]),
])
def test_spread_takes_samples_at_even_steps_read_or_replayed(tmp_path, monkeypatch, shape, samples, limit, want):
    source, _ = samples_file(tmp_path, 10)
    cfg, inputs = CalibConfig(source=source, batch_size=2, samples=samples), [spec(shape)]
    assert firsts(batches(spread(cfg, limit, inputs), inputs)) == want
    assert planned_samples(spread(cfg, limit, inputs), inputs) == sum(map(len, want))
    reads = builders.counted_reads(monkeypatch)
    replay = Replay(cfg)
    whole = firsts(batches(replay, inputs))
    assert firsts(batches(spread(replay, limit, inputs), inputs)) == want      # from the kept pass
    assert firsts(batches(replay, inputs)) == whole and len(reads) == 1


def test_spread_of_at_least_every_sample_is_the_source_itself(tmp_path):
    source, _ = samples_file(tmp_path, 5)
    cfg, inputs = CalibConfig(source=source, batch_size=2), [spec([None, 3])]
    replay = Replay(cfg)
    assert spread(cfg, 5, inputs) is cfg and spread(cfg, None, inputs) is cfg and spread(replay, 9, inputs) is replay


def test_spread_of_a_replay_past_its_limit_reads_and_keeps_the_picked_samples(tmp_path, monkeypatch):
    source, _ = samples_file(tmp_path, 10)
    cfg, inputs = CalibConfig(source=source, batch_size=2), [spec([None, 3])]
    reads = builders.counted_reads(monkeypatch)
    replay = Replay(cfg, max_bytes=4 * 3 * 4)            # not even the first two batches are kept
    assert firsts(batches(replay, inputs)) == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    cut = spread(replay, 3, inputs)
    assert [firsts(batches(cut, inputs)) for _ in range(2)] == [[[0, 3], [6]]] * 2
    assert len(reads) == 2                               # the picked pass fits, and is kept


def test_spread_of_an_array_source_reads_no_further_than_its_last_pick(tmp_path, monkeypatch):
    from onnxobq.calibration import batching
    for i in range(6):                                   # one file per sample, read in name order
        np.save(tmp_path / f"{i}.npy", np.full((1, 3), i, np.float32))
    read, chunks = [], batching.SOURCES["arrays"].chunks

    def counting(cfg, inputs):
        for chunk in chunks(cfg, inputs):
            read.append(int(chunk["x"][0, 0]))
            yield chunk
    monkeypatch.setattr(batching.SOURCES["arrays"], "chunks", counting)
    cfg, inputs = CalibConfig(source=str(tmp_path), batch_size=8), [spec([None, 3])]
    assert firsts(batches(spread(cfg, 2, inputs), inputs)) == [[0, 3]]     # i * 6 // 2
    assert read == [0, 1, 2, 3]


def test_spread_decodes_only_the_picked_images(tmp_path, monkeypatch):
    from onnxobq.calibration import images
    for i in range(7):
        save(tmp_path, f"{i}.png", np.full((2, 2, 3), 10 * i, np.uint8))
    decoded, decode = [], images.preprocess_image
    monkeypatch.setattr(images, "preprocess_image", lambda path, *a: decoded.append(path) or decode(path, *a))
    cfg, inputs = CalibConfig(source=str(tmp_path), batch_size=8, image=ImageOptions(scale=1.0)), [spec([None, 3, 2, 2])]
    (got,) = batches(spread(cfg, 3, inputs), inputs)
    assert got["x"][:, 0, 0, 0].tolist() == [0.0, 20.0, 40.0]         # files 0, 2, 4 of 7 (i * 7 // 3)
    assert [p.rsplit("/", 1)[1] for p in decoded] == ["0.png", "2.png", "4.png"]


# ----------------------------------------------------------------------------- random

def random_batches(inputs, **kw):
    kw.setdefault("batch_size", 1000)
    return list(batches(CalibConfig(source="random", **kw), inputs))


def test_random_is_seeded():
    inputs = [spec([None, 3, 4, 4])]
    a, b = random_batches(inputs, seed=7), random_batches(inputs, seed=7)
    c = random_batches(inputs, seed=8)
    np.testing.assert_array_equal(a[0]["x"], b[0]["x"])
    assert not np.array_equal(a[0]["x"], c[0]["x"])
    assert a[0]["x"].shape == (8, 3, 4, 4) and a[0]["x"].dtype == np.float32


def test_random_floats_are_standard_normal_and_ints_are_zero_or_one():
    inputs = [spec([None, 500]), spec([None, 50], np.int64, "ids"), spec([None, 50], bool, "mask")]
    (b,) = random_batches(inputs, samples=100)
    x = b["x"].astype(np.float64)
    assert x.shape == (100, 500)
    assert abs(x.mean()) < 0.01 and abs(x.std() - 1) < 0.01
    assert b["ids"].dtype == np.int64 and set(np.unique(b["ids"])) == {0, 1}
    assert b["mask"].dtype == bool and 0.4 < b["mask"].mean() < 0.6


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_random_floats_are_drawn_in_each_float_dtype(dtype):
    (b,) = random_batches([spec([None, 500], dtype)], samples=100)
    x = b["x"]
    assert x.dtype == dtype and x.shape == (100, 500)
    assert abs(x.astype(np.float64).mean()) < 0.01 and abs(x.astype(np.float64).std() - 1) < 0.01
    # float32 and float64 are drawn in their own dtype (float16 from float32 draws), seed 0
    drawn = np.random.default_rng(0).standard_normal((100, 500), dtype=np.float64 if dtype == np.float64
                                                      else np.float32)
    np.testing.assert_array_equal(x, drawn.astype(dtype))


@pytest.mark.parametrize("given", [(1, 3, 5, 7), (3, 5, 7)])
def test_random_shapes_fill_dynamic_dims(given):
    got = random_batches([spec([None, 3, None, None])], shapes={"x": given}, samples=20, batch_size=8)
    assert [b["x"].shape for b in got] == [(8, 3, 5, 7), (8, 3, 5, 7), (4, 3, 5, 7)]


def test_random_counts():
    inputs = [spec([None, 2])]
    assert sum(len(b["x"]) for b in random_batches(inputs)) == 8               # default
    assert sum(len(b["x"]) for b in random_batches(inputs, samples=40)) == 40  # over several chunks
    assert planned_samples(CalibConfig(source="random", samples=40), inputs) == 40
    # a model that fixes a batch of 16 gets one full batch by default (was: 8 samples, all dropped)
    fixed = [spec([16, 2])]
    got = random_batches(fixed)
    assert [len(b["x"]) for b in got] == [16]
    assert planned_samples(CalibConfig(source="random"), fixed) == 16


# ----------------------------------------------------------------------------- presets, through the CLI

def image_model(path, shape):
    """x -> Relu -> y: an image input to feed (compare is faked, the model never runs)."""
    m = builders.make_model([helper.make_node("Relu", ["x"], ["y"], name="r")],
                            [builders.fvi("x", shape)], [builders.fvi("y", shape)])
    onnx.save(m, path)
    return path


@pytest.fixture
def fed(tmp_path, monkeypatch, capsys):
    """Run ``onnxobq compare MODEL MODEL --calib IMAGES *options`` and return the batches it would feed."""
    seen = {}

    def fake_compare(float_path, quant_path, calib, device, on_batch):
        seen["calib"] = calib
        seen["batches"] = list(batches(calib, model_inputs(load_model(float_path))))
        return Comparison([], 0, describe(calib))

    monkeypatch.setattr(agreement, "compare_models", fake_compare)

    def run(model, images, *options):
        code = main(["compare", str(model), str(model), "--calib", str(images), *map(str, options), "--json"])
        out, err = capsys.readouterr()
        assert code == 0, err
        assert json.loads(out) == []
        return np.concatenate([b["x"] for b in seen["batches"]]), seen["calib"]
    return run


def test_presets_are_the_ones_tested_here():
    assert sorted(IMAGE_PRESETS) == ["imagenet", "ppocr", "yolo", "yolox"]


def test_preset_imagenet_crops_and_normalises(tmp_path, fed):
    model = image_model(tmp_path / "m.onnx", [1, 3, 4, 4])
    px = columns(4, 8)
    save(tmp_path / "img", "a.png", px)
    _, calib = fed(model, tmp_path / "img", "--preset", "imagenet")
    assert calib.image.resize == "crop" and calib.image.crop_fraction == 0.875
    x, _ = fed(model, tmp_path / "img", "--preset", "imagenet", "--crop-fraction", "1")
    mean, std = np.float32([0.485, 0.456, 0.406]), np.float32([0.229, 0.224, 0.225])
    want = (px[:, 2:6].astype(np.float32) * np.float32(1 / 255) - mean) / std
    np.testing.assert_allclose(x[0], want.transpose(2, 0, 1), rtol=1e-5, atol=1e-6)


def test_crop_fraction_keeps_the_centre_share(tmp_path, fed):
    """An 8x8 image cropped to 4x4 with fraction 0.5 is not resized: the crop is its centre."""
    model = image_model(tmp_path / "m.onnx", [1, 3, 4, 4])
    px = (np.arange(8 * 8 * 3).reshape(8, 8, 3) % 251).astype(np.uint8)
    save(tmp_path / "img", "a.png", px)
    x, _ = fed(model, tmp_path / "img", "--resize", "crop", "--crop-fraction", "0.5", "--scale", "1")
    np.testing.assert_array_equal(x[0], px[2:6, 2:6].astype(np.float32).transpose(2, 0, 1))


@pytest.mark.parametrize("preset,pad,rows,flip,scale,mean,std", [
    ("yolo", 114, slice(1, 3), False, 1 / 255, 0.0, 1.0),
    ("yolox", 114, slice(0, 2), True, 1.0, 0.0, 1.0),
    ("ppocr", 127.5, slice(0, 2), True, 1 / 255, 0.5, 0.5),
])
def test_letterbox_presets(tmp_path, fed, preset, pad, rows, flip, scale, mean, std):
    model = image_model(tmp_path / "m.onnx", [1, 3, 4, 4])
    rgb = np.float32([200, 100, 50])
    save(tmp_path / "img", "a.png", solid(2, 4, rgb))
    x, _ = fed(model, tmp_path / "img", "--preset", preset)
    image = (rgb[::-1] if flip else rgb) * np.float32(scale)
    want = np.full((3, 4, 4), (pad * scale - mean) / std, np.float32)
    want[:, rows] = ((image - mean) / std)[:, None, None]
    np.testing.assert_allclose(x[0], want, rtol=1e-5, atol=1e-6)
    if preset == "ppocr":
        assert (x[0, :, 2:] == 0).all()   # padding 127.5 is 0 after (x/255 - 0.5)/0.5


def test_explicit_options_override_the_preset(tmp_path, fed):
    model = image_model(tmp_path / "m.onnx", [1, 3, 4, 4])
    save(tmp_path / "img", "a.png", solid(2, 4, (200, 100, 50)))
    x, calib = fed(model, tmp_path / "img", "--preset", "yolo", "--pad-value", 0, "--channel-order", "bgr",
                   "--pad-align", "topleft", "--scale", 1, "--mean", "1,2,3", "--std", "2")
    assert calib.image == ImageOptions(resize="letterbox", pad_value=0.0, pad_align="topleft",
                                       channel_order="bgr", scale=1.0, mean=(1.0, 2.0, 3.0), std=(2.0,))
    np.testing.assert_allclose(x[0, :, 0, 0], [(50 - 1) / 2, (100 - 2) / 2, (200 - 3) / 2])
    np.testing.assert_allclose(x[0, :, 3, 0], [-0.5, -1.0, -1.5])
    x, calib = fed(model, tmp_path / "img", "--preset", "yolo", "--resize", "stretch")
    assert calib.image.resize == "stretch" and calib.image.pad_value == 114
    np.testing.assert_allclose(x[0, :, 3, 0], np.float32([200, 100, 50]) / 255, rtol=1e-6)


def test_no_preset_means_the_defaults(tmp_path, fed):
    model = image_model(tmp_path / "m.onnx", [1, 4, 4, 3])          # NHWC, inferred
    px = columns(4, 4)
    save(tmp_path / "img", "a.png", px)
    x, calib = fed(model, tmp_path / "img")
    assert calib.image == ImageOptions()
    np.testing.assert_allclose(x[0], px.astype(np.float32) / 255, rtol=1e-6)


def test_integer_image_input_gets_the_pixels(tmp_path):
    """A uint8 input takes the pixels themselves (was: x/255 truncated to 0 or 1)."""
    px = columns(2, 3)
    save(tmp_path, "a.png", px)
    x = one(tmp_path, [None, 2, 3, 3], dtype=np.uint8)
    assert x.dtype == np.uint8
    np.testing.assert_array_equal(x[0], px)
    # an explicit scale still applies, rounded and saturated to the integer range
    x = one(tmp_path, [None, 2, 3, 3], dtype=np.uint8, scale=2.0)
    np.testing.assert_array_equal(x[0], np.minimum(px.astype(int) * 2, 255))
    x = one(tmp_path, [None, 2, 3, 3], dtype=np.int8, scale=1.0, mean=(128,))
    np.testing.assert_array_equal(x[0], px.astype(int) - 128)


@pytest.mark.parametrize("n, limit, want", [(10, 8, [[0, 1, 2, 3, 4, 5, 6, 7]]), (36, 16, [list(range(0, 32, 2))[:8], list(range(16, 32, 2))])])
def test_spread_under_a_fixed_batch_picks_among_the_samples_used(tmp_path, monkeypatch, n, limit, want):
    """A fixed batch of 8 drops the leftovers: 10 samples use 8 (all of them for 8), 36 use 32 (16
    at steps of 2), read or replayed from the capture's kept pass alike."""
    source, _ = samples_file(tmp_path, n)
    cfg, inputs = CalibConfig(source=source), [spec([8, 3])]
    replay = Replay(cfg)
    list(batches(replay, inputs))
    reads = builders.counted_reads(monkeypatch)
    assert firsts(batches(spread(cfg, limit, inputs), inputs)) == want
    assert firsts(batches(spread(replay, limit, inputs), inputs)) == want and len(reads) == 1


def test_spread_under_a_fixed_batch_with_shapes_that_vary_takes_whole_batches(tmp_path):
    """Three files of 4 samples, 5, 7 and 5 wide, under a fixed batch of 4: picks at even steps
    (0, 1, 3, 4, 6, ...) would mix widths and fill no batch; whole kept batches fill two."""
    for i, width in enumerate((5, 7, 5)):
        np.save(tmp_path / f"{i}.npy", np.arange(4 * i, 4 * i + 4, dtype=np.float32)[:, None, None]
                * np.ones((1, 3, width), np.float32))
    inputs = [spec([4, 3, None])]
    replay = Replay(CalibConfig(source=str(tmp_path)))
    assert firsts(batches(replay, inputs)) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert firsts(batches(spread(replay, 8, inputs), inputs)) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert firsts(batches(spread(replay, 5, inputs), inputs)) == [[0, 1, 2, 3]]


def test_a_spread_replay_with_nothing_kept_reads_once_for_every_pass(tmp_path, monkeypatch):
    source, _ = samples_file(tmp_path, 10)
    cfg, inputs = CalibConfig(source=source, batch_size=2), [spec([None, 3])]
    reads = builders.counted_reads(monkeypatch)
    cut = spread(Replay(cfg), 4, inputs)                   # as with --hessians: no capture pass
    assert [firsts(batches(cut, inputs)) for _ in range(4)] == [[[0, 2], [5, 7]]] * 4
    assert len(reads) == 1


@pytest.mark.parametrize("channels", [1, 3])
def test_a_16_bit_png_is_read_on_the_8_bit_scale(tmp_path, channels):
    """(was: clipped at 255 by Pillow's convert, 96% of this image's pixels saturated)"""
    from PIL import Image
    from onnxobq.calibration.images import preprocess_image
    from onnxobq.config import ImageOptions
    wide = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)
    Image.fromarray(wide).save(tmp_path / "g16.png")
    x = preprocess_image(str(tmp_path / "g16.png"), ImageOptions(), "nchw", channels, (64, 64))
    assert x.shape == (channels, 64, 64)
    np.testing.assert_allclose(x, np.broadcast_to(wide / 65535.0, x.shape), atol=1e-6)


def test_a_float_image_is_refused(tmp_path, flags):
    from PIL import Image
    from onnxobq.calibration.images import preprocess_image
    from onnxobq.config import ImageOptions
    from onnxobq.errors import UserError
    Image.fromarray(np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8), mode="F").save(tmp_path / "f.tiff")
    with pytest.raises(UserError, match=r"f.tiff: a float image \(values from 0 to 1\), whose range is unknown; "
                                        "save the images as 8- or 16-bit PNG or JPEG"):
        preprocess_image(str(tmp_path / "f.tiff"), ImageOptions(), "nchw", 1, (8, 8))
