"""Calibration data: images, .npy/.npz arrays, random tensors or data in memory, as batches of feeds.

Every kind of data implements one protocol (sources.Source) that yields chunks of samples;
batches.batches re-cuts them into the batch the model takes, so host memory holds one batch
at a time, and batches.Replay keeps the first pass for BatchNorm's later ones.
"""
from ..config import IMAGE_PRESETS, CalibConfig, ImageOptions
from .batching import (Replay, batch_size_for, batches, describe, detect_kind, feed_samples, planned_samples, source_kind,
                      source_of, spread)
from .sources import MemorySource, OneShot, Source, in_memory

__all__ = ["IMAGE_PRESETS", "CalibConfig", "ImageOptions", "Replay", "batch_size_for", "batches", "describe", "detect_kind",
           "feed_samples", "planned_samples", "source_kind", "source_of", "spread", "MemorySource", "OneShot",
           "Source", "in_memory"]
