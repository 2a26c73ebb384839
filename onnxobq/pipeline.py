"""The whole run, top down: load -> calibrate -> capture -> solve -> BN -> export -> report.

``run`` is the stage calls; each stage is a function below it. The API (api.quantize) builds
the config and checks it; this module assumes settings that config.check has passed.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import onnx

from .backend import Device, choose_device, peak_rss_mb
from .bn.stage import PASSES, BNOutcome, reestimate
from .calibration import Replay, batches, describe, planned_samples, source_kind, spread
from .capturing import capture_hessians
from .agreement import CALIBRATION_KEY
from .config import QuantizeConfig
from .errors import UserError, option
from .export import build_model, model_opset, prepare_opset, storage_type
from .graph import load, save_model, scan_folded
from .graph.io import serialized
from .hessians import Hessians, from_file, model_digest
from .inspection import float_weights
from .quant.activations import activation_scales
from .report import Report, versions, write_json
from .runtime import check_opset, check_runs, model_inputs, newest_opset
from .selection import (check_blocked_matmuls, check_layers, exclude, float_inputs, grouping_option, layer_grid,
                        unmatched_notes)
from .solve import solve_all
from .solvers import METHODS
from .types import QUANTIZABLE_OPS, Captured, LayerScan


class Progress:
    """Callbacks for progress bars; the default shows nothing."""

    def start(self, what: str, total: int | None) -> None: ...
    def advance(self, n: int = 1) -> None: ...
    def finish(self) -> None: ...


@dataclass
class Loaded:
    """The model as the run quantizes it.

    Attributes:
        model: converted to the output's opset, with weights that constants compute folded.
        name: how messages name it; files: its file and external data (none in memory).
        found: every layer found; scan: those to quantize.
        notes: the fold's and the opset's notes.
        external: its weights are stored outside the model file (the output's are then too).
    """

    model: onnx.ModelProto
    name: str
    files: list
    found: LayerScan
    scan: LayerScan
    notes: list
    external: bool


def run(cfg: QuantizeConfig, progress: Progress | None = None) -> Report:
    """Quantize ``cfg.model`` and return the report (with the model where ``cfg.output`` is None)."""
    progress = progress or Progress()
    stages: dict[str, float] = {}
    with _stage(stages, "load"):
        loaded = load_stage(cfg)
        device = choose_device(cfg.device, cfg.solve.precision)
        digest = model_digest(cfg.model if isinstance(cfg.model, onnx.ModelProto) else loaded.name)
    # BatchNorm's four passes replay the batches that the first pass read, where they fit
    calib = (Replay(cfg.calib, device.tuning.replay_bytes) if cfg.calib is not None and cfg.bn.reestimate
             else cfg.calib)
    described = describe(cfg.calib)
    captured = hessian_stage(cfg, loaded, calib, device, digest, described, stages, progress)
    act_skip = float_inputs(cfg, loaded.scan.layers)
    act_layers = [use for layer in loaded.scan.layers for use in layer.each_use() if use.name not in act_skip]
    act_scales, act_notes = _activation_scales(cfg, act_layers, captured)
    with _stage(stages, "solve"):
        qlayers, stats = solve_all(loaded.scan, captured, cfg, device, progress)
    loaded.scan.weights.clear()     # the float weights' copies: the codes replace them from here on
    opset = model_opset(loaded.model)
    outcome = BNOutcome(qlayers=qlayers)
    if cfg.bn.reestimate and cfg.calib is not None:
        with _stage(stages, "bn"), _bar(progress, "batchnorm", _bn_planned(cfg, calib, loaded)):
            outcome = reestimate(loaded.model, qlayers, cfg.bn, calib, opset, cfg.solve.grid.symmetric, device,
                                 progress.advance)
    kept = outcome.qlayers if outcome.kept else qlayers
    with _stage(stages, "export"):
        out = build_model(loaded.model, kept, cfg.format, opset, cfg.solve.grid.symmetric,
                          outcome.edits if outcome.kept else (), act_scales, act_skip)
        _record(out, CALIBRATION_KEY, described)   # compare warns where it is given this same data
    written = []
    try:        # a failed or interrupted run leaves no output behind
        with _stage(stages, "export"):
            written = save_model(out, cfg.output, external=True if loaded.external else None) if cfg.output else []
            _check_output(out, written, calib, loaded)
        report = Report(settings=_settings(cfg, opset, loaded.name), layers=stats, skipped=loaded.scan.skipped,
                        stages=stages, samples=captured.samples, device=device.name,
                        storage=_storage(cfg, opset, kept), peak_rss_mb=peak_rss_mb(),
                        peak_gpu_mb=device.peak_gpu_mb(), bn=_bn_summary(outcome, cfg), outputs=written,
                        capture_waited=captured.waited,
                        activations=_activation_summary(cfg, act_layers, act_scales, sorted(act_skip)),
                        notes=loaded.notes + act_notes + unmatched_notes(cfg, loaded.found, loaded.scan),
                        model=loaded.name, model_sha256=digest, calibration=described,
                        weights=_weights(loaded, kept, outcome.edits if outcome.kept else ()), versions=versions(),
                        quantized_model=None if cfg.output else out)
        if cfg.report:
            write_json(report, cfg.report)
    except BaseException:
        for path in written:
            os.unlink(path)
        raise
    return report


def _check_output(out: onnx.ModelProto, written: list, calib, loaded: Loaded) -> None:
    """Check that onnxruntime's default session runs the model written on one calibration sample
    (only loads it where there is no data it can read again)."""
    feed = _first_sample(calib, model_inputs(loaded.model))
    if written:
        check_runs(written[0], feed, written[0], _OUTPUT_FIX)
        return
    with serialized(out) as source:
        check_runs(source, feed, "the quantized model", _OUTPUT_FIX)


_OUTPUT_FIX = ("nothing was written; please report it with the command and the model's inspect output, and try "
               "other settings meanwhile")


def _first_sample(calib, inputs: list) -> dict | None:
    """The first sample (the first batch, where the batch is fixed) of the calibration data, or None
    where there is none or it cannot be read again."""
    if calib is None:
        return None
    try:
        feed = next(iter(batches(calib, inputs)), None)
    except UserError:
        return None
    if feed is None or any(spec.fixed_batch is not None for spec in inputs):
        return feed
    return {name: a[:1] for name, a in feed.items()}


def load_stage(cfg: QuantizeConfig) -> Loaded:
    """Load the model, fold computed weights, scan its layers, convert it to the output's opset
    (INT4 storage at 4 bits and below where the output can have it), and check what the run needs."""
    model, name, files = load(cfg.model)
    # which layers get groups or 4 bits and below decides the opset: scan first where settings differ by layer
    first = scan_folded(model) if (cfg.format == "qdq" and cfg.grouped) or cfg.layer_bits else None
    layers = exclude(first[1], cfg.exclude, cfg.op_types).layers if first else []
    grouped = grouping_option(cfg, layers) if cfg.format == "qdq" and cfg.grouped else ""
    small = any(layer_grid(layer, cfg).bits <= 4 for layer in layers) if first else cfg.solve.grid.bits <= 4
    converted, opset_note = prepare_opset(model, cfg.format, cfg.opset, activations=cfg.act_bits is not None,
                                          grouped=grouped, int4=small and cfg.format == "qdq"
                                          and cfg.act_bits is None and cfg.opset is None)
    qdq = cfg.format == "qdq" or cfg.act_bits is not None
    if cfg.opset is not None and cfg.opset > model_opset(model):
        fix, fake = f"give {option('opset', newest_opset(qdq))} or lower", ""
    else:
        fake = f", or use {option('format', 'fake')}" if cfg.act_bits is None else ""
        fix = "re-export the model at an older opset"
    check_opset(converted, name, qdq, fix, fake)
    folded, found, notes = first if first and converted is model else scan_folded(converted)
    scan = exclude(found, cfg.exclude, cfg.op_types)
    found = dataclasses.replace(found, weights={})     # the arrays of the layers left out are not kept
    check_layers(cfg, scan, name)
    check_blocked_matmuls(cfg, scan.layers, name)
    check_data(cfg)
    # files: the model's own, then the external data files its tensors name
    return Loaded(folded, name, files, found, scan, notes + ([opset_note] if opset_note else []), len(files) > 1)


def check_data(cfg: QuantizeConfig) -> None:
    """Refuse a run that lacks the data its settings need."""
    if cfg.calib is None and cfg.save_hessians is not None:
        raise UserError(f"{option('save_hessians', cfg.save_hessians)}: there are no Hessians to save without "
                        f"calibration data; give {option('calibration', 'FOLDER|FILE')}")
    if cfg.calib is None and cfg.hessians is not None and cfg.bn.reestimate:
        raise UserError(f"{option('hessians', cfg.hessians_name)}: BatchNorm re-estimation still needs the calibration "
                        f"data; give the {option('calibration')} options the Hessians were saved with, or "
                        f"{option('bn_reestimate', False)}")
    if METHODS[cfg.solve.method].uses_hessian and cfg.calib is None and cfg.hessians is None:
        raise UserError(f"{option('method', cfg.solve.method)} needs calibration data: give "
                        f"{option('calibration', 'FOLDER|FILE')}, or {option('calibration', 'random')} for a smoke run")
    if cfg.act_bits is not None and cfg.calib is None and cfg.hessians is None:
        raise UserError(f"{option('act_bits', cfg.act_bits)} needs calibration data for the activations' ranges: "
                        f"give {option('calibration', 'FOLDER|FILE')}, or {option('calibration', 'random')} "
                        "for a smoke run")
    if cfg.calib is not None:
        source_kind(cfg.calib)      # options for another kind of source fail now, not after a hessians solve


def hessian_stage(cfg: QuantizeConfig, loaded: Loaded, calib, device: Device, digest: str, described: dict | None,
                  stages: dict, progress: Progress) -> Captured:
    """The Hessians (and activation ranges) the run uses: given, loaded from a file, or captured.
    A method that uses no Hessian (RTN) captures only the activation ranges where act_bits
    needs them, and nothing otherwise."""
    layers = loaded.scan.layers
    if isinstance(cfg.hessians, Hessians):
        return cfg.hessians.for_run(layers, digest, loaded.name, described, device.xp)
    if cfg.hessians is not None:
        with _stage(stages, "load_hessians"):
            return from_file(cfg.hessians, layers, digest, loaded.name, described, device.xp)
    sums = METHODS[cfg.solve.method].uses_hessian or cfg.save_hessians is not None
    if cfg.calib is None or not (sums or cfg.act_bits is not None):
        return Captured({}, {}, 0)
    with _stage(stages, "capture"), _bar(progress, "calibration", _planned(cfg.calib, loaded.model)):
        captured = capture_hessians(loaded.model, layers, calib, device, progress.advance,
                                    ranges=cfg.act_bits is not None, sums=sums)
    if cfg.save_hessians is not None:
        with _stage(stages, "save_hessians"):
            Hessians.of(captured, os.path.basename(loaded.name), digest, described).save(cfg.save_hessians)
    return captured


def _activation_scales(cfg: QuantizeConfig, layers: list, captured: Captured) -> tuple[dict, list[str]]:
    """The INT8 scales of the inputs of ``layers`` (act_bits) from the captured ranges, and notes."""
    if cfg.act_bits is None:
        return {}, []
    needed = list(dict.fromkeys(use.input for layer in layers for use in layer.each_use()))
    if set(needed) - set(captured.ranges):     # Hessians saved without act_bits
        if isinstance(cfg.hessians, str):
            raise UserError(f"{option('hessians', cfg.hessians)}: saved without the activation ranges that "
                            f"{option('act_bits')} needs; capture them again with {option('act_bits')} and "
                            f"{option('save_hessians')}")
        raise UserError(f"{option('hessians')} (captured): captured without the activation ranges that "
                        f"{option('act_bits')} needs; capture them again with onnxobq.capture(..., act_ranges=True)")
    return activation_scales({name: captured.ranges[name] for name in needed}, cfg.act_bits,
                             cfg.activation_calibration)


def _activation_summary(cfg: QuantizeConfig, layers: list, scales: dict, excluded: list) -> dict:
    if cfg.act_bits is None:
        return {"enabled": False}
    inputs = sum(use.input in scales for layer in layers for use in layer.each_use())
    return {"enabled": True, "bits": cfg.act_bits, "calibration": cfg.activation_calibration, "layer_inputs": inputs,
            "tensors": len(scales), "scales": scales, "excluded": excluded}


def _planned(calib, model) -> int | None:
    try:
        return planned_samples(calib, model_inputs(model))
    except UserError:
        return None  # the capture reports it


def _bn_planned(cfg: QuantizeConfig, calib, loaded: Loaded) -> int | None:
    """The BN bar's total: its passes over the BN samples."""
    inputs = model_inputs(loaded.model)
    try:
        n = planned_samples(spread(calib, cfg.bn.samples, inputs), inputs)
    except UserError:
        return None
    return None if n is None else PASSES * n


@contextmanager
def _bar(progress: Progress, what: str, total: int | None):
    """A progress bar for the block, finished however the block ends."""
    progress.start(what, total)
    try:
        yield
    finally:
        progress.finish()


def _record(model: onnx.ModelProto, key: str, value) -> None:
    """Set one metadata entry of the model written (as JSON; none for None), replacing the one it
    has from its input (a model quantized again)."""
    kept = [p for p in model.metadata_props if p.key != key]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    if value is not None:
        model.metadata_props.add(key=key, value=json.dumps(value))


@contextmanager
def _stage(stages: dict, name: str):
    start = time.perf_counter()
    try:
        yield
    finally:
        stages[name] = stages.get(name, 0.0) + time.perf_counter() - start


def _storage(cfg: QuantizeConfig, opset: int, qlayers: list) -> str:
    """How the weights are stored, in words for the summary; with the layer counts where
    layer_bits gave layers other widths, or layer_group_size other group sizes."""
    bits, groups = [q.bits for q in qlayers], [q.group_size for q in qlayers]
    counts = sorted(Counter(bits or [cfg.solve.grid.bits]).items())
    parts, small_in_8 = [], False
    for b, n in counts:
        count = f" ({n} layer{'s' * (n > 1)})" if len(counts) > 1 else ""
        if cfg.format == "fake":
            parts.append(f"float weights on {'an' if b == 8 else 'a'} {b}-bit grid{count}")
            continue
        kind = storage_type(b, cfg.solve.grid.symmetric, opset)
        parts.append(f"{kind} weights holding {b}-bit codes{count}")
        small_in_8 |= b <= 4 and kind.endswith("8")
    sizes = Counter(groups)
    if len(sizes) == 1 and 0 not in sizes:
        scales = f", one scale per {groups[0]} inputs"
    elif len(sizes) > 1:       # layer_group_size (or a layer's few inputs) gave layers other group sizes
        scales = "".join(f", one scale per {f'{g} inputs' if g else 'channel'} in {n} layer{'s' * (n > 1)}"
                         for g, n in sorted(sizes.items(), key=lambda item: (item[0] == 0, item[0])))
    else:
        scales = ""
    return ", ".join(parts) + scales + (_why_int8(cfg, len(counts) == 1) if small_in_8 else "")


def _why_int8(cfg: QuantizeConfig, one_width: bool) -> str:
    """Why codes of 4 bits and below are stored in INT8 (where opset 21 would store them as INT4)."""
    which = "them" if one_width else "those of 4 bits and below"
    if cfg.act_bits is not None and cfg.opset is None:
        return (f"; with {option('act_bits')} the codes stay in INT8, as TensorRT takes INT4 weights only without "
                f"activation quantization ({option('opset', 21)} stores {which} as INT4)")
    return f"; {option('opset', 21)} stores {which} as 4-bit"


def _settings(cfg: QuantizeConfig, opset: int, model_name: str) -> dict:
    s = asdict(dataclasses.replace(cfg, model=model_name, calib=None, hessians=cfg.hessians_name))
    s["calib"] = describe(cfg.calib)
    s["opset"] = opset
    s["op_types"] = list(cfg.op_types or QUANTIZABLE_OPS)
    s["act_calib"] = cfg.activation_calibration
    s["solve"]["order"] = cfg.solve.order or METHODS[cfg.solve.method].default_order
    return s


def _bn_summary(outcome: BNOutcome, cfg: QuantizeConfig) -> dict:
    if not cfg.bn.reestimate or cfg.calib is None:
        return {"enabled": False}
    return {"enabled": True, "mode": cfg.bn.mode, "error_before": outcome.error_before,
            "error_after": outcome.error_after, "kept": outcome.kept, "reestimated": outcome.reestimated,
            "folded": outcome.folded, "corrected": outcome.corrected, "samples": outcome.samples,
            "notes": outcome.notes}


def _weights(loaded: Loaded, qlayers: list, edits: tuple) -> dict:
    """Parameter counts of the model written: quantized, and left in float by the op that reads
    them (a BatchNorm folded into its Conv is gone)."""
    folded = {name for edit in edits if edit.fold_into is not None for name in edit.params}
    return float_weights(loaded.found, {q.layer.weight for q in qlayers}, folded)


def capture_only(cfg: QuantizeConfig, progress: Progress | None = None) -> Hessians:
    """The capture stage alone (api.capture): the Hessians of the layers to quantize, with the
    activation ranges where ``cfg.act_bits`` asks for them."""
    loaded = load_stage(cfg)
    device = choose_device(cfg.device, cfg.solve.precision)
    digest = model_digest(cfg.model if isinstance(cfg.model, onnx.ModelProto) else loaded.name)
    described = describe(cfg.calib)
    captured = hessian_stage(cfg, loaded, cfg.calib, device, digest, described, {}, progress or Progress())
    return Hessians.of(captured, os.path.basename(loaded.name), digest, described)
